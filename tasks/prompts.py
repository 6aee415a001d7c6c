"""Stage `prompts@<round>`: the round's fresh prompts from the pool, and any human pairs dropped in for it.

The pool is shuffled once with `onpolicy.prompts.seed`; round K (its position in `dpo.rounds`)
takes the K-th slice of `onpolicy.prompts.per_round` prompts, so no prompt repeats across
rounds until the pool runs out. Appending a round never changes an earlier round's slice.
Past the pool's end the slices wrap around; the reused prompts are counted in the report.
Human pairs in `<incoming>/<round>.jsonl` are validated like every pairs file and passed on.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from tasks.common import atomic_path, exit_bad_input, stage_params, write_json
from tasks.config import Params
from tasks.records import DataError, enforce_bad_line_policy, file_report, read_records, write_records


def round_slice(pool_size: int, per_round: int, round_index: int, seed: int) -> tuple[list[int], int]:
    """Pool indices of round `round_index` (0-based) and how many of them earlier rounds used."""
    order = list(range(pool_size))
    random.Random(seed).shuffle(order)
    start = round_index * per_round
    chosen = [order[position % pool_size] for position in range(start, start + per_round)]
    reused = sum(1 for position in range(start, start + per_round) if position >= pool_size)
    return chosen, reused


def incoming_pairs(params: Params, incoming: Path) -> tuple[list[dict], dict]:
    """The validated human pairs of the round, or none when no file was dropped in."""
    if not incoming.exists():
        return [], {"file": None}
    result = read_records(incoming, "pairs")
    enforce_bad_line_policy(result, params.data.on_bad_lines, params.data.max_bad_fraction)
    return result.rows, {"file": str(incoming), **file_report(result)}


def draw_prompts(params: Params, round_name: str, pool: Path, incoming_dir: Path, out: Path, incoming_out: Path,
                 report: Path) -> dict:
    result = read_records(pool, "prompts")
    enforce_bad_line_policy(result, params.data.on_bad_lines, params.data.max_bad_fraction)
    settings = params.onpolicy.prompts
    round_index = list(params.dpo.rounds).index(round_name)
    indices, reused = round_slice(len(result.rows), settings.per_round, round_index, settings.seed)
    human, human_report = incoming_pairs(params, incoming_dir / f"{round_name}.jsonl")
    summary = {
        "round": round_name,
        "pool": str(pool),
        "pool_size": len(result.rows),
        "pool_report": file_report(result),
        "prompts": len(indices),
        "reused_prompts": reused,
        "pool_exhausted": reused > 0,
        "incoming_pairs": len(human),
        "incoming": human_report,
    }
    with atomic_path(out) as scratch:
        write_records(scratch, [{"id": index, "prompt": result.rows[index]["prompt"]} for index in indices])
    with atomic_path(incoming_out) as scratch:
        write_records(scratch, human)
    write_json(report, summary)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--round", required=True, help="round name, a key of dpo.rounds")
    parser.add_argument("--pool", type=Path, required=True, help="prompt pool (JSON lines)")
    parser.add_argument("--incoming", type=Path, required=True, help="folder of per-round human pairs (<round>.jsonl)")
    parser.add_argument("--out", type=Path, required=True, help="the round's prompts (JSON lines)")
    parser.add_argument("--incoming-out", type=Path, required=True, help="the round's validated human pairs")
    parser.add_argument("--report", type=Path, required=True)
    args = parser.parse_args()
    params = stage_params(args.params)
    if args.round not in params.dpo.rounds:
        exit_bad_input(f"--round {args.round}: not a key of dpo.rounds ({', '.join(params.dpo.rounds)})")
    try:
        summary = draw_prompts(params, args.round, args.pool, args.incoming, args.out, args.incoming_out, args.report)
    except DataError as error:
        exit_bad_input(f"bad data:\n{error}")
    print(f"prompts@{args.round}: {summary['prompts']} prompts from a pool of {summary['pool_size']}"
          f" ({summary['reused_prompts']} reused), {summary['incoming_pairs']} human pairs")
    if summary["pool_exhausted"]:
        print(f"WARNING: the prompt pool is exhausted: {summary['reused_prompts']} prompts of round {args.round} "
              "were used by earlier rounds; grow onpolicy.prompts.pool or lower per_round")


if __name__ == "__main__":
    main()
