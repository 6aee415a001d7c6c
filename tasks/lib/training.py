"""Settings the trainers share: TrainingArguments from params, LoRA, DPO tokenisation, resumable checkpoints.

`dpo_sequence_config` is the one place DPO's tokenisation is set, so the reference log-prob stage
and the DPO stage see exactly the same tokens.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from tasks.lib.files import read_json
from tasks.lib.policies import has_cuda
from tasks.lib.schema import LoraParams, Params, TrainingParams

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
"""Columns of stored reference log-probabilities, as TRL's precompute pass names them."""
PAIR_COLUMNS = ("prompt", "chosen", "rejected")


def lora_config(lora: LoraParams, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type=task_type,
    )


def use_bf16(setting: bool | str) -> bool:
    if setting == "auto":
        import torch

        return has_cuda() and torch.cuda.is_bf16_supported()
    return bool(setting)


def training_arguments(train: TrainingParams, checkpoint_dir: Path, logs_dir: Path | None) -> dict[str, Any]:
    """The keyword arguments SFTConfig and DPOConfig share, from a TrainingParams section."""
    if logs_dir is not None:
        # transformers 5 reads TensorBoard's folder from the environment only.
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(logs_dir)
    return {
        "output_dir": str(checkpoint_dir),
        "learning_rate": train.learning_rate,
        "num_train_epochs": train.epochs,
        "max_steps": train.max_steps,
        "per_device_train_batch_size": train.batch_size,
        "per_device_eval_batch_size": train.batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation,
        "warmup_steps": train.warmup_ratio,
        "lr_scheduler_type": train.scheduler,
        "weight_decay": train.weight_decay,
        "gradient_checkpointing": train.gradient_checkpointing,
        "bf16": use_bf16(train.bf16),
        "use_cpu": not has_cuda(),
        "save_strategy": "steps",
        "save_steps": train.save_steps,
        "save_total_limit": train.save_total_limit,
        "logging_steps": train.logging_steps,
        "logging_first_step": True,  # a run shorter than logging_steps still reports its loss
        "seed": train.seed,
        "data_seed": train.seed,
        "report_to": ["tensorboard"] if logs_dir is not None else [],
        "disable_tqdm": not sys.stderr.isatty(),
        "dataloader_num_workers": 0,
    }


def dpo_sequence_config(params: Params, checkpoint_dir: Path, **extra):
    """A DPOConfig carrying the tokenisation settings shared by the reference log-prob and DPO stages."""
    from trl import DPOConfig

    settings = {
        "output_dir": str(checkpoint_dir),
        "max_length": params.dpo.sequence.max_length,
        "truncation_mode": params.dpo.sequence.truncation_mode,
        "use_cpu": not has_cuda(),
        "bf16": False,
        "report_to": [],
    }
    return DPOConfig(**{**settings, **extra})


def resume_checkpoint(checkpoint_dir: Path, fingerprint: dict[str, Any]) -> str | None:
    """The latest checkpoint of an interrupted run of the *same* stage inputs, else None.

    Checkpoints written under other params or inputs are deleted: resuming them would
    silently mix two runs.
    """
    if claim_checkpoint_dir(checkpoint_dir, fingerprint):
        checkpoints = sorted(checkpoint_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        if checkpoints:
            return str(checkpoints[-1])
    return None


def claim_checkpoint_dir(checkpoint_dir: Path, fingerprint: dict[str, Any]) -> bool:
    """True if `checkpoint_dir` holds partial work of the same inputs; otherwise empty it, stamp it, False."""
    stamp = checkpoint_dir / "fingerprint.json"
    if stamp.exists() and read_json(stamp) == json.loads(json.dumps(fingerprint)):
        return True
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    checkpoint_dir.mkdir(parents=True)
    stamp.write_text(json.dumps(fingerprint, sort_keys=True))
    return False


def logged_history(trainer) -> list[dict[str, Any]]:
    """Every logged dict of the run, with its step, numbers only.

    Read from the trainer's state rather than collected by a callback, so that a run resumed from a
    checkpoint still reports the losses logged before the interruption.
    """
    # Keys sorted: a resumed run reloads the history from a checkpoint's JSON in another key order.
    return [
        {"step": entry.get("step", 0), **{k: float(v) for k, v in sorted(entry.items()) if _is_number(v)}}
        for entry in trainer.state.log_history
    ]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
