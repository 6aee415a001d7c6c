"""Settings the trainers share: TrainingArguments from params, LoRA, DPO tokenisation, resumable checkpoints.

`dpo_sequence_config` is the one place DPO's tokenisation is set, so the reference log-prob stage
and the DPO stage see exactly the same tokens.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks.lib import distributed
from tasks.lib.errors import SettingError
from tasks.lib.files import atomic_path, load_records, load_splits, read_json
from tasks.lib.policies import has_cuda, load_model, load_tokenizer
from tasks.lib.schema import LoraParams, Params, TrackingParams, TrainingParams

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
"""Columns of stored reference log-probabilities, as TRL's precompute pass names them."""
PAIR_COLUMNS = ("prompt", "chosen", "rejected")
HIDDEN_PREFIX = "pair_"
"""Pair columns renamed with this prefix are invisible to TRL's dataset passes (they look for `prompt`, `chosen`)."""


def pairs_only(path: Path) -> list[dict]:
    """A pairs file's rows with only the preference columns (stored reference log-probs and extra fields dropped)."""
    return [{column: row[column] for column in PAIR_COLUMNS} for row in load_records(path)]


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


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def trackers(tracking: TrackingParams, logs_dir: Path | None) -> list[str]:
    """The `report_to` list for transformers, with each tracker pointed where params say (through the environment,
    the only way transformers' callbacks read their settings). No logs folder (a stage called from a test): none."""
    if logs_dir is None:
        return []
    missing = [name for name in tracking.report_to if importlib.util.find_spec(TRACKER_PACKAGES[name]) is None]
    if missing:
        raise SettingError(
            f"tracking.report_to: {', '.join(missing)} not installed (pip install {' '.join(missing)}, "
            "or remove it from the list)"
        )
    logs_dir.mkdir(parents=True, exist_ok=True)
    # transformers 5 reads TensorBoard's folder from the environment only.
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(logs_dir)
    if "wandb" in tracking.report_to:
        os.environ.setdefault("WANDB_MODE", tracking.wandb_mode)
        os.environ.setdefault("WANDB_PROJECT", tracking.wandb_project)
        os.environ.setdefault("WANDB_DIR", str(Path(tracking.wandb_dir).resolve()))
        Path(os.environ["WANDB_DIR"]).mkdir(parents=True, exist_ok=True)
    if "mlflow" in tracking.report_to:
        uri = tracking.mlflow_tracking_uri  # a URL, or a path: MLflow's local SQLite store (its file store is retired)
        os.environ.setdefault("MLFLOW_TRACKING_URI", uri if "://" in uri else f"sqlite:///{Path(uri).resolve()}")
        os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", tracking.mlflow_experiment)
    return list(tracking.report_to)


LIVE_LOGS = "tensorboard"
"""The trainers' TensorBoard folder while they train, inside the stage's checkpoints (a resumed run appends to it)."""


def publish_logs(checkpoint_dir: Path, logs_dir: Path | None) -> None:
    """Put the run's TensorBoard folder into the stage's `logs` output, whole (a killed run leaves none there)."""
    if logs_dir is None:
        return
    live = checkpoint_dir / LIVE_LOGS
    with atomic_path(logs_dir) as scratch:
        if live.is_dir():
            shutil.copytree(live, scratch)
        else:
            scratch.mkdir()


