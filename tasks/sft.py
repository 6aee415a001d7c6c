"""Stage `sft`: supervised fine-tuning of the base model with TRL's SFTTrainer.

Full fine-tune or LoRA; the loss covers only completion / assistant tokens, found as the tokenizer's chat
template allows (tasks/lib/chat.py `sft_loss_mask`; the strategy used is in the stage's metrics). Writes the trained
policy (full weights or an adapter), per-step losses as a DVC plots file, TensorBoard logs and
metrics (first/last train loss, held-out eval loss). An interrupted run resumes from its last
checkpoint when params and data are unchanged.
"""

from __future__ import annotations

import shutil
from functools import partial
from pathlib import Path

from tasks.lib.chat import completion_ids, sft_loss_mask
from tasks.lib.distributed import check_replicas_agree, is_main, world_size
from tasks.lib.files import atomic_path, write_json
from tasks.lib.hashing import file_digest
from tasks.lib.policies import load_base_tokenizer, load_model, resolve_base, scrub_saved_configs
from tasks.lib.schema import Params
from tasks.lib.stage import stage_main
from tasks.lib.timing import phase
from tasks.lib.training import (
    final_model_dir,
    logged_history,
    lora_config,
    publish_logs,
    resume_checkpoint,
    training_arguments,
)


def losses(history: list[dict], key: str = "loss") -> list[float]:
    return [row[key] for row in history if key in row]


def sft_trainer(params: Params, model, tokenizer, data, checkpoints: Path, logs: Path | None):
    """TRL's SFTTrainer over `data` (train and heldout splits), with the loss mask the chat template allows."""
    from trl import SFTConfig, SFTTrainer

    conversational = "messages" in data["train"].column_names
    loss_mask = sft_loss_mask(tokenizer, conversational)
    if loss_mask != "assistant_tokens":
        # Tokenised here, by the split every stage uses (tasks/lib/chat.py), not by TRL's own common-prefix rule.
        data = data.map(partial(completion_ids, tokenizer), remove_columns=data["train"].column_names)
    config = SFTConfig(
        **training_arguments(params.sft.train, checkpoints, logs, params.tracking, run_name="sft"),
        max_length=params.sft.max_length,
        assistant_only_loss=loss_mask == "assistant_tokens",
        completion_only_loss=loss_mask != "assistant_tokens",
        eval_strategy="no",
        packing=False,
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=data["train"],
        eval_dataset=data["heldout"],
        processing_class=tokenizer,
        peft_config=lora_config(params.sft.lora) if params.sft.method == "lora" else None,
    )
    return trainer, loss_mask


def train_sft(
    params: Params,
    base: Path,
    train: Path,
    heldout: Path,
    out: Path,
    checkpoints: Path,
    logs: Path | None,
    plots: Path,
    metrics: Path,
) -> dict:
    """Fine-tune the base on `train`, evaluate on `heldout`, save the policy to `out`.

    Args:
        params: the pipeline's params
        base: the base folder
        train: SFT training rows (JSON lines)
        heldout: held-out SFT rows (JSON lines)
        out: the trained policy folder (full weights or a LoRA adapter)
        checkpoints: resumable trainer checkpoints
        logs: TensorBoard folder (none: no TensorBoard logs)
        plots: per-step losses (DVC plots file)
        metrics: the stage's metrics
    """
    from datasets import load_dataset

    name_or_path, revision = resolve_base(base)
    tokenizer = load_base_tokenizer(base, params.model)
    model = load_model(name_or_path, params.model, revision, quantize=params.sft.method == "lora")
    data = load_dataset("json", data_files={"train": str(train), "heldout": str(heldout)})
    fingerprint = {
        "sft": params.sft.model_dump(mode="json"),
        "model": params.model.model_dump(mode="json"),
        "train": file_digest(train),
    }
    resume = resume_checkpoint(checkpoints, fingerprint)
    trainer, loss_mask = sft_trainer(params, model, tokenizer, data, checkpoints, logs)
    trainer.train(resume_from_checkpoint=resume)
    evaluation = trainer.evaluate()
    history = logged_history(trainer)
    agreement = check_replicas_agree(trainer.model)
    if agreement and is_main():
        print(f"world size {world_size()}: {agreement}")
    final = final_model_dir(checkpoints)
    with phase("save"):
        trainer.save_model(str(final))
    if not is_main():
        return {}  # rank 0 writes the outputs
    with atomic_path(out) as scratch, phase("save"):
        shutil.move(final, scratch)
        tokenizer.save_pretrained(scratch)
        scrub_saved_configs(scratch)
    train_losses = losses(history)
    summary = {
        "method": params.sft.method,
        "loss_mask": loss_mask,
        "steps": trainer.state.global_step,
        "train_loss_first": train_losses[0] if train_losses else None,
        "train_loss_last": train_losses[-1] if train_losses else None,
        "eval_loss": evaluation["eval_loss"],
    }
    publish_logs(checkpoints, logs)
    write_json(plots, [row for row in history if "loss" in row])
    write_json(metrics, summary)
    # Whether it resumed is a fact of this run, not of its result: printed, not in the metrics.
    resumed_from = Path(resume).name if resume else None
    print(
        f"sft: loss {summary['train_loss_first']:.3f} -> {summary['train_loss_last']:.3f} "
        f"(loss on: {loss_mask}) "
        f"in {summary['steps']} steps, held-out loss {summary['eval_loss']:.3f}"
        + (f" (resumed from {resumed_from})" if resumed_from else "")
    )
    return {**summary, "resumed_from": resumed_from}


if __name__ == "__main__":
    stage_main(train_sft)
