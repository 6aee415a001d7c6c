"""Stage `dpo@<round>`: one DPO round with TRL's DPOTrainer on stored reference log-probs (or, for a round whose
objective is ORPO or SimPO, TRL's reference-free ORPOTrainer / CPOTrainer on the same tokens).

The round starts from the previous policy (the SFT snapshot for the first round) and trains full
weights or a LoRA adapter (then merged, so the next round starts from a plain model). It reads only its own
pairs: the collapse guard on the held-out pairs is the next stage, `guard@<round>` (tasks/guard.py), so a new
held-out set never retrains a round. With early stopping on, the round is stopped on the validation slice of
its pairs that `reference_logps@<round>` set aside.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tasks.lib.distributed import check_replicas_agree, is_main, world_size
from tasks.lib.files import atomic_path, load_splits, write_json, write_records
from tasks.lib.hashing import file_digest
from tasks.lib.policies import (
    ADAPTER_DIR,
    TRAINED_PAIRS_FILE,
    load_model,
    load_tokenizer,
    merge_adapter,
    save_policy,
    scrub_saved_configs,
)
from tasks.lib.schema import EarlyStoppingParams, Params, RoundParams, TrainingParams
from tasks.lib.stage import stage_main
from tasks.lib.timing import phase
from tasks.lib.training import (
    dpo_loss_arguments,
    dpo_sequence_config,
    final_model_dir,
    logged_history,
    lora_config,
    pairs_only,
    publish_logs,
    reference_free_trainer,
    resume_checkpoint,
    stored_reference_trainer_class,
    training_arguments,
)

PLOTTED = (
    "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
    "logps/chosen", "logps/rejected",
)  # fmt: skip


def dpo_trainer(params: Params, checkpoints: Path, training: dict, trainer_arguments: dict):
    """TRL's DPOTrainer reading the round's stored reference log-probs (no reference model in memory)."""
    config = dpo_sequence_config(
        params,
        checkpoints,
        **{**training, **early_stopping_arguments(params.dpo.early_stopping)},
        precompute_ref_log_probs=True,
        **dpo_loss_arguments(params),
    )
    return stored_reference_trainer_class()(
        ref_model=None, args=config, callbacks=early_stopping_callbacks(params.dpo.early_stopping), **trainer_arguments
    )


def early_stopping_arguments(settings: EarlyStoppingParams) -> dict:
    """Trainer settings for early stopping: evaluate and checkpoint every `eval_steps`, end on the best checkpoint."""
    if settings.patience is None:
        return {"eval_strategy": "no"}
    return {
        "eval_strategy": "steps",
        "eval_steps": settings.eval_steps,
        "save_steps": settings.eval_steps,  # the best checkpoint can only be one that was saved
        "load_best_model_at_end": True,
        "metric_for_best_model": settings.metric,
        "greater_is_better": settings.metric != "eval_loss",
    }


def early_stopping_callbacks(settings: EarlyStoppingParams) -> list:
    if settings.patience is None:
        return []
    from transformers import EarlyStoppingCallback

    return [EarlyStoppingCallback(early_stopping_patience=settings.patience)]


def round_training(params: Params, spec: RoundParams) -> TrainingParams:
    """`dpo.train` with the round's own learning rate and epochs, where it sets them."""
    own = {"learning_rate": spec.learning_rate, "epochs": spec.epochs}
    return params.dpo.train.model_copy(update={key: value for key, value in own.items() if value is not None})


def write_trained_pairs(reference_logps: Path, out: Path) -> None:
    """The round's pairs (every split, without reference columns) beside the candidate, for later rounds' replay."""
    splits = [reference_logps / f"{split}.jsonl" for split in ("train", "validation")]
    write_records(out, [row for split in splits if split.is_file() for row in pairs_only(split)])