def checkpointing_field() -> str:
    """transformers 5.20+ renamed `gradient_checkpointing` (FutureWarning); older releases know only the old name."""
    from dataclasses import fields

    from transformers import TrainingArguments

    names = {field.name for field in fields(TrainingArguments)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def training_arguments(
    train: TrainingParams,
    checkpoint_dir: Path,
    logs_dir: Path | None,
    tracking: TrackingParams | None = None,
    run_name: str | None = None,
) -> dict[str, Any]:
    """The keyword arguments SFTConfig and DPOConfig share, from a TrainingParams section."""
    return {
        "run_name": run_name,
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
        checkpointing_field(): train.gradient_checkpointing,
        "bf16": use_bf16(train.bf16),
        "use_cpu": not has_cuda(),
        "save_strategy": "steps",
        "save_steps": train.save_steps,
        "save_total_limit": train.save_total_limit,
        "logging_steps": train.logging_steps,
        "logging_first_step": True,  # a run shorter than logging_steps still reports its loss
        "seed": train.seed,
        "data_seed": train.seed,
        # TensorBoard writes beside the checkpoints while training; `publish_logs` puts the folder in place whole.
        "report_to": trackers(tracking or TrackingParams(), checkpoint_dir / LIVE_LOGS if logs_dir else None),
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


def stored_reference_trainer_class():
    """DPOTrainer that takes reference log-probs from the dataset instead of recomputing them.

    TRL's precompute mode already reads `ref_chosen_logps`/`ref_rejected_logps` from each batch;
    only its up-front pass is replaced, by a check that the stored columns are there.
    """

    class StoredReferenceDPOTrainer(dpo_trainer_class()):
        def _precompute_ref_logps(self, dataset, name, batch_size):
            missing = [column for column in REF_COLUMNS if column not in dataset.column_names]
            if missing:
                raise ValueError(f"{name} dataset lacks stored reference log-probs {missing}")
            return dataset

    return StoredReferenceDPOTrainer


def dpo_loss_arguments(params: Params) -> dict:
    """DPOConfig's loss settings from `dpo.loss` (training and the guard's held-out evaluation share them)."""
    loss = params.dpo.loss
    return {
        "loss_type": list(loss.types),
        "loss_weights": loss.weights,
        "beta": loss.beta,
        "label_smoothing": loss.label_smoothing,
        "ld_alpha": loss.ld_alpha,
    }


def reference_logps_datasets(params: Params, reference: Path, splits: dict[str, Path]) -> dict:
    """Each split's pairs with their log-probabilities under `reference` (TRL's precompute; `splits` has "train").

    On several processes TRL shards the batches and gathers them in order, so every process returns all rows.
    """
    tokenizer = load_tokenizer(str(reference), params.model)
    model = load_model(str(reference), params.model)
    data = load_splits(splits)
    others = {name: dataset for name, dataset in data.items() if name != "train"}
    with tempfile.TemporaryDirectory() as scratch_dir:
        config = dpo_sequence_config(
            params,
            Path(scratch_dir),
            precompute_ref_log_probs=True,
            precompute_ref_batch_size=params.reference.batch_size,
        )
        trainer = dpo_trainer_class()(
            model=model,
            args=config,
            train_dataset=data["train"],
            eval_dataset=others or None,
            processing_class=tokenizer,
        )
    return {"train": trainer.train_dataset, **(trainer.eval_dataset or {})}


def truncated(ids: list[int], mask: list[int], max_length: int, mode: str) -> tuple[list[int], list[int]]:
    """A sequence and its completion mask cut to `max_length` as TRL's DPO collator cuts them."""
    cut = slice(None, max_length) if mode == "keep_start" else slice(-max_length, None)
    return ids[cut], mask[cut]


def dpo_trainer_class():
    """TRL's DPOTrainer with its pairs tokenised by `tasks.lib.chat.preference_ids`, the split SFT, sampling and the
    reference-free trainers use too (TRL's own would cut a Mistral-style prompt where its system message moved)."""
    from trl import DPOTrainer

    from tasks.lib.chat import preference_ids

    class ProjectTokenisedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            def tokenize(row):
                ids = preference_ids(processing_class, row["prompt"], row["chosen"], row["rejected"])
                return dict(zip(("prompt_ids", "chosen_ids", "rejected_ids"), ids, strict=True))

            dataset = dataset.map(tokenize, desc=f"Tokenizing {dataset_name} dataset")
            if args.max_length is not None and args.truncation_mode == "keep_start":
                # As TRL does: a prompt that alone fills max_length leaves no completion token to learn from.
                dataset = dataset.filter(lambda row: len(row["prompt_ids"]) < args.max_length)
            return dataset

    return ProjectTokenisedDPOTrainer


def reference_free_row(tokenizer, row: dict, max_length: int, mode: str) -> dict[str, list[int]]:
    """A pair in the tokenised form TRL's ORPO and CPO trainers train on, from DPO's own ids and truncation."""
    from tasks.lib.chat import preference_ids

    prompt_ids, *responses = preference_ids(tokenizer, row["prompt"], row["chosen"], row["rejected"])
    features = {"prompt_input_ids": prompt_ids, "prompt_attention_mask": [1] * len(prompt_ids)}
    for side, response_ids in zip(("chosen", "rejected"), responses, strict=True):
        ids, mask = truncated(
            prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids), max_length, mode
        )
        features[f"{side}_input_ids"] = ids
        features[f"{side}_attention_mask"] = [1] * len(ids)
        features[f"{side}_labels"] = [token if learned else -100 for token, learned in zip(ids, mask, strict=True)]
    return features


def reference_free_trainer(objective: str, params: Params, training: dict[str, Any], **trainer_arguments):
    """TRL's ORPOTrainer (`orpo`) or CPOTrainer with the SimPO loss (`simpo`), tokenising pairs as DPO does.

    The pair columns are handed over under other names, so TRL's own prompt extraction and chat-template pass
    leave them alone, and `tokenize_row` (the trainers' per-row hook) builds each row from DPO's ids.
    """
    from trl.import_utils import TRLExperimentalWarning

    # Chosen knowingly: the trainers live in trl.experimental. A filter, not TRL's environment switch, which would
    # leak into every process this one starts.
    warnings.filterwarnings("ignore", category=TRLExperimentalWarning)
    settings = params.dpo.reference_free
    sequence = params.dpo.sequence
    common = {**training, "max_length": sequence.max_length, "remove_unused_columns": False}
    if objective == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        trainer_class, config = ORPOTrainer, ORPOConfig(**common, beta=settings.orpo_lambda)
    else:
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        trainer_class = CPOTrainer
        config = CPOConfig(
            **common,
            loss_type="simpo",
            beta=settings.simpo_beta,
            simpo_gamma=settings.simpo_gamma,
            cpo_alpha=settings.simpo_sft_weight,
        )

    class DPOTokenisedTrainer(trainer_class):
        def tokenize_row(self, feature, model=None):
            row = {column: feature[HIDDEN_PREFIX + column] for column in PAIR_COLUMNS}
            return reference_free_row(self.processing_class, row, sequence.max_length, sequence.truncation_mode)

    for split in ("train_dataset", "eval_dataset"):
        if trainer_arguments.get(split) is None:
            continue
        trainer_arguments[split] = trainer_arguments[split].rename_columns(
            {column: HIDDEN_PREFIX + column for column in PAIR_COLUMNS}
        )
    return DPOTokenisedTrainer(args=config, **trainer_arguments)


CLAIM_WAIT_S = 600


def final_model_dir(checkpoint_dir: Path) -> Path:
    """Where every process calls `trainer.save_model` (a collective under FSDP/DeepSpeed; rank 0 writes), before
    rank 0 moves the files into the stage's output."""
    return checkpoint_dir / "final"


def resume_checkpoint(checkpoint_dir: Path, fingerprint: dict[str, Any]) -> str | None:
    """The latest checkpoint of an interrupted run of the *same* stage inputs, else None.

    Checkpoints written under other params or inputs are deleted: resuming them would
    silently mix two runs. So is a *finished* run's (DVC re-runs a stage on purpose: `dvc repro -f`, an
    edited helper, deleted outputs): transformers starts the next epoch before it checks `max_steps`, so
    with fractional epochs a resumed finished run takes extra steps, and it would skip any code change.
    """
    if claim_checkpoint_dir(checkpoint_dir, fingerprint, lambda folder: is_unfinished(latest_checkpoint(folder))):
        return str(latest_checkpoint(checkpoint_dir))
    return None


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    checkpoints = sorted(checkpoint_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return checkpoints[-1] if checkpoints else None


def is_unfinished(checkpoint: Path | None) -> bool:
    """Whether `checkpoint` is a trainer checkpoint short of its run's last step (None or a vanished one: no)."""
    if checkpoint is None or not (checkpoint / "trainer_state.json").exists():  # rank 0 may be clearing the folder
        return False
    progress = read_json(checkpoint / "trainer_state.json")
    control = progress.get("stateful_callbacks", {}).get("TrainerControl", {}).get("args", {})
    stopped = control.get("should_training_stop", False)  # early stopping ends a run short of max_steps
    return progress["global_step"] < progress["max_steps"] and not stopped


def claim_checkpoint_dir(
    checkpoint_dir: Path, fingerprint: dict[str, Any], resumable: Callable[[Path], bool] | None = None
) -> bool:
    """True if `checkpoint_dir` holds partial work of the same inputs (that `resumable` accepts, when given);
    otherwise empty it, stamp it, False.

    On several processes rank 0 claims; the others wait until the folder carries this run's stamp.
    """
    stamp = checkpoint_dir / "fingerprint.json"
    expected = json.loads(json.dumps(fingerprint))
    if not distributed.is_main():
        deadline = time.monotonic() + CLAIM_WAIT_S
        while not (stamp.exists() and read_json(stamp) == expected):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{checkpoint_dir}: rank 0 did not claim it within {CLAIM_WAIT_S} s")
            time.sleep(0.05)
        return any(checkpoint_dir.glob("checkpoint-*")) if resumable is None else resumable(checkpoint_dir)
    if stamp.exists() and read_json(stamp) == expected and (resumable is None or resumable(checkpoint_dir)):
        return True
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    checkpoint_dir.mkdir(parents=True)
    partial = stamp.with_name(stamp.name + ".partial")  # other processes poll the stamp: it appears whole
    partial.write_text(json.dumps(fingerprint, sort_keys=True))
    os.replace(partial, stamp)
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
