"""tasks/lib/training.py: the experiment trackers a training stage logs to (TensorBoard, W&B offline, MLflow's
local store), each pointed where `tracking` says; a tracker that is not installed is one clear error."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tasks.lib.errors import SettingError
from tasks.lib.params import load_params

ROOT = Path(__file__).resolve().parents[1]
ROWS = [{"prompt": f"Count to {i}:", "completion": " " + " ".join(str(n) for n in range(1, i + 2))} for i in range(8)]


@pytest.fixture
def private_environment(monkeypatch, tmp_path):
    """The trackers' environment variables set by the code under test stay in this test."""
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if not k.startswith(("WANDB", "MLFLOW"))})
    monkeypatch.chdir(tmp_path)
    # A stage run in this process before (tests/test_determinism.py) hid the trackers it did not use.
    for package in ("wandb", "mlflow"):
        if package in sys.modules and sys.modules[package] is None:
            monkeypatch.delitem(sys.modules, package)


def test_one_training_run_logs_to_tensorboard_wandb_offline_and_mlflow(tmp_path, private_environment):
    from datasets import Dataset, DatasetDict
    from transformers import LlamaConfig, LlamaForCausalLM

    from tasks.base import build_base
    from tasks.lib.policies import load_base_tokenizer
    from tasks.lib.training import publish_logs
    from tasks.sft import sft_trainer

    params = load_params(
        ROOT / "params.yaml",
        {
            "tracking.report_to": ["tensorboard", "wandb", "mlflow"],
            "sft.train.max_steps": 2,
            "sft.train.logging_steps": 1,
        },
    )
    build_base(params, ROOT / "data/builtin/sft.jsonl", tmp_path / "base")
    tokenizer = load_base_tokenizer(tmp_path / "base", params.model)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2))  # fmt: skip
    data = DatasetDict(train=Dataset.from_list(ROWS), heldout=Dataset.from_list(ROWS[:2]))
    trainer, _ = sft_trainer(params, model, tokenizer, data, tmp_path / "checkpoints", tmp_path / "logs")
    trainer.train()
    trainer.accelerator.end_training()  # closes the trackers' runs, as a stage process does when it exits
    assert not list((tmp_path / "logs").rglob("events.out.tfevents.*")), "the logs output was written live"
    publish_logs(tmp_path / "checkpoints", tmp_path / "logs")  # as the stage does once it has succeeded

    assert list((tmp_path / "logs").rglob("events.out.tfevents.*"))
    (run,) = (tmp_path / "wandb" / "wandb").glob("offline-run-*")
    assert list(run.glob("*.wandb"))
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sft-dpo")
    (logged,) = client.search_runs([experiment.experiment_id])
    assert logged.info.run_name == "sft" and "loss" in logged.data.metrics


def test_a_tracker_that_is_not_installed_is_named(tmp_path, private_environment, monkeypatch):
    from tasks.lib import training

    monkeypatch.setitem(training.TRACKER_PACKAGES, "wandb", "sftdpo_no_such_package")
    params = load_params(ROOT / "params.yaml", {"tracking.report_to": ["tensorboard", "wandb"]})
    with pytest.raises(SettingError, match=r"tracking.report_to: wandb not installed \(pip install wandb"):
        training.trackers(params.tracking, tmp_path / "logs")