def train_round(
    params: Params,
    round_name: str,
    policy: Path,
    reference_logps: Path,
    out: Path,
    checkpoints: Path,
    logs: Path | None,
    plots: Path,
    metrics: Path,
) -> dict:
    """Train round `round_name` from `policy`; write the candidate policy, its training curves and metrics.

    Args:
        params: the pipeline's params
        round_name: the round, a key of `dpo.rounds`
        policy: policy the round starts from
        reference_logps: the round's reference log-probs folder (from reference_logps@<round>)
        out: the round's trained candidate policy
        checkpoints: resumable trainer checkpoints
        logs: TensorBoard folder (none: no TensorBoard logs)
        plots: per-step training curves (DVC plots file)
        metrics: the stage's metrics (steps, losses, the early-stopping step)
    """
    spec = params.dpo.rounds[round_name]
    lora = params.dpo.method == "lora"
    stops_early = spec.objective == "dpo" and params.dpo.early_stopping.patience is not None
    tokenizer = load_tokenizer(str(policy), params.model)
    model = load_model(str(policy), params.model, quantize=lora)
    splits = ("train", "validation") if stops_early else ("train",)
    data = load_splits({split: reference_logps / f"{split}.jsonl" for split in splits})
    fingerprint = {
        "dpo": params.dpo.model_dump(mode="json", exclude={"rounds"}),
        "round": spec.model_dump(),
        "pairs": file_digest(reference_logps / "train.jsonl"),
    }
    resume = resume_checkpoint(checkpoints, fingerprint)
    trainer_arguments = {
        "model": model,
        "train_dataset": data["train"],
        "eval_dataset": data["validation"] if stops_early else None,
        "processing_class": tokenizer,
        "peft_config": lora_config(params.dpo.lora) if lora else None,
    }
    training = training_arguments(round_training(params, spec), checkpoints, logs, params.tracking, f"dpo@{round_name}")
    if spec.objective == "dpo":
        trainer = dpo_trainer(params, checkpoints, training, trainer_arguments)
    else:
        trainer = reference_free_trainer(
            spec.objective, params, {**training, "eval_strategy": "no"}, **trainer_arguments
        )
    trainer.train(resume_from_checkpoint=resume)
    history = logged_history(trainer)
    agreement = check_replicas_agree(trainer.model)
    if agreement and is_main():
        print(f"world size {world_size()}: {agreement}")
    final = final_model_dir(checkpoints)
    if lora:
        with phase("save"):
            trainer.save_model(str(final))
    if not is_main():
        return {}  # rank 0 writes the outputs

    with atomic_path(out) as scratch:
        if lora:
            scratch.mkdir()
            shutil.move(final, scratch / ADAPTER_DIR)
            merged = merge_adapter(policy, scratch / ADAPTER_DIR, params.merge.dtype)
        else:
            merged = trainer.model
        save_policy(merged, tokenizer, scratch)
        scrub_saved_configs(scratch)
        scrub_saved_configs(scratch / ADAPTER_DIR)
        write_trained_pairs(reference_logps, scratch / TRAINED_PAIRS_FILE)

    train_losses = [row["loss"] for row in history if "loss" in row]
    summary = {
        "round": round_name,
        "previous": spec.previous,
        "reference": spec.reference_used,
        "objective": spec.objective,
        "pairs": len(data["train"]),
        "steps": trainer.state.global_step,
        "train_loss_first": train_losses[0] if train_losses else None,
        "train_loss_last": train_losses[-1] if train_losses else None,
        "validation_pairs": len(data["validation"]) if stops_early else None,
        "best_step": trainer.state.best_global_step if stops_early else None,
        "best_validation_metric": trainer.state.best_metric if stops_early else None,
    }
    publish_logs(checkpoints, logs)
    write_json(
        plots, [{"step": row["step"], **{k: row[k] for k in PLOTTED if k in row}} for row in history if "loss" in row]
    )
    write_json(metrics, summary)
    print(json.dumps(summary, indent=2))
    if resume:
        print(f"dpo@{round_name}: resumed from {Path(resume).name}")
    return summary


if __name__ == "__main__":
    stage_main(train_round)
