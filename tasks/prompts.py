"""Stage `prompts@<round>`: the round's fresh prompts from the pool, and any human pairs dropped in for it.

The pool is shuffled once with `onpolicy.prompts.seed`; round K (its position in `dpo.rounds`)
takes the K-th slice of `onpolicy.prompts.per_round` prompts, so no prompt repeats across
rounds until the pool runs out. Appending a round never changes an earlier round's slice.
Past the pool's end the slices wrap around; the reused prompts are counted in the report.
Human pairs in `<incoming>/<round>.jsonl` are validated like every pairs file and passed on in the round's
format (the pool's: string prompts or message lists), so they train beside the on-policy pairs: string pairs
beside a conversational pool become one user message and one assistant message each; conversational pairs
beside a string pool are refused here, before any sampling, naming the file and line (rendering them to strings
would need the model's chat template, which the user's own string prompts do not follow).
"""

from __future__ import annotations

import random
from pathlib import Path

from tasks.lib.builtin_task import refuse_questions_the_rule_judge_cannot_score
from tasks.lib.errors import DataError
from tasks.lib.files import atomic_path, write_json, write_records
from tasks.lib.records import ReadResult, enforce_bad_line_policy, file_report, read_records, row_format
from tasks.lib.schema import Params
from tasks.lib.stage import stage_main


def round_slice(pool_size: int, per_round: int, round_index: int, seed: int) -> tuple[list[int], int]:
    """Pool indices of round `round_index` (0-based) and how many of them earlier rounds used."""
    order = list(range(pool_size))
    random.Random(seed).shuffle(order)
    start = round_index * per_round
    chosen = [order[position % pool_size] for position in range(start, start + per_round)]
    reused = sum(1 for position in range(start, start + per_round) if position >= pool_size)
    return chosen, reused


def as_conversation(pair: dict) -> dict:
    """A string pair as TRL's conversational one: the prompt a user message, each answer an assistant message."""
    return {
        "prompt": [{"role": "user", "content": pair["prompt"]}],
        "chosen": [{"role": "assistant", "content": pair["chosen"]}],
        "rejected": [{"role": "assistant", "content": pair["rejected"]}],
    }


def in_round_format(result: ReadResult, round_format: str) -> tuple[list[dict], int]:
    """The human pairs in the round's format, and how many were converted; refuses what cannot be converted."""
    converted, rows = 0, []
    for row, line in zip(result.rows, result.row_lines, strict=True):
        if row_format(row) == round_format:
            rows.append(row)
        elif round_format == "conversational":
            rows.append(as_conversation(row))
            converted += 1
        else:
            raise DataError(
                f"{result.where(line)}: a conversational pair (message lists) for a round whose prompt pool holds "
                "strings: the round's pairs are strings; write this file's pairs as strings, or the pool's prompts "
                "as message lists"
            )
    return rows, converted


def incoming_pairs(params: Params, incoming: Path, round_format: str) -> tuple[list[dict], dict]:
    """The validated human pairs of the round in its format, or none when no file was dropped in."""
    if not incoming.exists():
        return [], {"file": None}
    result = read_records(incoming, "pairs", params.data.format, params.data.extra_fields)
    enforce_bad_line_policy(result, params.data.on_bad_lines, params.data.max_bad_fraction)
    rows, converted = in_round_format(result, round_format)
    return rows, {"file": str(incoming), **file_report(result), "converted_to_round_format": converted}


def draw_prompts(
    params: Params, round_name: str, pool: Path, incoming: Path, out: Path, incoming_out: Path, report: Path
) -> dict:
    """Write round `round_name`'s prompts (its slice of the pool) and its validated human pairs.

    Args:
        params: the pipeline's params
        round_name: the round, a key of `dpo.rounds`
        pool: prompt pool (JSON lines or JSON, parquet, a save_to_disk folder; TRL, ShareGPT or Alpaca rows)
        incoming: folder of per-round human pairs (`<round>.jsonl`, optional)
        out: the round's prompts (JSON lines)
        incoming_out: the round's validated human pairs (JSON lines)
        report: the stage's report
    """
    result = read_records(pool, "prompts", params.data.format, params.data.extra_fields)
    enforce_bad_line_policy(result, params.data.on_bad_lines, params.data.max_bad_fraction)
    refuse_questions_the_rule_judge_cannot_score(params.onpolicy.judge.kind, result, "it judges every round's samples")
    settings = params.onpolicy.prompts
    round_index = list(params.dpo.rounds).index(round_name)
    indices, reused = round_slice(len(result.rows), settings.per_round, round_index, settings.seed)
    human, human_report = incoming_pairs(params, incoming / f"{round_name}.jsonl", row_format(result.rows[0]))
    summary = {
        "round": round_name,
        "pool": str(pool),
        "pool_size": len(result.rows),
        "pool_report": file_report(result),
        "prompts": len(indices),
        "reused_prompts": reused,
        "pool_exhausted": reused > 0,
        "incoming_pairs": len(human),
        "incoming_extra_fields": human_report.get("extra_fields_set_aside", {}),
        "incoming": human_report,
    }
    with atomic_path(out) as scratch:
        write_records(scratch, [{"id": index, "prompt": result.rows[index]["prompt"]} for index in indices])
    with atomic_path(incoming_out) as scratch:
        write_records(scratch, human)
    write_json(report, summary)
    print(
        f"prompts@{round_name}: {summary['prompts']} prompts from a pool of {summary['pool_size']}"
        f" ({summary['reused_prompts']} reused), {summary['incoming_pairs']} human pairs"
    )
    for dropped in summary["pool_report"]["dropped_lines"] + summary["incoming"].get("dropped_lines", []):
        print(f"  dropped {dropped}")
    if summary["pool_exhausted"]:
        print(
            f"WARNING: the prompt pool is exhausted: {summary['reused_prompts']} prompts of round {round_name} "
            "were used by earlier rounds; grow onpolicy.prompts.pool or lower per_round"
        )
    return summary


if __name__ == "__main__":
    stage_main(draw_prompts)
