"""How a prompt and a response become the text a model sees, in either data format.

String rows are concatenated; message-list rows go through the tokenizer's chat template. Every
stage that builds model input (generate, judge, dpo, evaluate, data reports) renders through here.
"""

from __future__ import annotations

from typing import Any


def render(tokenizer, prompt: Any, response: Any = None) -> str:
    """Text the model sees for a prompt (and optional response), in either format."""
    if isinstance(prompt, list):
        messages = prompt + (response or [])
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=response is None)
    return prompt + (response or "")


def adds_special_tokens(prompt: Any) -> bool:
    """Whether a prompt's rendered text is tokenised with the tokenizer's special tokens (its BOS), as TRL does.

    TRL tokenises a string row with the tokenizer's defaults (a Llama/SentencePiece tokenizer adds BOS) and a
    conversation through the chat template, which writes its own BOS or none. Generation and evaluation follow the
    same rule, so a prompt has the same ids in SFT, DPO, sampling and lm-eval.
    """
    return isinstance(prompt, str)


def last_content(value: Any) -> str:
    """The text of a string field, or of the last message of a message-list field."""
    return value if isinstance(value, str) else value[-1]["content"]


def as_response(prompt: Any, text: str) -> Any:
    """A response text in the prompt's format: an assistant message list for a message-list prompt."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def sft_loss_mask(tokenizer, conversational: bool) -> str:
    """How the SFT loss finds the tokens to learn, by data format and what the chat template supports.

    - `completion`: string rows; the loss covers the completion (TRL's completion-only loss).
    - `assistant_tokens`: every assistant turn; the template marks them with `{% generation %}`.
    - `last_assistant_turn`: no generation markers; each conversation is trained as prompt (everything before its
      last assistant turn) + completion (that turn), rendered by the model's own template and split where the
      prompt's render stops matching the full render.

    Only a template with its own generation markers masks every assistant turn: TRL's patched training variants
    (Qwen3's keeps an empty `<think>` block in earlier turns, which the official template drops) would train SFT
    on a rendering that DPO, generation and evaluation, which use the model's own template, never see.
    """
    from trl.chat_template_utils import has_generation_markers

    if not conversational:
        return "completion"
    return "assistant_tokens" if has_generation_markers(tokenizer.chat_template) else "last_assistant_turn"


def last_turn_example(row: dict) -> dict:
    """A `messages` row as prompt (everything before its last assistant message) and completion (that message)."""
    messages = row["messages"]
    last = max(i for i, message in enumerate(messages) if message["role"] == "assistant")
    return {"prompt": messages[:last], "completion": [messages[last]]}


def prompt_response_pairs(row: dict) -> list[tuple[Any, Any]]:
    """The (prompt, response) pairs a row trains on: SFT's prompt + completion, or a pair's chosen and rejected."""
    if "messages" in row:
        example = last_turn_example(row)
        return [(example["prompt"], example["completion"])]
    if "completion" in row:
        return [(row["prompt"], row["completion"])]
    return [(row["prompt"], row["chosen"]), (row["prompt"], row["rejected"])]


def _ids(tokenizer, prompt: Any, response: Any = None) -> list[int]:
    return tokenizer(render(tokenizer, prompt, response), add_special_tokens=adds_special_tokens(prompt))["input_ids"]


def preference_ids(tokenizer, prompt: Any, chosen: Any, rejected: Any) -> tuple[list[int], list[int], list[int]]:
    """A pair's prompt, chosen and rejected token ids exactly as TRL's DPOTrainer tokenises it.

    String responses get the EOS token appended (TRL does it for non-conversational rows); the responses start where
    the prompt's ids and the full sequence's diverge. The reference-free trainers (ORPO, SimPO), whose own
    tokenisation differs (they append EOS after a chat template's end-of-turn too), are fed these ids, so every
    round sees the same tokens whatever its objective.
    """
    if isinstance(chosen, str):
        eos = tokenizer.eos_token
        chosen, rejected = (text if text.endswith(eos) else text + eos for text in (chosen, rejected))
    prompt_ids = _ids(tokenizer, prompt)
    chosen_ids, rejected_ids = _ids(tokenizer, prompt, chosen), _ids(tokenizer, prompt, rejected)
    start = min(common_prefix_length(prompt_ids, chosen_ids), common_prefix_length(prompt_ids, rejected_ids))
    return prompt_ids[:start], chosen_ids[start:], rejected_ids[start:]


def common_prefix_length(ids: list[int], other_ids: list[int]) -> int:
    """Leading tokens two sequences share (TRL's rule; kept here so light stages need not import TRL)."""
    shorter = min(len(ids), len(other_ids))
    return next((i for i in range(shorter) if ids[i] != other_ids[i]), shorter)


def boundary_report(rows: list[dict], tokenizer) -> dict[str, Any]:
    """Where the response starts in each row, as TRL's SFT and DPO trainers find it, and how often that is not clean.

    The prompt is rendered alone (with the generation prompt) and with its response; the response starts where the two
    token sequences diverge. `prefix`: for every row the prompt's tokens are a prefix of the full sequence, so training,
    sampling and evaluation see the same prompt. `common_prefix`: for some rows they are not (a template that renders
    the prompt alone differently, e.g. a generation prompt the full render drops, or tokens merging across the
    boundary); the end of the prompt that differs is left out of those training sequences (`example_dropped` shows it).
    """
    not_prefix, example = 0, None
    for row in rows:
        for prompt, response in prompt_response_pairs(row):
            prompt_ids = _ids(tokenizer, prompt)
            common = common_prefix_length(prompt_ids, _ids(tokenizer, prompt, response))
            if common < len(prompt_ids):
                not_prefix += 1
                example = example or tokenizer.decode(prompt_ids[common:])
                break
    return {
        "prompt_boundary": "common_prefix" if not_prefix else "prefix",
        "rows_prompt_not_prefix": not_prefix,
        **({"example_dropped": example} if example is not None else {}),
    }
