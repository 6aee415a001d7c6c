"""tasks/sft.py's loss masks on real tokenizers: the built-in ChatML, Qwen3's official template (TRL patches it),
a template with no generation markers (last assistant turn), and stories260K's plain strings (completion only)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import CONVERSATION, real_artifact

from tasks.lib.params import load_params
from tasks.sft import sft_trainer

ROOT = Path(__file__).resolve().parents[1]
# A Mistral-like template: no {% generation %} markers and none TRL knows how to patch.
MARKERLESS_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]\n{{ m['content'] }}{% if m['role'] == 'assistant' %}"
    "{{ eos_token }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}[assistant]\n{% endif %}"
)

# Llama-3.1-like: writes its own BOS text, a system block with today's date, no generation markers.
LLAMA3_TEMPLATE = (Path(__file__).parent / "templates/llama3_like.jinja").read_text()
# Mistral-like (v0.3): BOS text, the system message moved into the *last* user turn, alternation enforced.
MISTRAL_TEMPLATE = (Path(__file__).parent / "templates/mistral_like.jinja").read_text()
LONG_ENOUGH = {"sft.max_length": 1024, "dpo.sequence.max_length": 1024}
"""No truncation: a 512-token SentencePiece vocabulary spells a Llama 3 system block in hundreds of tokens."""
ON_STORIES_TOKENIZER = {"llama3": LLAMA3_TEMPLATE, "mistral": MISTRAL_TEMPLATE}
"""Templates tried on stories260K's SentencePiece tokenizer, which adds a BOS token by default (double-BOS risk)."""


@pytest.fixture(scope="module")
def builtin_base(tmp_path_factory) -> Path:
    from tasks.base import build_base

    out = tmp_path_factory.mktemp("base") / "base"
    build_base(load_params(ROOT / "params.yaml"), ROOT / "data/builtin/sft.jsonl", out)
    return out


def tokenizer_named(name: str, builtin_base: Path):
    from transformers import AutoTokenizer

    if name in ("qwen3", "qwen3-nothink", "stories260K", *ON_STORIES_TOKENIZER):
        folder = real_artifact("tokenizers/qwen3" if name.startswith("qwen3") else "models/stories260K")
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if name == "qwen3-nothink":  # model.enable_thinking: false, as load_tokenizer applies it
            from tasks.lib.policies import with_thinking

            tokenizer.chat_template = with_thinking(tokenizer.chat_template, enabled=False)
        if name in ON_STORIES_TOKENIZER:
            tokenizer.chat_template = ON_STORIES_TOKENIZER[name]
    else:
        tokenizer = AutoTokenizer.from_pretrained(builtin_base)
        if name == "markerless":
            tokenizer.chat_template = MARKERLESS_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tiny_model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    return LlamaForCausalLM(config)


def first_example(name: str, rows: list[dict], builtin_base: Path, tmp_path: Path):
    from datasets import Dataset, DatasetDict

    tokenizer = tokenizer_named(name, builtin_base)
    data = DatasetDict(train=Dataset.from_list(rows), heldout=Dataset.from_list(rows))
    params = load_params(ROOT / "params.yaml", LONG_ENOUGH)
    trainer, loss_mask = sft_trainer(params, tiny_model(tokenizer), tokenizer, data, tmp_path / "checkpoints", None)
    return tokenizer, trainer.train_dataset[0], loss_mask


def learned_text(tokenizer, example: dict) -> str:
    """The text of the tokens the loss covers (TRL's tokenised rows carry labels, -100 where the loss is masked)."""
    ids = [label for label in example["labels"] if label != -100]
    return tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize(
    ("name", "expected_mask", "learned"),
    [
        ("builtin", "assistant_tokens", ["Hello there!", "The answer is 4."]),
        ("qwen3", "last_assistant_turn", ["The answer is 4."]),
        ("qwen3-nothink", "last_assistant_turn", ["The answer is 4."]),
        ("markerless", "last_assistant_turn", ["The answer is 4."]),
        ("llama3", "last_assistant_turn", ["The answer is 4."]),
        ("mistral", "last_assistant_turn", ["The answer is 4."]),
    ],
)
def test_loss_covers_exactly_the_assistant_text_the_template_allows(
    name, expected_mask, learned, builtin_base, tmp_path
):
    tokenizer, example, loss_mask = first_example(name, [{"messages": CONVERSATION}], builtin_base, tmp_path)
    assert loss_mask == expected_mask
    text = learned_text(tokenizer, example)
    for message in CONVERSATION:
        if message["content"] in learned:
            assert message["content"] in text
        else:
            assert message["content"] not in text, f"{message['role']} text is in the loss"
    # Nothing but the assistant text (and the template's own markup around it) is learned.
    leftover = text
    for content in learned:
        leftover = leftover.replace(content, "")
    assert len(leftover.strip()) <= 40, leftover
    bos = tokenizer.bos_token_id
    assert bos is None or example["input_ids"].count(bos) <= 1, "double BOS"


