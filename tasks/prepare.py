"""Stage `prepare`: validate the SFT data and held-out preference pairs, deduplicate, split, report.

Writes the SFT train and held-out splits, the held-out pairs, and a data report (DVC metric) with
counts, dropped lines and why, duplicates, token-length statistics and truncation counts.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from tasks.common import atomic_path, exit_bad_input, load_tokenizer, resolve_base, stage_params, write_json
from tasks.config import Params
from tasks.records import (
    DataError,
    enforce_bad_line_policy,
    file_report,
    read_records,
    token_length_report,
    write_records,
)


def split(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    cut = max(1, round(len(rows) * fraction))
    heldout = sorted(order[:cut])
    train = sorted(order[cut:])
    return [rows[i] for i in train], [rows[i] for i in heldout]


def prepare(params: Params, sft: Path, eval_pairs: Path, base: Path, out_dir: Path, report: Path) -> dict:
    """Validate both inputs (all problems before any output), then write the splits and the report."""
    results = {"sft": read_records(sft, "sft"), "eval_pairs": read_records(eval_pairs, "pairs")}
    problems = []
    for result in results.values():
        try:
            enforce_bad_line_policy(result, params.data.on_bad_lines, params.data.max_bad_fraction)
        except DataError as error:
            problems.append(str(error))
    if problems:
        raise DataError("\n".join(problems))
    if len(results["sft"].rows) < 2:
        raise DataError(f"{sft}: need at least 2 SFT rows to hold one out")

    name_or_path, revision = resolve_base(base)
    tokenizer = load_tokenizer(name_or_path, params.model, revision)
    train, heldout = split(results["sft"].rows, params.data.heldout_fraction, params.data.seed)
    summary = {
        "sft": {
            **file_report(results["sft"]),
            "train": len(train),
            "heldout": len(heldout),
            **token_length_report(results["sft"].rows, tokenizer, params.sft.max_length),
        },
        "eval_pairs": {
            **file_report(results["eval_pairs"]),
            **token_length_report(results["eval_pairs"].rows, tokenizer, params.dpo.sequence.max_length),
        },
    }
    with atomic_path(out_dir) as scratch:
        scratch.mkdir()
        write_records(scratch / "sft_train.jsonl", train)
        write_records(scratch / "sft_heldout.jsonl", heldout)
        write_records(scratch / "eval_pairs.jsonl", results["eval_pairs"].rows)
    write_json(report, summary)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--sft", type=Path, required=True)
    parser.add_argument("--eval-pairs", type=Path, required=True)
    parser.add_argument("--base", type=Path, required=True, help="base folder (its tokenizer measures lengths)")
    parser.add_argument("--out", type=Path, required=True, help="folder for sft_train, sft_heldout, eval_pairs")
    parser.add_argument("--report", type=Path, required=True)
    args = parser.parse_args()
    params = stage_params(args.params)
    try:
        summary = prepare(params, args.sft, args.eval_pairs, args.base, args.out, args.report)
    except DataError as error:
        exit_bad_input(f"bad data:\n{error}")
    for name, section in summary.items():
        print(f"{name}: kept {section['kept']} of {section['lines']} lines, dropped {section['dropped']}, "
              f"duplicates {section['duplicates_removed']}, truncated {section['truncated_rows']}")


if __name__ == "__main__":
    main()
