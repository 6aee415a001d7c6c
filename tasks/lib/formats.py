"""Data formats people bring, converted to TRL's (what every stage reads), row by row.

- `trl`: pairs `prompt`/`chosen`/`rejected` (strings, or message lists); SFT `prompt`/`completion` strings or
  `messages`; prompt pools `prompt`. Pairs whose prompt is implicit (`chosen`/`rejected` whole conversations that
  share their first turns, with no `prompt` or a string one beside them: the UltraFeedback-binarized shape) get
  their prompt extracted as TRL's DPOTrainer does (`trl.data_utils.maybe_extract_prompt`).
- `sharegpt` (LLaMA-Factory): `conversations` of `from`/`value` turns (system turns allowed, optional `system`
  field). Pairs: the conversation ends with a human turn and `chosen`/`rejected` are gpt turns; SFT: it ends with
  a gpt turn; prompt pools: it ends with a human turn.
- `hh` (Anthropic HH-RLHF): pairs only, `chosen`/`rejected` strings of `\n\nHuman: ... \n\nAssistant: ...` turns
  that share everything before their last Assistant turn (the prompt).
- `alpaca`: `instruction`/`input` (optional `system`, `history`) with `output` (SFT), `chosen`/`rejected` strings
  (pairs), or nothing more (prompt pools).

ShareGPT, HH and Alpaca rows become conversational TRL rows (message lists), so the model's chat template
renders them; a `system` field or system turn becomes a system message. `data.format: auto` picks the
format of each row from its fields; an explicit value converts every row with that one.
"""

from __future__ import annotations

import re
from typing import Any, Literal

Format = Literal["auto", "trl", "sharegpt", "hh", "alpaca"]
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "observation": "tool",
    "function_call": "assistant",
}
HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


class FormatProblem(ValueError):
    """A row that its format cannot convert; the message says why (the caller adds file and line)."""


def detect(row: Any) -> str:
    """The format of one parsed row, from its fields."""
    if not isinstance(row, dict):
        return "trl"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row:
        return "alpaca"
    chosen = row.get("chosen")
    if "prompt" not in row and isinstance(chosen, str) and ("\n\nAssistant:" in chosen or "\n\nHuman:" in chosen):
        return "hh"
    return "trl"


def to_trl(row: Any, kind: str, data_format: Format = "auto") -> Any:
    """The row in TRL's format for `kind` (pairs / sft / prompts); a TRL row (or a non-object) comes back as is."""
    chosen_format = detect(row) if data_format == "auto" else data_format
    if not isinstance(row, dict):
        return row
    if chosen_format == "trl":
        return _explicit_prompt(row) if kind == "pairs" else row
    return CONVERTERS[chosen_format](row, kind)


