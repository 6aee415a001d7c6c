"""Stage `lineage@<round>`: one record tying the round together, prompts to promoted policy.

For each step it gives the content hash of what the step wrote and the facts that produced it:
prompts (pool, reuse, human pairs), generations (sampling policy and settings), scores (judge
identity), pairs (count, mean score gap, chosen/rejected lengths), reference log-probs, the trained
checkpoint, its evaluation and the gate's decision.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tasks.lib.files import read_json, write_json
from tasks.lib.hashing import directory_digest, file_digest
from tasks.lib.schema import Params
from tasks.lib.stage import stage_main

OUTPUTS = ("prompts", "incoming", "generations", "scored", "pairs", "reference-logps", "candidate", "policy")
REPORTS = ("prompts", "generate", "judge", "pairs", "dpo", "gate")


def pick(record: dict, *keys: str) -> dict:
    return {key: record[key] for key in keys if key in record}


def round_lineage(name: str, files: dict[str, Path], reports: dict[str, Path]) -> dict:
    report = {step: read_json(path) for step, path in reports.items()}
    digest = {step: directory_digest(path) if path.is_dir() else file_digest(path) for step, path in files.items()}
    gate = report["gate"]
    return {
        "round": name,
        "prompts": {
            "sha256": digest["prompts"],
            "human_pairs_sha256": digest["incoming"],
            **pick(
                report["prompts"], "pool", "pool_size", "prompts", "reused_prompts", "pool_exhausted", "incoming_pairs"
            ),
        },
        "generations": {
            "sha256": digest["generations"],
            **pick(
                report["generate"],
                "policy",
                "backend",
                "sampling",
                "responses",
                "empty_responses",
                "mean_response_chars",
                "new_tokens",
                "tokens_per_second",
            ),
        },
        "scores": {
            "sha256": digest["scored"],
            **pick(report["judge"], "judge", "mean_score", "correct_rate", "polite_rate", "prompts_with_spread"),
        },
        "pairs": {
            "sha256": digest["pairs"],
            **pick(
                report["pairs"],
                "pairs",
                "onpolicy_pairs",
                "human_pairs",
                "ties_dropped",
                "degenerate_dropped",
                "mean_score_gap",
                "chosen_chars_mean",
                "rejected_chars_mean",
                "chosen_tokens_mean",
                "rejected_tokens_mean",
                "truncated_rows",
            ),
        },
        "reference_logps": {"sha256": digest["reference_logps"]},
        "checkpoint": {
            "sha256": digest["candidate"],
            **pick(
                report["dpo"],
                "previous",
                "reference",
                "steps",
                "train_loss_first",
                "train_loss_last",
                "eval_reward_accuracy",
                "quality",
            ),
        },
        "eval": report["gate"]["candidate"],
        "gate": {
            "promoted": gate["promoted"],
            "reasons": gate["reasons"],
            "policy_source": gate["source"],
            "policy_sha256": digest["policy"],
        },
    }


def run(params: Params, args: argparse.Namespace) -> None:
    files = {step.replace("-", "_"): getattr(args, step.replace("-", "_")) for step in OUTPUTS}
    reports = {step: getattr(args, f"{step}_report") for step in REPORTS}
    record = round_lineage(args.round, files, reports)
    write_json(args.out, record)
    print(
        f"lineage@{args.round}: {record['pairs']['pairs']} pairs, promoted {record['gate']['promoted']} -> {args.out}"
    )


def main(argv: list[str] | None = None) -> None:
    paths = {f"--{step}": f"the round's {step} output" for step in OUTPUTS}
    paths.update({f"--{step}-report": f"the {step} stage's metrics" for step in REPORTS})
    stage_main(__doc__, run, argv, takes_round=True, paths={**paths, "--out": "the round's lineage record"})


if __name__ == "__main__":
    main()
