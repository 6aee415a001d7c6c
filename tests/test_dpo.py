"""tasks/dpo.py on its own: Chinese conversational pairs through prepare -> reference log-probs -> DPO -> guard;
reference-free rounds; early stopping on a validation slice of the round's own pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from trl import DPOTrainer

from tasks.base import build_base
from tasks.dpo import round_training, train_round
from tasks.guard import guard_round
from tasks.lib.errors import DataError
from tasks.lib.params import load_params
from tasks.lib.schema import EarlyStoppingParams
from tasks.pairs import build_pairs
from tasks.reference_logps import compute_reference_logps, round_reference_logps, validation_split

ROOT = Path(__file__).resolve().parents[1]


def chinese_pair(i: int) -> dict:
    return {
        "prompt": [{"role": "user", "content": f"{i} 加 {i} 等于几？"}],
        "chosen": [{"role": "assistant", "content": f"等于 {2 * i}。很高兴帮忙 🙂"}],
        "rejected": [{"role": "assistant", "content": f"等于 {2 * i + 1}。"}],
    }


def test_chinese_pairs_run_through_prepare_reference_and_dpo(tmp_path):
    """Conversational training pairs beside held-out pairs in the standard (string) format, as the built-in
    prompt pool beside a user's string eval pairs gives; 3 steps, fewer than logging_steps, still report a loss."""

    raw = tmp_path / "zh.jsonl"
    raw.write_text("".join(json.dumps(chinese_pair(i), ensure_ascii=False) + "\n" for i in range(12)), encoding="utf-8")
    params = load_params(
        ROOT / "params.yaml",
        {
            "dpo.train.max_steps": 3,
            "dpo.train.batch_size": 4,
            "dpo.guard.sanity_prompts": 2,
            "dpo.train.logging_steps": 5,
        },
    )
    base = tmp_path / "base"
    build_base(params, ROOT / "data/builtin/sft.jsonl", base)  # byte-level BPE: Chinese text needs no merges
    prepared = tmp_path / "pairs.jsonl"
    (tmp_path / "no_responses.jsonl").write_text("")
    report = build_pairs(params, tmp_path / "no_responses.jsonl", raw, base, base, prepared, tmp_path / "report.json")
    assert report["pairs"] == report["human_pairs"] == 12 and report["dropped"] == 0
    string_pairs = tmp_path / "eval_pairs.jsonl"
    string_rows = [{"prompt": f"{i} 加 {i}？", "chosen": f" {2 * i}", "rejected": f" {i}"} for i in range(1, 5)]
    string_pairs.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in string_rows), "utf-8")
    compute_reference_logps(params, base, {"train": prepared}, tmp_path / "reflogps")
    assert sorted(path.name for path in (tmp_path / "reflogps").iterdir()) == ["train.jsonl"]
    stored = [
        json.loads(line) for line in (tmp_path / "reflogps" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert stored[0]["chosen"][0]["content"] == "等于 0。很高兴帮忙 🙂" and stored[0]["ref_chosen_logps"] < 0
    summary = train_round(
        params,
        "r1",
        base,
        tmp_path / "reflogps",
        tmp_path / "policy",
        tmp_path / "ckpt",
        None,
        tmp_path / "plots.json",
        tmp_path / "metrics.json",
    )
    assert summary["steps"] == 3 and summary["train_loss_first"] > 0 and summary["train_loss_last"] > 0
    assert (tmp_path / "policy" / "model.safetensors").exists() and (tmp_path / "policy" / "adapter").is_dir()
    assert json.loads((tmp_path / "metrics.json").read_text())["round"] == "r1"
    # The guard scores string-format held-out pairs beside the conversational pairs the round trained on.
    guard = guard_round(params, "r1", tmp_path / "policy", base, base, string_pairs, tmp_path / "guard.json")
    assert guard["quality"] in ("ok", "failed-quality") and len(guard["sanity_examples"]) == 2
    assert guard["reference_eval_reward_accuracy"] is not None and guard["chosen_logp_drift"] != 0


@pytest.mark.parametrize("objective", ["orpo", "simpo"])
def test_reference_free_rounds_train_on_dpo_tokens_without_reference_logps(objective, tmp_path):
    """An ORPO or SimPO round: its reference_logps folder holds the pairs only (no reference is loaded), TRL's
    trainer for the objective runs on DPO's tokens, and the held-out reward margin its guard reports grows."""

    rows = [{"prompt": f"Q{i}: say yes.", "chosen": " yes", "rejected": " no no no"} for i in range(16)]
    raw = tmp_path / "pairs.jsonl"
    raw.write_text("".join(json.dumps(row) + "\n" for row in rows))
    params = load_params(
        ROOT / "params.yaml",
        {
            "dpo.rounds.r1.objective": objective,
            "dpo.train.max_steps": 12,
            "dpo.train.batch_size": 8,
            "dpo.train.learning_rate": 0.01,
            "dpo.guard.sanity_prompts": 1,
        },
    )
    base = tmp_path / "base"
    build_base(params, ROOT / "data/builtin/sft.jsonl", base)
    # The reference candidates do not exist: a reference-free round must not load one.
    round_reference_logps(params, "r1", tmp_path / "no-sft", tmp_path / "no-previous", raw, tmp_path / "ref")
    stored = [json.loads(line) for line in (tmp_path / "ref" / "train.jsonl").read_text().splitlines()]
    assert stored[0] == rows[0]
    summary = train_round(
        params, "r1", base, tmp_path / "ref", tmp_path / "policy", tmp_path / "ckpt", None,
        tmp_path / "plots.json", tmp_path / "metrics.json",
    )  # fmt: skip
    assert summary["objective"] == objective and summary["steps"] == 12
    assert summary["reference"] is None, "a reference-free round recorded a reference it never used"
    assert summary["train_loss_last"] < summary["train_loss_first"]
    guard = guard_round(params, "r1", tmp_path / "policy", tmp_path / "no-sft", base, raw, tmp_path / "guard.json")
    assert guard["reference"] is None and guard["reference_eval_reward_accuracy"] is None
    assert guard["eval_reward_accuracy"] == 1.0
    assert guard["eval_reward_margin"] > guard["start_eval_reward_margin"] + 0.1


def test_early_stopping_ends_a_round_whose_validation_loss_stops_falling_and_keeps_the_best_step(tmp_path):
    """Validation pairs that prefer the opposite of the training pairs: every step on the training pairs raises the
    validation DPO loss, so with patience 1 the round stops at its second evaluation and keeps the first."""
    train_rows = [{"prompt": f"Q{i}: say yes.", "chosen": " yes", "rejected": " no no no"} for i in range(16)]
    validation_rows = [{**row, "chosen": row["rejected"], "rejected": row["chosen"]} for row in train_rows[:8]]
    pairs, validation = tmp_path / "pairs.jsonl", tmp_path / "validation.jsonl"
    pairs.write_text("".join(json.dumps(row) + "\n" for row in train_rows))
    validation.write_text("".join(json.dumps(row) + "\n" for row in validation_rows))
    overrides = {
        "dpo.train.max_steps": 20, "dpo.train.batch_size": 8, "dpo.train.learning_rate": 0.01,
        "dpo.train.warmup_ratio": 0.0, "dpo.train.logging_steps": 1,
        "dpo.loss.types": ["sigmoid"], "dpo.loss.weights": None,
        "dpo.early_stopping.patience": 1, "dpo.early_stopping.eval_steps": 2,
    }  # fmt: skip
    params = load_params(ROOT / "params.yaml", overrides)
    base = tmp_path / "base"
    build_base(params, ROOT / "data/builtin/sft.jsonl", base)
    compute_reference_logps(params, base, {"train": pairs, "validation": validation}, tmp_path / "ref")
    summary = train_round(
        params, "r1", base, tmp_path / "ref", tmp_path / "policy", tmp_path / "ckpt", None,
        tmp_path / "plots.json", tmp_path / "metrics.json",
    )  # fmt: skip
    assert summary["steps"] == 4, "early stopping did not stop the round at its second evaluation"
    assert summary["best_step"] == 2 and summary["validation_pairs"] == 8
    assert summary["train_loss_last"] < summary["train_loss_first"], "the round did not train"


def test_early_stopping_sets_aside_a_seeded_slice_of_the_rounds_own_pairs(tmp_path):
    rows = [{"prompt": f"Q{i}", "chosen": " yes", "rejected": " no"} for i in range(40)]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert validation_split(pairs, EarlyStoppingParams(), 0, tmp_path) == {"train": pairs}  # off: all pairs train
    settings = EarlyStoppingParams(patience=2, validation_fraction=0.1)

    def split_prompts(seed: int) -> dict[str, list[str]]:
        scratch = tmp_path / f"seed{seed}-{len(list(tmp_path.iterdir()))}"
        scratch.mkdir()
        files = validation_split(pairs, settings, seed, scratch)
        return {name: [json.loads(line)["prompt"] for line in path.read_text().splitlines()] for name, path in
                files.items()}  # fmt: skip

    first = split_prompts(0)
    assert len(first["validation"]) == 4 and len(first["train"]) == 36
    assert not set(first["validation"]) & set(first["train"])
    assert split_prompts(0) == first, "the same seed set aside other pairs"
    assert split_prompts(1)["validation"] != first["validation"]
    with pytest.raises(DataError, match="validation_fraction"):
        validation_split(pairs, settings.model_copy(update={"validation_fraction": 0.99}), 0, tmp_path)


def test_a_round_may_set_its_own_learning_rate_and_epochs():
    params = load_params(
        ROOT / "params.yaml",
        {"dpo.rounds.r2": {"previous": "r1", "learning_rate": 1e-5}, "dpo.rounds.r3": {"previous": "r2", "epochs": 3}},
    )
    first, second, third = (round_training(params, params.dpo.rounds[name]) for name in ("r1", "r2", "r3"))
    assert first == params.dpo.train
    assert second.learning_rate == 1e-5 and second.epochs == params.dpo.train.epochs
    assert third.epochs == 3 and third.learning_rate == params.dpo.train.learning_rate


def test_a_finished_round_run_again_trains_afresh_to_the_same_steps_and_weights(tmp_path, monkeypatch):
    """DVC re-runs a finished round (`dvc repro -f`, an edited trainer, deleted outputs) with its checkpoint still
    there. Resuming it would train nothing with whole epochs (an edit would be ignored) and, with fractional ones,
    take extra steps past `max_steps` (transformers starts the next epoch before it checks), which a constant
    learning rate turns into different weights."""
    rows = [{"prompt": f"Q{i}: say yes.", "chosen": " yes", "rejected": " no no no"} for i in range(16)]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    overrides = {
        "dpo.train.epochs": 1.5, "dpo.train.batch_size": 8, "dpo.train.learning_rate": 0.01,
        "dpo.train.warmup_ratio": 0.0, "dpo.train.scheduler": "constant", "dpo.train.logging_steps": 1,
    }  # fmt: skip
    params = load_params(ROOT / "params.yaml", overrides)
    base = tmp_path / "base"
    build_base(params, ROOT / "data/builtin/sft.jsonl", base)
    compute_reference_logps(params, base, {"train": pairs}, tmp_path / "ref")

    def run(out: str) -> dict:
        return train_round(
            params, "r1", base, tmp_path / "ref", tmp_path / out, tmp_path / "ckpt", None,
            tmp_path / f"{out}-plots.json", tmp_path / f"{out}-metrics.json",
        )  # fmt: skip

    first = run("first")
    steps_taken = []
    training_step = DPOTrainer.training_step
    monkeypatch.setattr(
        DPOTrainer, "training_step", lambda self, *args, **kw: steps_taken.append(1) or training_step(self, *args, **kw)
    )
    again = run("again")
    assert len(steps_taken) == 3, f"the re-run trained {len(steps_taken)} steps of the round's 3"
    assert first["steps"] == 3 and again["steps"] == 3, "a re-run did not stop at the round's 3 steps"
    weights = "adapter/adapter_model.safetensors"
    assert (tmp_path / "first" / weights).read_bytes() == (tmp_path / "again" / weights).read_bytes()