def test_thinking_off_puts_the_empty_think_block_in_the_prompt_not_in_what_sft_learns(builtin_base, tmp_path):
    from tasks.lib.params import load_params as params_with
    from tasks.lib.policies import load_tokenizer

    off = params_with(ROOT / "params.yaml", {"model.enable_thinking": False}).model
    tokenizer = load_tokenizer(str(real_artifact("tokenizers/qwen3")), off)
    prompt = tokenizer.apply_chat_template(CONVERSATION[:-1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    tokenizer, example, _ = first_example("qwen3-nothink", [{"messages": CONVERSATION}], builtin_base, tmp_path)
    learned = tokenizer.decode([label for label in example["labels"] if label != -100])  # special tokens kept
    assert learned == "The answer is 4.<|im_end|>\n"


def test_string_rows_learn_the_completion_only_with_a_single_bos(builtin_base, tmp_path):
    rows = [{"prompt": "Once upon a time, there was a cat.", "completion": " The cat was very happy."}]
    tokenizer, example, loss_mask = first_example("stories260K", rows, builtin_base, tmp_path)
    assert loss_mask == "completion"
    assert learned_text(tokenizer, example).strip() == "The cat was very happy."
    assert example["input_ids"][0] == tokenizer.bos_token_id and example["input_ids"][1] != tokenizer.bos_token_id


def dpo_example(tokenizer, row: dict, tmp_path: Path) -> dict:
    from datasets import Dataset

    from tasks.lib.training import dpo_sequence_config, dpo_trainer_class

    params = load_params(ROOT / "params.yaml", LONG_ENOUGH)
    config = dpo_sequence_config(params, tmp_path / "dpo", precompute_ref_log_probs=True)
    rows = Dataset.from_list([row])
    trainer = dpo_trainer_class()(
        model=tiny_model(tokenizer), args=config, train_dataset=rows, processing_class=tokenizer
    )
    return trainer.train_dataset[0]


@pytest.mark.parametrize(
    "name",
    [
        "builtin",
        "qwen3",
        "qwen3-nothink",
        "markerless",
        "stories260K",
        "llama3",
        "mistral",
    ],
)
def test_dpo_generation_and_sft_see_one_rendering(name, builtin_base, tmp_path):
    """DPO's prompt + chosen ids are SFT's ids of the same conversation; the generate stage's prompt is DPO's; one BOS.

    With the Mistral-like template the system message moves into the last user turn, so the prompt alone is not a
    prefix of the conversation: the split keeps the prompt exactly as sampling sees it (system message included)."""
    from tasks.lib.chat import adds_special_tokens, preference_ids, render

    strings = name == "stories260K"
    if strings:
        pair = {"prompt": "Once upon a time, there was a cat.", "chosen": " It was happy.", "rejected": " It was sad."}
        sft_row = {"prompt": pair["prompt"], "completion": pair["chosen"]}
    else:
        pair = {
            "prompt": CONVERSATION[:-1],
            "chosen": CONVERSATION[-1:],
            "rejected": [{"role": "assistant", "content": "5"}],
        }
        sft_row = {"messages": CONVERSATION}
    tokenizer, sft, _ = first_example(name, [sft_row], builtin_base, tmp_path)
    dpo = dpo_example(tokenizer, pair, tmp_path)
    assert dpo["prompt_ids"] + dpo["chosen_ids"] == sft["input_ids"]
    # ORPO and SimPO rounds are fed the same ids as DPO.
    assert preference_ids(tokenizer, pair["prompt"], pair["chosen"], pair["rejected"]) == (
        dpo["prompt_ids"],
        dpo["chosen_ids"],
        dpo["rejected_ids"],
    )
    if tokenizer.bos_token_id is not None:
        assert sft["input_ids"].count(tokenizer.bos_token_id) <= 1, "double BOS"
    # The generate stage renders the prompt and tokenises it as the sampler does (one BOS for the string rows).
    rendered = render(tokenizer, pair["prompt"])
    special = adds_special_tokens(pair["prompt"])
    assert tokenizer(rendered, add_special_tokens=special)["input_ids"] == dpo["prompt_ids"]


# Gemma-like: the generation prompt ends with an empty thought block that the full conversation does not render.
THOUGHT_PROMPT_TEMPLATE = MARKERLESS_TEMPLATE.replace(
    "[assistant]\n{% endif %}", "[assistant]\n<thought></thought>{% endif %}"
)


@pytest.mark.parametrize(
    ("name", "boundary"),
    [
        ("builtin", "prefix"),
        ("qwen3", "prefix"),
        ("markerless", "prefix"),
        ("stories260K", "prefix"),
        ("llama3", "prefix"),
        ("mistral", "inference_prompt"),
        ("thought", "common_prefix"),
    ],
)
def test_data_report_names_how_the_prompt_boundary_was_found(name, boundary, builtin_base):
    from tasks.lib.chat import boundary_report

    tokenizer = tokenizer_named("markerless" if name == "thought" else name, builtin_base)
    if name == "thought":
        tokenizer.chat_template = THOUGHT_PROMPT_TEMPLATE
    if name == "stories260K":
        rows = [{"prompt": "Once upon a time,", "completion": " a cat."}]
    else:
        rows = [
            {"messages": CONVERSATION},
            {
                "prompt": CONVERSATION[:-1],
                "chosen": CONVERSATION[-1:],
                "rejected": [{"role": "assistant", "content": "5"}],
            },
        ]
    report = boundary_report(rows, tokenizer)
    assert report["prompt_boundary"] == boundary
    counts = {"inference_prompt": 0, "common_prefix": 0}
    if boundary != "prefix":
        counts[boundary] = 2  # the conversation and the pair
    assert report["rows_inference_prompt"] == counts["inference_prompt"]
    assert report["rows_common_prefix"] == counts["common_prefix"]
    assert report.get("example_dropped") == ("<thought></thought>" if boundary == "common_prefix" else None)
