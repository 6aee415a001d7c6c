"""Model folders: loading a base or policy as params say, saving, merging a LoRA adapter, and scrubbing.

A policy folder is a standalone Hugging Face model (safetensors, tokenizer, generation config); a
LoRA round keeps its adapter in `adapter/` beside the merged weights, and a round's policy after
the promotion gate carries `promotion.json` naming the round whose training it holds.
Heavy libraries are imported inside functions: stages that only validate or hash stay light.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tasks.lib.errors import SettingError
from tasks.lib.files import read_json
from tasks.lib.schema import BUILTIN, SFT_POLICY, ModelParams
from tasks.lib.timing import phase

BASE_SOURCE_FILE = "source.json"
"""In a base folder: the hub id or folder to load, when the base is not built locally."""
BASE_TEMPLATE_FILE = "chat_template.jinja"
"""In a base folder that points elsewhere: the `model.chat_template` that replaces the tokenizer's own."""
ADAPTER_DIR = "adapter"
PROMOTION_FILE = "promotion.json"
TRAINED_PAIRS_FILE = "trained_pairs.jsonl"
"""In a round's candidate (and the policy the gate promotes from it): the preference pairs it was trained on,
which a later round replays from (`onpolicy.pairs.replay_fraction`)."""


def skip_bitsandbytes_unless_quantized(model: ModelParams) -> None:
    """Keep bitsandbytes out of a process that does not quantize.

    peft and TRL import it whenever it is installed, which costs seconds per stage process on a CPU
    machine; a `None` entry in `sys.modules` makes them see it as absent (Python's own convention).
    """
    if model.quantization == "none" and "bitsandbytes" not in sys.modules:
        sys.modules["bitsandbytes"] = None


def skip_unused_trackers(report_to: list[str]) -> None:
    """Keep W&B and MLflow out of a process that does not log to them: TRL imports wandb whenever it is installed
    (0.3 s of every TRL stage's start-up, measured with `python -X importtime`). Same convention as above."""
    for package in ("wandb", "mlflow"):
        if package not in report_to and package not in sys.modules:
            sys.modules[package] = None


def is_builtin(model: ModelParams) -> bool:
    return model.base == BUILTIN


def check_model_source(name_or_path: str, revision: str | None) -> str:
    """Where `model.base` will load from (`folder` or `hub`), or SettingError saying why it cannot.

    A folder must hold a `config.json`. Anything else is a hub id: offline it must be in the local cache;
    online the hub must know it. Checked when the base is recorded, so that a typo fails there with one line
    instead of as a download traceback in a later stage.
    """
    from huggingface_hub import constants, repo_exists, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    folder = Path(name_or_path)
    if folder.is_dir():
        if not (folder / "config.json").exists():
            raise SettingError(f"model.base {name_or_path}: a folder without config.json (not a model folder)")
        return "folder"
    missing = f"model.base {name_or_path}: not a folder and not a hub id in the local cache"
    if name_or_path.startswith(("/", ".", "~")):  # a path, not an id
        raise SettingError(missing)
    try:
        cached = isinstance(try_to_load_from_cache(name_or_path, "config.json", revision=revision), str)
    except HFValidationError as error:
        raise SettingError(f"model.base {name_or_path}: not a folder and not a valid hub id ({error})") from None
    if cached:
        return "hub"
    if constants.HF_HUB_OFFLINE:
        raise SettingError(missing)
    try:
        known = repo_exists(name_or_path)
    except Exception as error:  # whatever stops the question (network, auth) is reported in its own words
        raise SettingError(f"model.base {name_or_path}: not a folder; the hub could not be asked ({error})") from None
    if not known:
        raise SettingError(f"model.base {name_or_path}: not a folder and not a model on the hub")
    return "hub"


def resolve_base(base_dir: str | Path) -> tuple[str, str | None]:
    """Where to load the base model from: the built folder itself, or the hub id/path it points to."""
    base_dir = Path(base_dir)
    source_file = base_dir / BASE_SOURCE_FILE
    if source_file.exists():
        source = read_json(source_file)
        return source["name_or_path"], source.get("revision")
    return str(base_dir), None


def read_chat_template(path: str) -> str:
    """The text of a `model.chat_template` file, or SettingError naming the file (and line) when it cannot serve."""
    from jinja2 import TemplateSyntaxError
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        template = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise SettingError(f"model.chat_template {path}: cannot be read ({error.strerror})") from None
    try:
        _compile_jinja_template(template)  # transformers' own environment: its extensions ({% generation %}) parse
    except TemplateSyntaxError as error:
        raise SettingError(
            f"model.chat_template {path}:{error.lineno}: not a valid Jinja template: {error.message}"
        ) from None
    return template


