"""Stage `base`: the model every other stage starts from.

With `model.base: builtin` it builds, with no download, a byte-level BPE tokenizer trained on the
SFT data (ChatML chat template with generation markers) and a small randomly initialised Llama.
Otherwise it records the hub id or local folder to load, so big weights are not copied into DVC.
"""

from __future__ import annotations

from pathlib import Path

from tasks.lib.errors import DataError
from tasks.lib.files import atomic_path, write_json
from tasks.lib.policies import (
    BASE_SOURCE_FILE,
    BASE_TEMPLATE_FILE,
    check_model_source,
    is_builtin,
    read_chat_template,
    scrub_saved_configs,
)
from tasks.lib.records import read_records
from tasks.lib.schema import BuiltinModelParams, Params
from tasks.lib.stage import stage_main
from tasks.lib.timing import phase

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>\\n' }}{% endgeneration %}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def corpus_texts(path: Path, data_format: str) -> list[str]:
    """Every text field of the SFT rows. Rows `prepare` will reject are skipped here, not judged.

    A source with no usable row at all is refused here, before a tokenizer is built from nothing.
    """
    return [text for row in usable_sft_rows(path, data_format) for text in _strings(row)]


def usable_sft_rows(path: Path, data_format: str) -> list[dict]:
    result = read_records(path, "sft", data_format)
    if not result.rows:
        listing = "".join(f"\n{result.where(line)}: {reason}" for line, reason in result.bad[:5])
        raise DataError(f"{path} (data.sft): no usable SFT rows in {result.lines} lines{listing}")
    return result.rows


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [text for item in value for text in _strings(item)]
    if isinstance(value, dict):
        return [text for item in value.values() for text in _strings(item)]
    return []


def build_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    return tokenizer


def build_model(tokenizer, shape: BuiltinModelParams):
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(shape.seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    return model


def build_base(params: Params, corpus: Path, out: Path) -> None:
    """Write the base model folder (built-in) or a pointer to the hub id / folder to load.

    Args:
        params: the pipeline's params (`model` section)
        corpus: text the built-in tokenizer is trained on (the SFT data)
        out: the base folder
    """
    model = params.model
    usable_sft_rows(corpus, params.data.format)  # an unusable SFT source fails here, not after the base is built
    source = None if is_builtin(model) else check_model_source(model.base, model.revision)
    template = read_chat_template(model.chat_template) if model.chat_template else None
    with atomic_path(out) as scratch:
        scratch.mkdir()
        if source is not None:
            write_json(scratch / BASE_SOURCE_FILE, {"name_or_path": model.base, "revision": model.revision})
            if template is not None:
                (scratch / BASE_TEMPLATE_FILE).write_text(template, encoding="utf-8")
            print(f"base: {model.base} ({source}), loaded by each stage that needs it")
        else:
            tokenizer = build_tokenizer(corpus_texts(corpus, params.data.format), model.builtin.vocab_size)
            tokenizer.chat_template = template or CHAT_TEMPLATE
            network = build_model(tokenizer, model.builtin)
            with phase("save"):
                network.save_pretrained(scratch)
                tokenizer.save_pretrained(scratch)
            scrub_saved_configs(scratch)
            print(f"built-in base: {sum(p.numel() for p in network.parameters()):,} parameters, vocab {len(tokenizer)}")


if __name__ == "__main__":
    stage_main(build_base)
