"""Stage `dpo@<round>`: one DPO round with TRL's DPOTrainer on stored reference log-probs (or, for a round whose
objective is ORPO or SimPO, TRL's reference-free ORPOTrainer / CPOTrainer on the same tokens).

The round starts from the previous policy (the SFT snapshot for the first round), trains full
weights or a LoRA adapter (then merged, so the next round starts from a plain model), and runs
the collapse guard: held-out chosen log-prob drift against the reference and a greedy-generation
sanity check. A round past the guard's thresholds is marked `failed-quality` in its metrics.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
from pathlib import Path

from tasks.lib.chat import adds_special_tokens, render
from tasks.lib.distributed import check_replicas_agree, is_main, world_size
from tasks.lib.errors import QualityGateFailed
from tasks.lib.files import atomic_path, load_records, load_splits, write_json
from tasks.lib.hashing import file_digest
from tasks.lib.policies import ADAPTER_DIR, load_model, load_tokenizer, merge_adapter, save_policy, scrub_saved_configs
from tasks.lib.schema import EarlyStoppingParams, GuardParams, Params, RoundParams, TrainingParams
from tasks.lib.stage import stage_main
from tasks.lib.timing import phase
from tasks.lib.training import (
    REF_COLUMNS,
    dpo_sequence_config,
    dpo_trainer_class,
    final_model_dir,
    logged_history,
    lora_config,
    publish_logs,
    reference_free_trainer,
    resume_checkpoint,
    training_arguments,
)

PLOTTED = (
    "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
    "logps/chosen", "logps/rejected",
)  # fmt: skip


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


def dpo_trainer(params: Params, checkpoints: Path, training: dict, trainer_arguments: dict):
    """TRL's DPOTrainer reading the round's stored reference log-probs (no reference model in memory)."""
    loss = params.dpo.loss
    config = dpo_sequence_config(
        params,
        checkpoints,
        **{**training, **early_stopping_arguments(params.dpo.early_stopping)},
        precompute_ref_log_probs=True,
        loss_type=list(loss.types),
        loss_weights=loss.weights,
        beta=loss.beta,
        label_smoothing=loss.label_smoothing,
        ld_alpha=loss.ld_alpha,
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


def distinct_trigram_ratio(tokens: list[int]) -> float:
    trigrams = [tuple(tokens[i : i + 3]) for i in range(len(tokens) - 2)]
    return len(set(trigrams)) / len(trigrams) if trigrams else 1.0


def sanity_generations(model, tokenizer, prompts: list, guard: GuardParams) -> list[dict]:
    """Greedy answers to held-out prompts, each judged non-degenerate or not."""
    import torch

    results = []
    model.eval()
    for prompt in prompts:
        text = render(tokenizer, prompt)
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=adds_special_tokens(prompt)).to(model.device)
        with torch.no_grad():
            output = model.generate(
                **inputs,
                max_new_tokens=guard.sanity_max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        new_tokens = output[0, inputs["input_ids"].shape[1] :].tolist()
        text = tokenizer.decode(new_tokens, skip_special_tokens=True)
        ratio = distinct_trigram_ratio(new_tokens)
        results.append(
            {
                "response": text,
                "distinct_trigrams": ratio,
                "passed": bool(text.strip()) and ratio >= guard.min_distinct_trigrams,
            }
        )
    return results


def guard_verdict(guard: GuardParams, drift: float, pass_rate: float) -> list[str]:
    reasons = []
    if drift < -guard.max_chosen_logp_drop:
        reasons.append(
            f"held-out chosen log-prob fell by {-drift:.2f} nats (dpo.guard.max_chosen_logp_drop: "
            f"{guard.max_chosen_logp_drop})"
        )
    if pass_rate < guard.min_sanity_pass_rate:
        reasons.append(
            f"only {pass_rate:.0%} of sanity generations passed (dpo.guard.min_sanity_pass_rate: "
            f"{guard.min_sanity_pass_rate:.0%})"
        )
    return reasons


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
    """Train round `round_name` from `policy`; write the candidate policy, its plots and guarded metrics.

    A round past the collapse guard's thresholds is marked `failed-quality` (and stops the run when
    `dpo.guard.fail_run` is set).

    Args:
        params: the pipeline's params
        round_name: the round, a key of `dpo.rounds`
        policy: policy the round starts from
        reference_logps: the round's reference log-probs folder (from reference_logps@<round>)
        out: the round's trained candidate policy
        checkpoints: resumable trainer checkpoints
        logs: TensorBoard folder (none: no TensorBoard logs)
        plots: per-step training curves (DVC plots file)
        metrics: the stage's metrics (losses, held-out rewards, collapse guard verdict)
    """
    spec = params.dpo.rounds[round_name]
    lora = params.dpo.method == "lora"
    tokenizer = load_tokenizer(str(policy), params.model)
    model = load_model(str(policy), params.model, quantize=lora)
    data = load_splits({split: reference_logps / f"{split}.jsonl" for split in ("train", "eval")})
    fingerprint = {
        "dpo": params.dpo.model_dump(mode="json", exclude={"rounds"}),
        "round": spec.model_dump(),
        "pairs": file_digest(reference_logps / "train.jsonl"),
    }
    resume = resume_checkpoint(checkpoints, fingerprint)
    trainer_arguments = {
        "model": model,
        "train_dataset": data["train"],
        "eval_dataset": data["eval"],
        "processing_class": tokenizer,
        "peft_config": lora_config(params.dpo.lora) if lora else None,
    }
    training = training_arguments(round_training(params, spec), checkpoints, logs, params.tracking, f"dpo@{round_name}")
    if spec.objective == "dpo":
        trainer = dpo_trainer(params, checkpoints, training, trainer_arguments)
        reference_chosen = statistics.fmean(data["eval"]["ref_chosen_logps"])
        start = None
    else:
        trainer = reference_free_trainer(
            spec.objective, params, {**training, "eval_strategy": "no"}, **trainer_arguments
        )
        # No reference: the drift is measured against the starting policy, in the trainer's own units.
        start = trainer.evaluate()
        reference_chosen = start["eval_logps/chosen"]
    trainer.train(resume_from_checkpoint=resume)
    evaluation = trainer.evaluate()
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
        prompts = [row["prompt"] for row in load_records(reference_logps / "eval.jsonl")][
            : params.dpo.guard.sanity_prompts
        ]
        sanity = sanity_generations(merged, tokenizer, prompts, params.dpo.guard)

    drift = evaluation["eval_logps/chosen"] - reference_chosen
    pass_rate = sum(item["passed"] for item in sanity) / len(sanity)
    reasons = guard_verdict(params.dpo.guard, drift, pass_rate)
    train_losses = [row["loss"] for row in history if "loss" in row]
    summary = {
        "round": round_name,
        "previous": spec.previous,
        "reference": spec.reference_used,
        "steps": trainer.state.global_step,
        "best_step": trainer.state.best_global_step if params.dpo.early_stopping.patience else None,
        "train_loss_first": train_losses[0] if train_losses else None,
        "train_loss_last": train_losses[-1] if train_losses else None,
        "eval_loss": evaluation["eval_loss"],
        "eval_reward_accuracy": evaluation["eval_rewards/accuracies"],
        "eval_reward_margin": evaluation["eval_rewards/margins"],
        "objective": spec.objective,
        "start_eval_reward_margin": start["eval_rewards/margins"] if start else None,
        "reference_eval_reward_accuracy": _reference_accuracy(data["eval"]) if spec.objective == "dpo" else None,
        "chosen_logp_drift": drift,
        "chosen_logp_drift_against": "reference (sum per sequence)"
        if spec.objective == "dpo"
        else ("the starting policy (mean per token)"),
        "sanity_pass_rate": pass_rate,
        "sanity_examples": sanity[:3],
        "quality": "failed-quality" if reasons else "ok",
        "guard_reasons": reasons,
    }
    publish_logs(checkpoints, logs)
    write_json(
        plots, [{"step": row["step"], **{k: row[k] for k in PLOTTED if k in row}} for row in history if "loss" in row]
    )
    write_json(metrics, summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "sanity_examples"}, indent=2))
    if resume:
        print(f"dpo@{round_name}: resumed from {Path(resume).name}")
    if reasons:
        shout(round_name, reasons)
        if params.dpo.guard.fail_run:
            raise QualityGateFailed(f"round {round_name} failed the collapse guard (dpo.guard.fail_run: true)")
    return summary


def _reference_accuracy(eval_data) -> float:
    """Held-out preference accuracy of the reference itself (chosen strictly more likely)."""
    pairs = zip(eval_data["ref_chosen_logps"], eval_data["ref_rejected_logps"], strict=True)
    return statistics.fmean(float(chosen > rejected) for chosen, rejected in pairs)


def shout(name: str, reasons: list[str]) -> None:
    bar = "!" * 78
    print(
        f"\n{bar}\nCOLLAPSE GUARD: round {name} is FAILED-QUALITY\n"
        + "\n".join(f"  - {r}" for r in reasons)
        + "\nLower dpo.train.learning_rate, raise dpo.loss.beta, or add an sft term to dpo.loss.types.\n"
        + f"{bar}\n",
        file=sys.stderr,
    )


if __name__ == "__main__":
    stage_main(train_round)
