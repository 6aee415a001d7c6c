"""Helpers shared by the stages: atomic outputs, model loading, training arguments, log capture.

Heavy libraries (torch, transformers) are imported inside functions so that every stage's
``--help`` and params validation stay fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

from tasks.config import BUILTIN, ModelParams, Params, ParamsError, TrainingParams, load_params

BASE_SOURCE_FILE = "source.json"
BAD_INPUT_EXIT = 2
"""Exit status of a stage refused its input (params, data, arguments): retrying cannot help."""


def exit_bad_input(message: str) -> None:
    """Stop a stage whose input is wrong, with the message and the exit status orchestrators do not retry."""
    print(message, file=sys.stderr)
    sys.exit(BAD_INPUT_EXIT)


def stage_params(path: str | Path) -> Params:
    """Validate params.yaml before a stage does any work; exit with the schema's message if invalid."""
    try:
        return load_params(path)
    except ParamsError as error:
        exit_bad_input(f"invalid params:\n{error}")


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a scratch path beside `final` that replaces `final` only if the block finishes.

    A stage that fails part-way leaves no half-written output posing as a whole one.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent)) / final.name
    try:
        yield scratch
        if final.is_dir():
            shutil.rmtree(final)
        elif final.exists():
            final.unlink()
        os.replace(scratch, final)
    finally:
        shutil.rmtree(scratch.parent, ignore_errors=True)


def write_json(path: str | Path, payload: Any) -> None:
    with atomic_path(path) as scratch:
        scratch.write_text(json.dumps(payload, indent=2, ensure_ascii=False, sort_keys=False) + "\n", encoding="utf-8")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def resolve_base(base_dir: str | Path) -> tuple[str, str | None]:
    """Where to load the base model from: the built folder itself, or the hub id/path it points to."""
    base_dir = Path(base_dir)
    source_file = base_dir / BASE_SOURCE_FILE
    if source_file.exists():
        source = read_json(source_file)
        return source["name_or_path"], source.get("revision")
    return str(base_dir), None


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def load_model(path: str, model: ModelParams, revision: str | None = None, quantize: bool = False):
    """`AutoModelForCausalLM.from_pretrained` with the dtype, attention and quantization from params."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"trust_remote_code": model.trust_remote_code}
    if revision:
        kwargs["revision"] = revision
    if model.dtype != "auto":
        kwargs["dtype"] = getattr(torch, model.dtype)
    else:
        kwargs["dtype"] = "auto"
    if model.attn_implementation:
        kwargs["attn_implementation"] = model.attn_implementation
    if quantize and model.quantization == "4bit":
        compute = torch.bfloat16 if has_cuda() and torch.cuda.is_bf16_supported() else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=model.bnb_4bit_quant_type,
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_use_double_quant=True,
        )
    elif quantize and model.quantization == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def load_tokenizer(path: str, model: ModelParams, revision: str | None = None):
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": model.trust_remote_code}
    if revision:
        kwargs["revision"] = revision
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def lora_config(lora, task_type: str = "CAUSAL_LM"):
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
        "seed": train.seed,
        "data_seed": train.seed,
        "report_to": ["tensorboard"] if logs_dir is not None else [],
        "disable_tqdm": not sys.stderr.isatty(),
        "dataloader_num_workers": 0,
    }


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
    return [{"step": entry.get("step", 0), **{k: float(v) for k, v in entry.items() if _is_number(v)}}
            for entry in trainer.state.log_history]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_builtin(model: ModelParams) -> bool:
    return model.base == BUILTIN


def save_policy(model, tokenizer, out_dir: Path, max_shard_size: str = "5GB") -> None:
    """Save a standalone Hugging Face model folder (safetensors, tokenizer, generation config)."""
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out_dir)