def load_base_tokenizer(base_dir: str | Path, model: ModelParams):
    """The base model's tokenizer as every stage must see it: from the built folder or the source it points to,
    with the `model.chat_template` the base stage stored."""
    name_or_path, revision = resolve_base(base_dir)
    stored = Path(base_dir) / BASE_TEMPLATE_FILE
    template = (
        stored.read_text(encoding="utf-8") if (Path(base_dir) / BASE_SOURCE_FILE).exists() and stored.exists() else None
    )
    return load_tokenizer(name_or_path, model, revision, chat_template=template)


def base_window(base_dir: str | Path, model: ModelParams) -> int | None:
    """The longest sequence the base model takes, read from its config as lm-eval's `hf` model reads it."""
    from transformers import AutoConfig

    name_or_path, revision = resolve_base(base_dir)
    config = AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=model.trust_remote_code)
    config = getattr(config, "text_config", None) or config
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):  # lm-eval's HFLM.max_length order
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    return None


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def load_model(path: str, model: ModelParams, revision: str | None = None, quantize: bool = False):
    """`AutoModelForCausalLM.from_pretrained` with the dtype, attention and quantization from params."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"trust_remote_code": model.trust_remote_code}
    if revision:
        kwargs["revision"] = revision
    kwargs["dtype"] = "auto" if model.dtype == "auto" else getattr(torch, model.dtype)
    if model.attn_implementation:
        kwargs["attn_implementation"] = model.attn_implementation
    if quantize and model.quantization != "none":
        kwargs["quantization_config"] = _quantization_config(model)
    with phase("load"):
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def _quantization_config(model: ModelParams):
    import torch
    from transformers import BitsAndBytesConfig

    if model.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.bfloat16 if has_cuda() and torch.cuda.is_bf16_supported() else torch.float32
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=model.bnb_4bit_quant_type,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_use_double_quant=True,
    )


def load_tokenizer(path: str, model: ModelParams, revision: str | None = None, chat_template: str | None = None):
    """`AutoTokenizer.from_pretrained`, with a replacement chat template, `model.enable_thinking` and a pad token."""
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": model.trust_remote_code}
    if revision:
        kwargs["revision"] = revision
    with phase("load"):
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if model.enable_thinking is not None and isinstance(tokenizer.chat_template, str):
        tokenizer.chat_template = with_thinking(tokenizer.chat_template, model.enable_thinking)
    if tokenizer.pad_token is None:
        # Batches need a pad token; padding is masked out of every loss and attention, so EOS serves.
        print(f"{path}: the tokenizer has no pad token; using its EOS token {tokenizer.eos_token!r} as pad")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


THINKING_SETTING = "{%- set enable_thinking = "
"""How `model.enable_thinking` is written into a template: every renderer (ours, TRL's, lm-eval's) then sees it."""


def with_thinking(template: str, enabled: bool) -> str:
    """The template with `enable_thinking` set at its top (replacing a setting written there before)."""
    if template.startswith(THINKING_SETTING):
        template = template.split("%}", 1)[1]
    return f"{THINKING_SETTING}{'true' if enabled else 'false'} %}}{template}"


def save_policy(model, tokenizer, out_dir: Path, max_shard_size: str = "5GB") -> None:
    """Save a standalone Hugging Face model folder (safetensors, tokenizer, generation config)."""
    with phase("save"):
        model.save_pretrained(out_dir, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(out_dir)


def adapter_of(policy: Path) -> Path | None:
    adapter = Path(policy) / ADAPTER_DIR
    return adapter if (adapter / "adapter_config.json").exists() else None


def merge_adapter(base: str | Path, adapter: Path, dtype: str):
    """Base weights + LoRA adapter -> one plain transformers model (unquantized, in `dtype`)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with phase("load"):
        model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype))
        return PeftModel.from_pretrained(model, adapter).merge_and_unload()


def scrub_saved_configs(folder: Path) -> None:
    """Make the configs transformers and peft saved in `folder` portable and byte-reproducible.

    Drops build-machine paths (`_name_or_path`, the adapter's base path) and load-time flags that say how
    the model was loaded rather than what it is (`local_files_only` follows HF_HUB_OFFLINE); sorts the
    adapter's `target_modules`, which peft writes in set order (a different order on each run).
    """
    for name in ("config.json", "adapter_config.json", "tokenizer_config.json"):
        path = folder / name
        if not path.exists():
            continue
        config = json.loads(path.read_text())
        for key in ("_name_or_path", "base_model_name_or_path"):
            if key in config and str(config[key]).startswith("/"):
                config[key] = None
        config.pop("local_files_only", None)
        if isinstance(config.get("target_modules"), list):
            config["target_modules"] = sorted(config["target_modules"])
        path.write_text(json.dumps(config, indent=2) + "\n")


def trained_round(policy: Path) -> str:
    """The round whose training a policy folder holds (`sft` for the SFT snapshot)."""
    promotion = Path(policy) / PROMOTION_FILE
    return read_json(promotion)["source"] if promotion.exists() else SFT_POLICY
