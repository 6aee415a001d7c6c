"""Stage `pairs@<round>`: validate one round's fresh preference pairs and write them for training.

Each round's data is a stage boundary of its own, so a later source of pairs (on-policy
generation and judging) can replace this stage without touching the DPO stages.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tasks.common import atomic_path, exit_bad_input, load_tokenizer, resolve_base, stage_params, write_json
from tasks.config import Params
from tasks.records import DataError, enforce_bad_line_policy, file_report, read_records, token_length_report, write_records


def prepare_pairs(params: Params, pairs: Path, base: Path, out: Path, report: Path) -> dict:
    result = read_records(pairs, "pairs")
    enforce_bad_line_policy(result, params.data.on_bad_lines, params.data.max_bad_fraction)
    name_or_path, revision = resolve_base(base)
    tokenizer = load_tokenizer(name_or_path, params.model, revision)
    summary = {**file_report(result), **token_length_report(result.rows, tokenizer, params.dpo.sequence.max_length)}
    with atomic_path(out) as scratch:
        write_records(scratch, result.rows)
    write_json(report, summary)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--pairs", type=Path, required=True, help="the round's raw pairs (JSON lines)")
    parser.add_argument("--base", type=Path, required=True, help="base folder (its tokenizer measures lengths)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--report", type=Path, required=True)
    args = parser.parse_args()
    params = stage_params(args.params)
    try:
        summary = prepare_pairs(params, args.pairs, args.base, args.out, args.report)
    except DataError as error:
        exit_bad_input(f"bad data:\n{error}")
    print(f"{args.pairs}: kept {summary['kept']} of {summary['lines']} lines, dropped {summary['dropped']}, "
          f"duplicates {summary['duplicates_removed']}, truncated {summary['truncated_rows']}")


if __name__ == "__main__":
    main()