def _explicit_prompt(row: dict) -> dict:
    """A pair with its prompt split off `chosen`/`rejected` when it is implicit in them, as TRL reads it."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    implicit = isinstance(chosen, list) and isinstance(rejected, list) and not isinstance(row.get("prompt"), list)
    if not implicit:
        return row
    from trl.data_utils import maybe_extract_prompt

    if not chosen or not rejected or chosen[0] != rejected[0]:
        raise FormatProblem("'chosen' and 'rejected' hold no 'prompt' and share no first turn to take it from")
    # Whatever else the row holds (ids, scores, a `messages` copy) stays beside the pair, as extra fields.
    return {**row, **maybe_extract_prompt({"chosen": chosen, "rejected": rejected})}


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise FormatProblem(f"'{name}' must be a string, got {type(value).__name__}")
    return value


def _sharegpt_messages(row: dict) -> list[dict[str, str]]:
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise FormatProblem("'conversations' must be a non-empty list of {from, value} turns")
    messages = []
    if row.get("system"):
        messages.append({"role": "system", "content": _text(row["system"], "system")})
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise FormatProblem(f"'conversations[{index}]' must be an object with 'from' and 'value'")
        role = SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            raise FormatProblem(
                f"'conversations[{index}].from' is {turn['from']!r}; known: {', '.join(sorted(SHAREGPT_ROLES))}"
            )
        messages.append({"role": role, "content": _text(turn["value"], f"conversations[{index}].value")})
    return messages


def _sharegpt_answer(value: Any, name: str) -> list[dict[str, str]]:
    if isinstance(value, dict) and "value" in value:
        if SHAREGPT_ROLES.get(value.get("from", "gpt")) != "assistant":
            raise FormatProblem(f"'{name}.from' must be a gpt/assistant turn, got {value.get('from')!r}")
        return [{"role": "assistant", "content": _text(value["value"], f"{name}.value")}]
    return [{"role": "assistant", "content": _text(value, name)}]


def from_sharegpt(row: dict, kind: str) -> dict:
    messages = _sharegpt_messages(row)
    if kind == "sft":
        if messages[-1]["role"] != "assistant":
            raise FormatProblem("an SFT conversation must end with a gpt turn")
        return {"messages": messages}
    if messages[-1]["role"] != "user":
        raise FormatProblem("the conversation before chosen/rejected must end with a human turn")
    if kind == "prompts":
        return {"prompt": messages}
    return {
        "prompt": messages,
        "chosen": _sharegpt_answer(row.get("chosen"), "chosen"),
        "rejected": _sharegpt_answer(row.get("rejected"), "rejected"),
    }


def _hh_messages(text: str, name: str) -> list[dict[str, str]]:
    parts = HH_TURN.split(text if text.startswith("\n\n") else "\n\n" + text)
    if parts[0].strip() or len(parts) < 3:
        raise FormatProblem(f"'{name}' is not a '\\n\\nHuman: ... \\n\\nAssistant: ...' dialogue")
    return [
        {"role": "user" if speaker == "Human" else "assistant", "content": content.strip()}
        for speaker, content in zip(parts[1::2], parts[2::2], strict=True)
    ]


def from_hh(row: dict, kind: str) -> dict:
    if kind != "pairs":
        raise FormatProblem("the HH format holds preference pairs only")
    chosen = _hh_messages(_text(row.get("chosen"), "chosen"), "chosen")
    rejected = _hh_messages(_text(row.get("rejected"), "rejected"), "rejected")
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise FormatProblem("'chosen' and 'rejected' must end with an Assistant turn")
    if chosen[:-1] != rejected[:-1]:
        raise FormatProblem("'chosen' and 'rejected' do not share the dialogue before their last Assistant turn")
    return {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}


def _alpaca_prompt(row: dict) -> list[dict[str, str]]:
    instruction = _text(row.get("instruction"), "instruction")
    extra = _text(row.get("input") or "", "input")
    messages = [{"role": "system", "content": _text(row["system"], "system")}] if row.get("system") else []
    for index, turn in enumerate(row.get("history") or []):
        if not (isinstance(turn, list) and len(turn) == 2):
            raise FormatProblem(f"'history[{index}]' must be a [question, answer] pair")
        messages += [
            {"role": "user", "content": _text(turn[0], f"history[{index}][0]")},
            {"role": "assistant", "content": _text(turn[1], f"history[{index}][1]")},
        ]
    messages.append({"role": "user", "content": f"{instruction}\n\n{extra}" if extra.strip() else instruction})
    return messages


def from_alpaca(row: dict, kind: str) -> dict:
    prompt = _alpaca_prompt(row)
    if kind == "sft":
        return {"messages": [*prompt, {"role": "assistant", "content": _text(row.get("output"), "output")}]}
    if kind == "prompts":
        return {"prompt": prompt}
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": _text(row.get("chosen"), "chosen")}],
        "rejected": [{"role": "assistant", "content": _text(row.get("rejected"), "rejected")}],
    }


CONVERTERS = {"sharegpt": from_sharegpt, "hh": from_hh, "alpaca": from_alpaca}
