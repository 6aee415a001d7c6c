"""Stage `gate@<round>`: promote the round's trained policy, or keep the policy it started from.

The candidate (the round's `dpo` output) is compared with the policy the round started from on the
guard metrics, within the tolerances of `dpo.gate`: task accuracy may not fall by more than
`max_task_accuracy_drop`, held-out perplexity may not rise by more than `max_perplexity_rise`
(relative), and the collapse guard must have passed (`require_guard_ok`). The round's policy
folder (what the next round and `merge` start from) is then a copy of the candidate, or of the
starting policy when refused; `promotion.json` inside it names the round whose training it holds.
The round's eval file holds the metrics of that policy, the decision, its reasons, and the
candidate's own metrics.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from tasks.common import atomic_path, read_json, stage_params, write_json
from tasks.config import SFT_POLICY, GateParams, Params

PROMOTION_FILE = "promotion.json"
METRICS = ("preference_accuracy", "task_accuracy", "correct", "polite", "perplexity")


def policy_metrics(evaluation: dict[str, Any]) -> dict[str, float]:
    return {name: evaluation[name] for name in METRICS if name in evaluation}


def trained_round(policy: Path) -> str:
    """The round whose training a policy folder holds (`sft` for the SFT snapshot)."""
    promotion = Path(policy) / PROMOTION_FILE
    return read_json(promotion)["source"] if promotion.exists() else SFT_POLICY


def refusals(gate: GateParams, candidate: dict[str, float], baseline: dict[str, float], guard: dict) -> list[str]:
    """Why the candidate may not replace the baseline; empty when it may."""
    reasons = []
    if "task_accuracy" in candidate and "task_accuracy" in baseline:
        drop = baseline["task_accuracy"] - candidate["task_accuracy"]
        if drop > gate.max_task_accuracy_drop + 1e-9:
            reasons.append(f"task_accuracy fell {baseline['task_accuracy']:.4f} -> {candidate['task_accuracy']:.4f} "
                           f"(dpo.gate.max_task_accuracy_drop: {gate.max_task_accuracy_drop})")
    if "perplexity" in candidate and "perplexity" in baseline:
        rise = candidate["perplexity"] / baseline["perplexity"] - 1
        if rise > gate.max_perplexity_rise + 1e-9:
            reasons.append(f"perplexity rose {baseline['perplexity']:.4g} -> {candidate['perplexity']:.4g} "
                           f"(+{rise:.1%}; dpo.gate.max_perplexity_rise: {gate.max_perplexity_rise:.0%})")
    if gate.require_guard_ok and guard.get("quality") != "ok":
        reasons.append(f"collapse guard: {'; '.join(guard.get('guard_reasons') or ['failed-quality'])} "
                       "(dpo.gate.require_guard_ok: true)")
    return reasons


def gate_round(params: Params, name: str, candidate: Path, candidate_eval: Path, round_metrics: Path, baseline: Path,
               baseline_eval: Path, out: Path, eval_out: Path) -> dict:
    candidate_scores = policy_metrics(read_json(candidate_eval))
    baseline_scores = policy_metrics(read_json(baseline_eval))
    reasons = refusals(params.dpo.gate, candidate_scores, baseline_scores, read_json(round_metrics))
    promoted = not reasons
    source = name if promoted else trained_round(baseline)
    with atomic_path(out) as scratch:
        shutil.copytree(candidate if promoted else baseline, scratch)
        write_json(scratch / PROMOTION_FILE, {"round": name, "promoted": promoted, "source": source, "reasons": reasons})
    decision = {
        **(candidate_scores if promoted else baseline_scores),
        "promoted": promoted,
        "source": source,
        "reasons": reasons,
        "candidate": candidate_scores,
        "started_from": baseline_scores,
    }
    write_json(eval_out, decision)
    return decision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--round", required=True)
    parser.add_argument("--candidate", type=Path, required=True, help="the round's trained policy")
    parser.add_argument("--candidate-eval", type=Path, required=True, help="its evaluation")
    parser.add_argument("--round-metrics", type=Path, required=True, help="the dpo stage's metrics (collapse guard)")
    parser.add_argument("--baseline", type=Path, required=True, help="the policy the round started from")
    parser.add_argument("--baseline-eval", type=Path, required=True, help="its evaluation")
    parser.add_argument("--out", type=Path, required=True, help="the round's policy after the gate")
    parser.add_argument("--eval-out", type=Path, required=True, help="that policy's metrics and the decision")
    args = parser.parse_args()
    params = stage_params(args.params)
    decision = gate_round(params, args.round, args.candidate, args.candidate_eval, args.round_metrics, args.baseline,
                          args.baseline_eval, args.out, args.eval_out)
    if decision["promoted"]:
        print(f"gate: {args.round} promoted")
    else:
        print(f"gate: {args.round} REFUSED; the next round starts from {decision['source']}'s policy:\n"
              + "\n".join(f"  - {reason}" for reason in decision["reasons"]))


if __name__ == "__main__":
    main()
