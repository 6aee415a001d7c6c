"""How a prompt and a response become the text a model sees, in either data format.

String rows are concatenated; message-list rows go through the tokenizer's chat template. Every
stage that builds model input (generate, judge, dpo, evaluate, data reports) renders through here.
"""

from __future__ import annotations

from dataclasses import dataclass
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
      last assistant turn) + completion (that turn), rendered by the model's own template and split by `split_ids`,
      as DPO's pairs are.

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


BOUNDARY_STRATEGIES = ("prefix", "inference_prompt", "common_prefix")
"""How a response's first token is found, from the cleanest to the last resort (see `split_ids`)."""


@dataclass(frozen=True)
class Split:
    """A prompt and its response as token ids, and the strategy that found where the response starts."""

    prompt_ids: list[int]
    response_ids: list[int]
    strategy: str
    dropped: list[int]
    """Prompt ids the training sequence leaves out (`common_prefix` only)."""


def with_eos(tokenizer, response: Any) -> Any:
    """A string response ends with the EOS token, as TRL's trainers make it; a message list is left to its template."""
    if isinstance(response, str) and not response.endswith(tokenizer.eos_token):
        return response + tokenizer.eos_token
    return response


def split_ids(tokenizer, prompt: Any, response: Any) -> Split:
    """The token ids of a prompt and its response, with the same prompt every stage sees (the contract of every stage).

    - `prefix`: the prompt's render (with the generation prompt) is a prefix of the full render, in tokens; the
      response is the rest. Most templates, and string rows.
    - `inference_prompt`: it is not, because the template places the system message by position (Mistral's goes
      into the last user turn, which is no longer last once the reply follows). The prompt is the generation-prompt
      render (what sampling and lm-eval see) and the response is the reply as the template writes it after that
      prompt, read from the same conversation rendered without its system message.
    - `common_prefix`: neither works (a generation prompt the full render drops, tokens merging across the boundary):
      TRL's rule, the response starts where the two token sequences diverge and the prompt's differing tail is left
      out of training (`dropped`).
    """
    response = with_eos(tokenizer, response)
    prompt_ids, full_ids = _ids(tokenizer, prompt), _ids(tokenizer, prompt, response)
    start = common_prefix_length(prompt_ids, full_ids)
    if start == len(prompt_ids):
        return Split(prompt_ids, full_ids[start:], "prefix", [])
    reply = _reply_after_generation_prompt(tokenizer, prompt, response)
    if reply is not None:
        ids = tokenizer(render(tokenizer, prompt) + reply, add_special_tokens=False)["input_ids"]
        if common_prefix_length(prompt_ids, ids) == len(prompt_ids) < len(ids):
            return Split(prompt_ids, ids[len(prompt_ids) :], "inference_prompt", [])
    return Split(prompt_ids[:start], full_ids[start:], "common_prefix", prompt_ids[start:])


def _reply_after_generation_prompt(tokenizer, prompt: Any, response: Any) -> str | None:
    """The reply's text as the template writes it after a generation prompt, when a system message is what moved."""
    from jinja2 import TemplateError

    if not isinstance(prompt, list):
        return None
    without_system = [message for message in prompt if message["role"] != "system"]
    if len(without_system) == len(prompt) or not without_system:
        return None
    try:
        alone, full = render(tokenizer, without_system), render(tokenizer, without_system, response)
    except TemplateError:  # a template that requires its system message: no reading this way
        return None
    return full[len(alone) :] if full.startswith(alone) else None


def response_text(tokenizer, prompt: Any, response: Any) -> str | None:
    """The response's text exactly as it follows the rendered prompt (`prefix` or `inference_prompt` reading of
    `split_ids`, in text), or None when neither reading holds."""
    context, full = render(tokenizer, prompt), render(tokenizer, prompt, response)
    if full.startswith(context):
        return full[len(context) :]
    return _reply_after_generation_prompt(tokenizer, prompt, response)


