"""Stage `gate@<round>`: promote the round's trained policy, or keep the policy it started from.

The candidate (the round's `dpo` output) is compared with the policy the round started from on the
eval metrics, within the tolerances of `dpo.gate`: task accuracy may not fall by more than
`max_task_accuracy_drop`, the held-out preferred completions' per-token NLL (`chosen_nll`, the forgetting
measure) may not rise by more than `max_chosen_nll_rise` (relative; likewise held-out perplexity with
`max_perplexity_rise`, when set) nor stand more than `max_chosen_nll_rise_vs_sft` above the SFT policy's (the
budget of all rounds, which per-round rises would let compound), and the collapse guard must have passed
(`require_guard_ok`). The round's policy
folder (what the next round and `merge` start from) is then a copy of the candidate, or of the
starting policy when refused; `promotion.json` inside it names the round whose training it holds.
The round's eval file holds the metrics of that policy, the decision, its reasons, and the
candidate's own metrics; the round's answers file is that policy's judged greedy answers, which the
next round's win rate against the previous round reads.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from tasks.lib.files import atomic_path, read_json, write_json
from tasks.lib.policies import PROMOTION_FILE, trained_round
from tasks.lib.schema import GateParams, Params
from tasks.lib.stage import stage_main


def policy_metrics(evaluation: dict[str, Any]) -> dict[str, float]:
    """The numbers of a model's eval file (an older gate file also holds the decision, which is not a metric)."""
    return {
        name: value
        for name, value in evaluation.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def refusals(
    gate: GateParams, candidate: dict[str, float], baseline: dict[str, float], guard: dict, sft: dict[str, float]
) -> list[str]:
    """Why the candidate may not replace the baseline (the policy the round started from); empty when it may.
    `sft` is the SFT policy's eval, the baseline of the forgetting budget of all rounds. A threshold that is set but
    whose metric an eval it compares lacks is a reason too: unchecked is not passed."""
    checks = (
        ("task_accuracy", gate.max_task_accuracy_drop, "max_task_accuracy_drop", "baseline", baseline),
        ("perplexity", gate.max_perplexity_rise, "max_perplexity_rise", "baseline", baseline),
        ("chosen_nll", gate.max_chosen_nll_rise, "max_chosen_nll_rise", "baseline", baseline),
        ("chosen_nll", gate.max_chosen_nll_rise_vs_sft, "max_chosen_nll_rise_vs_sft", "SFT policy", sft),
    )
    reasons = []
    for metric, limit, key, against, reference in checks:
        if limit is None:
            continue
        lacking = [
            name for name, scores in (("round's", candidate), (f"{against}'s", reference)) if metric not in scores
        ]
        if lacking:
            reasons.append(f"{metric} unchecked: the {' and '.join(lacking)} eval has none (dpo.gate.{key}: {limit})")
            continue
        old, new = reference[metric], candidate[metric]
        versus = "" if against == "baseline" else f" from the {against}'s"
        if metric == "task_accuracy" and old - new > limit + 1e-9:
            reasons.append(f"task_accuracy fell {old:.4f} -> {new:.4f} (dpo.gate.{key}: {limit})")
        elif metric != "task_accuracy" and new / old - 1 > limit + 1e-9:
            reasons.append(
                f"{metric} rose{versus} {old:.4g} -> {new:.4g} (+{new / old - 1:.1%}; dpo.gate.{key}: {limit:.0%})"
            )
    if gate.require_guard_ok and guard.get("quality") != "ok":
        reasons.append(
            f"collapse guard: {'; '.join(guard.get('guard_reasons') or ['failed-quality'])} "
            "(dpo.gate.require_guard_ok: true)"
        )
    return reasons


def gate_round(
    params: Params,
    round_name: str,
    candidate: Path,
    candidate_eval: Path,
    guard: Path,
    baseline: Path,
    baseline_eval: Path,
    sft_eval: Path,
    candidate_answers: Path,
    baseline_answers: Path,
    out: Path,
    eval_out: Path,
    answers_out: Path,
) -> dict:
    """Promote the round's candidate, or keep the policy it started from; write that policy and its eval.

    Args:
        params: the pipeline's params
        round_name: the round, a key of `dpo.rounds`
        candidate: the round's trained policy
        candidate_eval: its evaluation
        guard: the collapse guard's verdict (from guard@<round>)
        baseline: the policy the round started from
        baseline_eval: its evaluation
        sft_eval: the SFT policy's evaluation (the baseline of `max_chosen_nll_rise_vs_sft`)
        candidate_answers: the candidate's judged greedy answers (from its eval stage)
        baseline_answers: the starting policy's judged greedy answers
        out: the round's policy after the gate
        eval_out: that policy's metrics, the decision and its reasons
        answers_out: that policy's judged greedy answers
    """
    candidate_scores = policy_metrics(read_json(candidate_eval))
    baseline_scores = policy_metrics(read_json(baseline_eval))
    sft_scores = policy_metrics(read_json(sft_eval))
    reasons = refusals(params.dpo.gate, candidate_scores, baseline_scores, read_json(guard), sft_scores)
    promoted = not reasons
    source = round_name if promoted else trained_round(baseline)
    with atomic_path(out) as scratch:
        shutil.copytree(candidate if promoted else baseline, scratch)
        write_json(
            scratch / PROMOTION_FILE, {"round": round_name, "promoted": promoted, "source": source, "reasons": reasons}
        )
    decision = {
        **(candidate_scores if promoted else baseline_scores),
        "promoted": promoted,
        "source": source,
        "reasons": reasons,
        "candidate": candidate_scores,
        "started_from": baseline_scores,
    }
    with atomic_path(answers_out) as scratch:
        shutil.copyfile(candidate_answers if promoted else baseline_answers, scratch)
    write_json(eval_out, decision)
    if promoted:
        print(f"gate: {round_name} promoted")
    else:
        print(
            f"gate: {round_name} REFUSED; the next round starts from {source}'s policy:\n"
            + "\n".join(f"  - {reason}" for reason in reasons)
        )
    return decision


if __name__ == "__main__":
    stage_main(gate_round)
