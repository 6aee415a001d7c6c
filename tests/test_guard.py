"""tasks/guard.py: the collapse guard's verdict, and the drift it measures on a trained round."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.dpo import train_round
from tasks.guard import distinct_trigram_ratio, guard_round, guard_verdict
from tasks.lib.params import load_params
from tasks.lib.schema import GuardParams


def test_guard_fires_on_chosen_logp_collapse_and_degenerate_generations():
    guard = GuardParams(max_chosen_logp_drop=10.0, min_sanity_pass_rate=0.75)
    assert guard_verdict(guard, drift=-2.0, pass_rate=1.0) == []
    reasons = guard_verdict(guard, drift=-129.5, pass_rate=0.25)
    assert len(reasons) == 2 and "129.50 nats" in reasons[0] and "25%" in reasons[1]


def test_distinct_trigram_ratio_spots_repetition():
    assert distinct_trigram_ratio([1, 2, 3, 4, 5]) == 1.0
    assert distinct_trigram_ratio([7, 7, 7, 7, 7, 7, 7, 7]) == pytest.approx(1 / 6)


def test_the_sft_term_keeps_chosen_log_probs_above_the_plain_losses_on_the_same_pairs(pipeline, tmp_path):
    """Round 1's stored pairs of the micro pipeline, the same steps with and without TRL's `sft` loss term: the
    guard measures the held-out chosen answers' log-probs falling less with it (likelihood displacement, which the
    term exists to stop)."""
    drift = {}
    sft: Path = pipeline / "models/policies/sft"
    for name, types in (("plain", ["sigmoid"]), ("sft", ["sigmoid", "sft"])):
        params = load_params(
            pipeline / "params.yaml",
            {"dpo.loss.types": types, "dpo.loss.weights": None, "dpo.train.learning_rate": 2e-3,
             "dpo.train.max_steps": 12, "dpo.guard.sanity_prompts": 1, "tracking.report_to": []},
        )  # fmt: skip
        train_round(
            params, "r1", sft, pipeline / "models/reference_logps/r1", tmp_path / f"{name}_policy",
            tmp_path / f"{name}_ckpt", None, tmp_path / f"{name}_plots.json", tmp_path / f"{name}_metrics.json",
        )  # fmt: skip
        guard = guard_round(
            params, "r1", tmp_path / f"{name}_policy", sft, sft, pipeline / "data/prepared/eval_pairs.jsonl",
            tmp_path / f"{name}_guard.json",
        )  # fmt: skip
        drift[name] = guard["chosen_logp_drift"]
    assert drift["plain"] < 0, "plain DPO did not displace the chosen answers here: the test proves nothing"
    assert drift["sft"] > drift["plain"] + 0.5, drift
