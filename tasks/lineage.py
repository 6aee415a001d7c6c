"""Stage `lineage@<round>`: one record tying the round together, prompts to promoted policy.

For each step it gives the content hash of what the step wrote and the facts that produced it:
prompts (pool, reuse, human pairs), generations (sampling policy and settings), scores (judge
identity), pairs (count, mean score gap, chosen/rejected lengths), reference log-probs, the trained
checkpoint, its evaluation and the gate's decision.
"""

from __future__ import annotations

from pathlib import Path

from tasks.lib.files import read_json, write_json
from tasks.lib.hashing import directory_digest, file_digest
from tasks.lib.schema import Params
from tasks.lib.stage import stage_main


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
                report["prompts"],
                "pool",
                "pool_size",
                "prompts",
                "reused_prompts",
                "pool_exhausted",
                "incoming_pairs",
                "incoming_extra_fields",
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
            ),
            **pick(report["guard"], "eval_reward_accuracy", "chosen_logp_drift", "quality"),
        },
        "eval": report["gate"]["candidate"],
        "gate": {
            "promoted": gate["promoted"],
            "reasons": gate["reasons"],
            "policy_source": gate["source"],
            "policy_sha256": digest["policy"],
        },
    }


def write_lineage(
    params: Params,
    round_name: str,
    prompts: Path,
    incoming: Path,
    generations: Path,
    scored: Path,
    pairs: Path,
    reference_logps: Path,
    candidate: Path,
    policy: Path,
    prompts_report: Path,
    generate_report: Path,
    judge_report: Path,
    pairs_report: Path,
    dpo_report: Path,
    guard_report: Path,
    gate_report: Path,
    out: Path,
) -> dict:
    """Write round `round_name`'s lineage record: each step's output hash and the facts that produced it.

    Args:
        params: the pipeline's params (validated; the record reads the stages' reports)
        round_name: the round, a key of `dpo.rounds`
        prompts: the round's prompts
        incoming: the round's validated human pairs
        generations: the sampled responses
        scored: the judged responses
        pairs: the round's training pairs
        reference_logps: the reference log-probs folder
        candidate: the trained candidate policy
        policy: the round's policy after the gate
        prompts_report: the prompts stage's report
        generate_report: the generate stage's metrics
        judge_report: the judge stage's metrics
        pairs_report: the pairs stage's report
        dpo_report: the dpo stage's metrics
        guard_report: the collapse guard's verdict
        gate_report: the gate's decision (the round's eval file)
        out: the lineage record (JSON)
    """
    files = {"prompts": prompts, "incoming": incoming, "generations": generations, "scored": scored, "pairs": pairs,
             "reference_logps": reference_logps, "candidate": candidate, "policy": policy}  # fmt: skip
    reports = {"prompts": prompts_report, "generate": generate_report, "judge": judge_report,
               "pairs": pairs_report, "dpo": dpo_report, "guard": guard_report, "gate": gate_report}  # fmt: skip
    record = round_lineage(round_name, files, reports)
    write_json(out, record)
    print(f"lineage@{round_name}: {record['pairs']['pairs']} pairs, promoted {record['gate']['promoted']} -> {out}")
    return record


if __name__ == "__main__":
    stage_main(write_lineage)
