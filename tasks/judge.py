"""Stage `judge@<round>`: score every sampled response with the judge `onpolicy.judge` names.

The judges (`rule`, `reward_model`, `function`) are in `tasks/lib/judges.py`. On several processes
(`compute.processes`) the responses are scored in batches dealt by rank, and rank 0 writes what one process would.
The scores are written beside the samples, with the judge's identity (and content hashes of its code or weights) in the
round's metrics.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from tasks.lib.distributed import ensure_process_group, map_batches
from tasks.lib.files import atomic_path, load_records, write_json, write_records
from tasks.lib.judges import RuleJudge, open_judge
from tasks.lib.schema import Params
from tasks.lib.stage import stage_main


def scored_rows(rows: list[dict], flat_scores: list[float], judge, length_penalty: float) -> list[dict]:
    """Each row with its responses' scores (length-penalised when set, the judge's own kept as `judge_scores`) and,
    when the judge reports them, each response's attributes (the rule judge: correct, polite)."""
    scores = iter(flat_scores)
    scored = []
    for row in rows:
        own = [next(scores) for _ in row["responses"]]
        out = {**row, "scores": own, "judge": judge.identity["kind"]}
        if length_penalty:
            out["judge_scores"] = own
            out["scores"] = [score - length_penalty * tokens for score, tokens in zip(own, row["tokens"], strict=True)]
        if isinstance(judge, RuleJudge):
            verdicts = judge.verdicts([row["prompt"]] * len(row["responses"]), row["responses"])
            out["attributes"] = [{"correct": v.correct, "polite": v.polite} for v in verdicts]
        scored.append(out)
    return scored


def judge_round(params: Params, generations: Path, policy: Path, out: Path, metrics: Path) -> dict:
    """Score every sampled response with the configured judge; write the scores beside the samples.

    Args:
        params: the pipeline's params
        generations: sampled responses (from generate@<round>)
        policy: the sampling policy (its chat template renders conversations for a reward model)
        out: responses with their scores (JSON lines)
        metrics: the stage's metrics (judge identity, score summary)
    """
    rows = load_records(generations)
    ensure_process_group()  # before the judge loads: on GPUs each process takes its own
    judge = open_judge(params, policy)
    prompts = [row["prompt"] for row in rows for _ in row["responses"]]
    responses = [text for row in rows for text in row["responses"]]
    # On several processes each scores every world_size-th batch of the judge's batch size; rank 0 writes.
    flat_scores = map_batches(
        lambda batch: judge.score([prompt for prompt, _ in batch], [response for _, response in batch]),
        list(zip(prompts, responses, strict=True)),
        params.onpolicy.judge.batch_size,
    )
    if flat_scores is None:
        return {}
    scored = scored_rows(rows, flat_scores, judge, params.onpolicy.judge.length_penalty)
    with atomic_path(out) as scratch:
        write_records(scratch, scored)
    flat = [score for row in scored for score in row["scores"]]
    summary: dict[str, Any] = {
        "judge": judge.identity,
        "responses": len(flat),
        "mean_score": statistics.fmean(flat) if flat else None,
        "prompts_with_spread": sum(1 for row in scored if row["scores"] and max(row["scores"]) > min(row["scores"])),
    }
    if isinstance(judge, RuleJudge) and responses:
        verdicts = judge.verdicts(prompts, responses)
        summary["correct_rate"] = statistics.fmean(v.correct for v in verdicts)
        summary["polite_rate"] = statistics.fmean(v.polite for v in verdicts)
    write_json(metrics, summary)
    rates = "".join(f", {k} {summary[k]:.3f}" for k in ("correct_rate", "polite_rate") if k in summary)
    print(
        f"judge ({summary['judge']['kind']}): {summary['responses']} responses, mean score "
        f"{summary['mean_score']}{rates}"
    )
    return summary


if __name__ == "__main__":
    stage_main(judge_round)