def preference_ids(tokenizer, prompt: Any, chosen: Any, rejected: Any) -> tuple[list[int], list[int], list[int]]:
    """A pair's prompt, chosen and rejected ids, as SFT, DPO, ORPO/SimPO and the reference log-probs all see it.

    Both responses are split by `split_ids`; when either needs TRL's `common_prefix` rule, both are cut where the
    prompt diverges from either full sequence (as TRL's DPOTrainer does), so chosen and rejected share one prompt.
    """
    chosen_split, rejected_split = split_ids(tokenizer, prompt, chosen), split_ids(tokenizer, prompt, rejected)
    if "common_prefix" not in (chosen_split.strategy, rejected_split.strategy):
        return chosen_split.prompt_ids, chosen_split.response_ids, rejected_split.response_ids
    prompt_ids = _ids(tokenizer, prompt)
    chosen_ids, rejected_ids = (_ids(tokenizer, prompt, with_eos(tokenizer, r)) for r in (chosen, rejected))
    start = min(common_prefix_length(prompt_ids, chosen_ids), common_prefix_length(prompt_ids, rejected_ids))
    return prompt_ids[:start], chosen_ids[start:], rejected_ids[start:]


def _with_content(response: Any, text: str) -> Any:
    return text if isinstance(response, str) else [*response[:-1], {**response[-1], "content": text}]


def cut_response(tokenizer, prompt: Any, response: Any, max_length: int) -> tuple[Any, bool] | None:
    """The response cut at its end so prompt + response fit in `max_length` tokens, and whether it was cut.

    TRL's `keep_start` truncation (the prompt whole, the response's end cut) done once on the text, so the file
    `prepare` writes is what training and every evaluator read: lm-eval refuses a continuation longer than its
    window. None when the prompt alone leaves no room for a response token (TRL drops such a pair).
    """
    split = split_ids(tokenizer, prompt, response)
    excess = len(split.prompt_ids) + len(split.response_ids) - max_length
    if excess <= 0:
        return response, False
    text_ids = tokenizer(last_content(response), add_special_tokens=False)["input_ids"]
    keep = len(text_ids) - excess
    while keep > 0:
        # A cut inside a multi-byte character decodes to U+FFFD: that half-character goes too.
        candidate = _with_content(response, tokenizer.decode(text_ids[:keep]).rstrip("\ufffd"))
        cut = split_ids(tokenizer, prompt, candidate)
        excess = len(cut.prompt_ids) + len(cut.response_ids) - max_length
        if excess <= 0:
            return candidate, True
        keep -= excess  # the template's own tokens around the text can shift by a few: cut again
    return None


def completion_ids(tokenizer, row: dict) -> dict[str, list[int]]:
    """An SFT row (prompt + completion, or a conversation's last assistant turn) as TRL's processed SFT columns."""
    example = last_turn_example(row) if "messages" in row else row
    split = split_ids(tokenizer, example["prompt"], example["completion"])
    return {
        "input_ids": split.prompt_ids + split.response_ids,
        "completion_mask": [0] * len(split.prompt_ids) + [1] * len(split.response_ids),
    }


def common_prefix_length(ids: list[int], other_ids: list[int]) -> int:
    """Leading tokens two sequences share (TRL's rule; kept here so light stages need not import TRL)."""
    shorter = min(len(ids), len(other_ids))
    return next((i for i in range(shorter) if ids[i] != other_ids[i]), shorter)


def boundary_report(rows: list[dict], tokenizer) -> dict[str, Any]:
    """Which `split_ids` strategy found where the responses start, over the rows a stage trains on.

    `prompt_boundary` names the last-resort strategy any row needed (`prefix` when every row is clean), the counts
    say how many rows needed each other one, and `example_dropped` shows a prompt tail `common_prefix` left out.
    """
    counts = dict.fromkeys(BOUNDARY_STRATEGIES[1:], 0)
    example = None
    for row in rows:
        splits = [split_ids(tokenizer, prompt, response) for prompt, response in prompt_response_pairs(row)]
        worst = max((split.strategy for split in splits), key=BOUNDARY_STRATEGIES.index)
        if worst != "prefix":
            counts[worst] += 1
        for split in splits:
            if split.dropped and example is None:
                example = tokenizer.decode(split.dropped)
    used = [strategy for strategy in BOUNDARY_STRATEGIES[1:] if counts[strategy]]
    return {
        "prompt_boundary": used[-1] if used else "prefix",
        **{f"rows_{strategy}": count for strategy, count in counts.items()},
        **({"example_dropped": example} if example is not None else {}),
    }
