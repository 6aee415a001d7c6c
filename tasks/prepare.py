"""Stage `prepare`: convert and validate the SFT data and held-out pairs, deduplicate, sample, split, report.

Writes the SFT train and held-out splits, the held-out pairs, and a data report (DVC metric) with
counts, dropped lines and why, duplicates, token-length statistics and truncation counts.
"""

from __future__ import annotations

import random
from pathlib import Path

from tasks.lib.builtin_task import refuse_questions_the_rule_judge_cannot_score
from tasks.lib.chat import boundary_report, sft_loss_mask
from tasks.lib.errors import DataError
from tasks.lib.files import atomic_path, write_json, write_records
from tasks.lib.policies import base_window, load_base_tokenizer
from tasks.lib.records import (
    enforce_bad_line_policy,
    file_report,
    fit_to_length,
    hub_source,
    read_records,
    refuse_unrenderable,
    token_length_report,
)
from tasks.lib.schema import Params
from tasks.lib.stage import stage_main


def split(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    cut = max(1, round(len(rows) * fraction))
    heldout = sorted(order[:cut])
    train = sorted(order[cut:])
    return [rows[i] for i in train], [rows[i] for i in heldout]


def sample(rows: list, fraction: float, max_rows: int | None, seed: int) -> list:
    """A seeded sample of the rows, in their original order: `fraction` of them, at most `max_rows`."""
    keep = min(len(rows), max(1, round(len(rows) * fraction)), max_rows or len(rows))
    if keep == len(rows):
        return rows
    chosen = sorted(random.Random(seed).sample(range(len(rows)), keep))
    return [rows[i] for i in chosen]


def source_report(path: Path) -> dict:
    """Where a data source's rows came from, when a `fetch` stage loaded them from the hub."""
    source = hub_source(path)
    return {"hub": source} if source is not None else {}


def budget(key: str, max_length: int, window: int | None) -> tuple[int, str]:
    """The token budget of a row and how an error names it: the params key, or the model's window if smaller."""
    if window is not None and window < max_length:
        return window, f"the model's window of {window} tokens ({key} is {max_length})"
    return max_length, f"{key}={max_length}"


def prepare(
    params: Params,
    sft: Path,
    eval_pairs: Path,
    base: Path,
    sft_train: Path,
    sft_heldout: Path,
    eval_pairs_out: Path,
    report: Path,
) -> dict:
    """Validate both inputs (all problems before any output), then write the splits and the report.

    Each output is its own file, so a stage that reads only one of them (SFT reads the splits, evaluation
    the held-out pairs) re-runs only when that one changes.

    Args:
        params: the pipeline's params
        sft: SFT data (JSON lines or JSON, parquet, a save_to_disk folder; TRL, ShareGPT or Alpaca rows)
        eval_pairs: held-out preference pairs (same kinds of source; TRL, ShareGPT, HH or Alpaca rows)
        base: base folder (its tokenizer measures lengths)
        sft_train: the SFT rows trained on (JSON lines)
        sft_heldout: the held-out SFT rows (JSON lines)
        eval_pairs_out: the validated held-out pairs (JSON lines)
        report: the data report (DVC metric), with every dropped line as file:line: reason
    """
    data = params.data
    tokenizer = load_base_tokenizer(base, params.model)
    results = {
        "sft": read_records(sft, "sft", data.format, data.extra_fields),
        "eval_pairs": read_records(eval_pairs, "pairs", data.format, data.extra_fields),
    }
    window = base_window(base, params.model)
    budgets = {
        "sft": budget("sft.max_length", params.sft.max_length, window),
        "eval_pairs": budget("dpo.sequence.max_length", params.dpo.sequence.max_length, window),
    }
    problems = []
    for name, result in results.items():
        refuse_unrenderable(result, tokenizer)
        fit_to_length(result, tokenizer, *budgets[name])
        try:
            enforce_bad_line_policy(result, params.data.on_bad_lines, params.data.max_bad_fraction)
        except DataError as error:
            problems.append(str(error))
    if problems:
        raise DataError("\n".join(problems))
    refuse_questions_the_rule_judge_cannot_score(
        params.onpolicy.judge.kind, results["eval_pairs"], "every eval judges its answers to the held-out prompts"
    )
    sampled = {
        name: sample(result.rows, data.sample_fraction, data.max_rows, data.seed) for name, result in results.items()
    }
    if len(sampled["sft"]) < 2:
        raise DataError(f"{sft}: need at least 2 SFT rows to hold one out")

    train, heldout = split(sampled["sft"], data.heldout_fraction, data.seed)
    summary = {
        "sft": {
            **source_report(sft),
            **file_report(results["sft"]),
            "sampled": len(sampled["sft"]),
            "train": len(train),
            "heldout": len(heldout),
            **token_length_report(sampled["sft"], tokenizer, budgets["sft"][0]),
            "cut_to_fit": results["sft"].cut_rows,
            "template": {
                "loss_mask": sft_loss_mask(tokenizer, any("messages" in row for row in sampled["sft"])),
                **boundary_report(sampled["sft"], tokenizer),
            },
        },
        "eval_pairs": {
            **source_report(eval_pairs),
            **file_report(results["eval_pairs"]),
            "sampled": len(sampled["eval_pairs"]),
            **token_length_report(sampled["eval_pairs"], tokenizer, budgets["eval_pairs"][0]),
            "cut_to_fit": results["eval_pairs"].cut_rows,
            "template": boundary_report(sampled["eval_pairs"], tokenizer),
        },
    }
    for path, rows in ((sft_train, train), (sft_heldout, heldout), (eval_pairs_out, sampled["eval_pairs"])):
        with atomic_path(path) as scratch:
            write_records(scratch, rows)
    write_json(report, summary)
    for name, section in summary.items():
        print(
            f"{name}: kept {section['kept']} of {section['lines']} lines, dropped {section['dropped']}, "
            f"duplicates {section['duplicates_removed']}, cut to fit {section['cut_to_fit']}; "
            f"prompt boundary {section['template']['prompt_boundary']}"
        )
        for dropped in section["dropped_lines"]:
            print(f"  dropped {dropped}")
    return summary


if __name__ == "__main__":
    stage_main(prepare)
