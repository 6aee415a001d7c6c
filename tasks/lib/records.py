"""Reading, converting, validating and describing data in TRL's formats.

A source is a JSON-lines file, a JSON file holding a list of rows, a parquet file, or a folder written
by `datasets.save_to_disk`; rows in ShareGPT/LLaMA-Factory, Anthropic HH or Alpaca format are converted
to TRL's first (tasks/lib/formats.py, `data.format`). Then, in TRL's formats:
Preference pairs: ``{"prompt","chosen","rejected"}`` as strings, or conversational (``prompt`` a list
of ``{"role","content"}`` messages, ``chosen``/``rejected`` lists of assistant messages).
SFT rows: ``{"prompt","completion"}`` strings or ``{"messages": [...]}``.
Prompt pools: ``{"prompt": ...}`` (a string or a message list ending with a user message).
Every bad row is reported as ``file:line: reason`` (``file row N: reason`` for sources without lines).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tasks.lib.chat import cut_response, last_turn_example, render
from tasks.lib.errors import DataError
from tasks.lib.files import read_utf8
from tasks.lib.formats import Format, FormatProblem, to_trl

Kind = Literal["pairs", "sft", "prompts"]
ExtraFields = Literal["ignore", "refuse"]
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class ReadResult:
    path: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    row_lines: list[int] = field(default_factory=list)
    """The file line of each kept row."""
    bad: list[tuple[int, str]] = field(default_factory=list)
    extra_fields: dict[str, int] = field(default_factory=dict)
    cut_rows: int = 0
    """Kept rows whose last response `fit_to_length` cut to fit the token budget."""
    """Fields beyond the kind's own (ids, scores, metadata), each with how many kept rows had it: set aside."""
    duplicates: int = 0
    lines: int = 0
    unit: Literal["line", "row"] = "line"
    """How rows are numbered: file lines (JSON lines) or 1-based row positions (JSON list, parquet, dataset)."""

    def where(self, number: int) -> str:
        return f"{self.path}:{number}" if self.unit == "line" else f"{self.path} row {number}"


HUB_SOURCE_FILE = "source.json"
"""In a folder the `fetch` stage wrote: the hub dataset it holds (id, split, subset, pinned and loaded revision)."""


def hub_source(path: str | Path) -> dict | None:
    """The hub dataset a data source was fetched from, or None for a local file or folder."""
    record = Path(path) / HUB_SOURCE_FILE
    return json.loads(record.read_text(encoding="utf-8")) if record.is_file() else None


def row_format(row: dict[str, Any]) -> str:
    """`conversational` (message lists) or `standard` (strings): TRL's two formats, which one file must not mix."""
    value = row.get("messages", row.get("prompt"))
    return "conversational" if isinstance(value, list) else "standard"


def _text_problem(value: Any, name: str) -> str | None:
    if not isinstance(value, str):
        return f"'{name}' must be a string or a list of messages, got {type(value).__name__}"
    if not value.strip():
        return f"'{name}' is empty"
    return None


def _messages_problem(value: Any, name: str) -> str | None:
    if not isinstance(value, list) or not value:
        return f"'{name}' must be a non-empty list of messages"
    for index, message in enumerate(value):
        if not isinstance(message, dict) or set(message) - {"role", "content"} or "content" not in message:
            return f"'{name}[{index}]' must be an object with 'role' and 'content'"
        if message.get("role") not in ROLES:
            return f"'{name}[{index}].role' must be one of {', '.join(ROLES)}"
        problem = _text_problem(message["content"], f"{name}[{index}].content")
        if problem:
            return problem
    return None


def _field_problem(row: dict, name: str, conversational: bool) -> str | None:
    if name not in row:
        return f"missing field '{name}'"
    return _messages_problem(row[name], name) if conversational else _text_problem(row[name], name)


def pair_problem(row: Any) -> str | None:
    """Why a parsed line is not a usable preference pair, or None."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    conversational = isinstance(row.get("prompt"), list)
    for name in ("prompt", "chosen", "rejected"):
        problem = _field_problem(row, name, conversational)
        if problem:
            return problem
    if conversational and any(m["role"] != "assistant" for m in row["chosen"] + row["rejected"]):
        return "'chosen' and 'rejected' messages must have role 'assistant'"
    if row["chosen"] == row["rejected"]:
        return "'chosen' is identical to 'rejected'"
    return None


def sft_problem(row: Any) -> str | None:
    """Why a parsed line is not a usable SFT example, or None."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    if "messages" in row:
        problem = _messages_problem(row["messages"], "messages")
        if problem:
            return problem
        if not any(m["role"] == "assistant" for m in row["messages"]):
            return "'messages' has no assistant message to learn from"
        return None
    for name in ("prompt", "completion"):
        problem = _field_problem(row, name, conversational=False)
        if problem:
            return problem
    return None


def prompt_problem(row: Any) -> str | None:
    """Why a parsed line is not a usable prompt-pool entry `{"prompt": ...}`, or None."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    problem = _field_problem(row, "prompt", conversational=isinstance(row.get("prompt"), list))
    if problem:
        return problem
    if isinstance(row["prompt"], list) and row["prompt"][-1]["role"] != "user":
        return "'prompt' must end with a user message"
    return None


CHECKS: dict[str, Callable[[Any], str | None]] = {"pairs": pair_problem, "sft": sft_problem, "prompts": prompt_problem}


def own_fields(row: dict, kind: Kind) -> tuple[str, ...]:
    """The fields a row of `kind` trains on; any other field is extra."""
    if kind == "pairs":
        return ("prompt", "chosen", "rejected")
    if kind == "sft":
        return ("messages",) if "messages" in row else ("prompt", "completion")
    return ("prompt",)


def split_extra_fields(row: Any, kind: Kind) -> tuple[Any, list[str]]:
    """The row with only its own fields, and the names of the others (sorted)."""
    if not isinstance(row, dict):
        return row, []
    own = own_fields(row, kind)
    return {name: row[name] for name in own if name in row}, sorted(set(row) - set(own))


def raw_rows(path: Path) -> tuple[Literal["line", "row"], list[tuple[int, Any]]]:
    """The source's rows, numbered: `(number, parsed row)`, or `(number, JSONDecodeError)` for a bad JSON line."""
    if path.is_dir():
        return "row", list(enumerate(_saved_dataset(path), start=1))
    if path.suffix == ".parquet":
        import pyarrow.parquet

        return "row", list(enumerate(pyarrow.parquet.read_table(path).to_pylist(), start=1))
    text = read_utf8(path, DataError)
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: a .json data file must hold a list of rows, got {type(rows).__name__}")
        return "row", list(enumerate(rows, start=1))
    numbered = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                numbered.append((number, json.loads(line)))
            except json.JSONDecodeError as error:
                numbered.append((number, error))
    return "line", numbered


def _saved_dataset(path: Path) -> list[dict[str, Any]]:
    """Rows of a `datasets.save_to_disk` folder (a DatasetDict gives its `train` split, or its only one)."""
    from datasets import DatasetDict, load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except FileNotFoundError as error:
        raise DataError(f"{path}: not a folder written by datasets' save_to_disk ({error})") from None
    if isinstance(dataset, DatasetDict):
        splits = list(dataset)
        if "train" not in dataset and len(splits) != 1:
            raise DataError(f"{path}: a saved DatasetDict with splits {', '.join(splits)} and no 'train' split")
        dataset = dataset["train" if "train" in dataset else splits[0]]
    return dataset.to_list()


def read_records(
    path: str | Path, kind: Kind, data_format: Format = "auto", extra_fields: ExtraFields = "ignore"
) -> ReadResult:
    """Read every row, convert it to TRL's format and validate it; keep good rows (deduplicated), note bad ones.

    Fields beyond the kind's own (a dataset's ids, scores, metadata, a `messages` copy) are set aside and counted
    in `result.extra_fields`, or, with `extra_fields="refuse"` (`data.extra_fields`), make their row bad.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    unit, numbered = raw_rows(path)
    result = ReadResult(path=path, unit=unit)
    seen: set[str] = set()
    check = CHECKS[kind]
    for number, parsed in numbered:
        result.lines += 1
        if isinstance(parsed, json.JSONDecodeError):
            result.bad.append((number, f"not valid JSON ({parsed.msg})"))
            continue
        try:
            row = to_trl(parsed, kind, data_format)
        except FormatProblem as problem:
            result.bad.append((number, str(problem)))
            continue
        row, extras = split_extra_fields(row, kind)
        if extras and extra_fields == "refuse":
            result.bad.append((number, f"unknown field(s) {', '.join(extras)} (data.extra_fields: refuse)"))
            continue
        problem = check(row)
        if problem:
            result.bad.append((number, problem))
            continue
        key = json.dumps(row, sort_keys=True, ensure_ascii=False)
        if key in seen:
            result.duplicates += 1
            continue
        seen.add(key)
        result.rows.append(row)
        result.row_lines.append(number)
        for name in extras:
            result.extra_fields[name] = result.extra_fields.get(name, 0) + 1
    _refuse_mixed_formats(result)
    return result


def _refuse_mixed_formats(result: ReadResult) -> None:
    """Mark the rows of a file's minority format bad: downstream libraries cast a column to one type."""
    formats = [row_format(row) for row in result.rows]
    if len(set(formats)) < 2:
        return
    minority = min(set(formats), key=formats.count)
    majority = next(kind for kind in set(formats) if kind != minority)
    reason = (f"a {minority} row in a file of {majority} rows ({formats.count(majority)} of {len(formats)}): "
              "TRL's two formats (strings vs message lists) cannot be mixed in one file")  # fmt: skip
    kept = [(row, line) for row, line, kind in zip(result.rows, result.row_lines, formats, strict=True)
            if kind != minority]  # fmt: skip
    result.bad.extend((line, reason) for line, kind in zip(result.row_lines, formats, strict=True) if kind == minority)
    result.bad.sort()
    result.rows, result.row_lines = [row for row, _ in kept], [line for _, line in kept]


def refuse_unrenderable(result: ReadResult, tokenizer) -> None:
    """Mark the conversations the chat template refuses to render bad, with the template's own message."""
    from jinja2 import TemplateError

    conversational = [row for row in result.rows if row_format(row) == "conversational"]
    if conversational and tokenizer.chat_template is None:
        raise DataError(
            f"{result.path}: {len(conversational)} rows are conversations (message lists), but the model's "
            "tokenizer has no chat template: use string rows (prompt/completion) for this model"
        )
    kept_rows, kept_lines = [], []
    for row, line in zip(result.rows, result.row_lines, strict=True):
        try:
            row_texts(row, tokenizer)
        except TemplateError as error:  # the template's raise_exception(...): this conversation, not the run
            result.bad.append((line, f"the chat template refused this conversation: {error}"))
            continue
        kept_rows.append(row)
        kept_lines.append(line)
    result.bad.sort()
    result.rows, result.row_lines = kept_rows, kept_lines


def fit_to_length(result: ReadResult, tokenizer, max_length: int, setting: str) -> None:
    """Cut each row's (last) response so prompt + response fit in `max_length` tokens; a prompt that alone leaves
    no room makes its row bad. One length policy: what `prepare` writes is what SFT, DPO and lm-eval all read."""
    kept_rows, kept_lines = [], []
    for row, line in zip(result.rows, result.row_lines, strict=True):
        fitted = _fitted_row(row, tokenizer, max_length)
        if fitted is None:
            prompt = last_turn_example(row)["prompt"] if "messages" in row else row["prompt"]
            tokens = len(tokenizer(render(tokenizer, prompt), add_special_tokens=isinstance(prompt, str))["input_ids"])
            result.bad.append((line, f"the prompt alone is {tokens} tokens: no room for a response within {setting}"))
            continue
        row, cut = fitted
        result.cut_rows += cut
        kept_rows.append(row)
        kept_lines.append(line)
    result.bad.sort()
    result.rows, result.row_lines = kept_rows, kept_lines


def _fitted_row(row: dict, tokenizer, max_length: int) -> tuple[dict, bool] | None:
    if "messages" in row:
        if row["messages"][-1]["role"] != "assistant":
            return row, False  # nothing follows the last assistant turn in training: lengths are the trainer's
        example = last_turn_example(row)
        fitted = cut_response(tokenizer, example["prompt"], example["completion"], max_length)
        return None if fitted is None else ({"messages": example["prompt"] + fitted[0]}, fitted[1])
    sides = ("completion",) if "completion" in row else ("chosen", "rejected")
    cut_any, fitted_row = False, dict(row)
    for side in sides:
        fitted = cut_response(tokenizer, row["prompt"], row[side], max_length)
        if fitted is None:
            return None
        fitted_row[side], cut = fitted
        cut_any |= cut
    return fitted_row, cut_any


def enforce_bad_line_policy(result: ReadResult, on_bad_lines: str, max_bad_fraction: float) -> None:
    """Raise DataError listing bad lines unless the policy allows dropping them."""
    if not result.bad and result.rows:
        return
    listing = "\n".join(f"{result.where(line)}: {reason}" for line, reason in result.bad)
    if not result.rows:
        raise DataError(f"{result.path}: no usable rows\n{listing}".rstrip())
    if on_bad_lines == "fail":
        raise DataError(f"{len(result.bad)} bad line(s) (data.on_bad_lines: fail)\n{listing}")
    fraction = len(result.bad) / result.lines
    if fraction > max_bad_fraction:
        raise DataError(
            f"{result.path}: {len(result.bad)} of {result.lines} lines are bad ({fraction:.1%}), "
            f"more than data.max_bad_fraction={max_bad_fraction:.1%}\n{listing}"
        )


def row_texts(row: dict[str, Any], tokenizer) -> list[str]:
    """Every full sequence a row trains on (one for SFT, chosen and rejected for a pair)."""
    if "messages" in row:
        return [tokenizer.apply_chat_template(row["messages"], tokenize=False)]
    if "completion" in row:
        return [row["prompt"] + row["completion"]]
    return [render(tokenizer, row["prompt"], row["chosen"]), render(tokenizer, row["prompt"], row["rejected"])]


def token_length_report(rows: list[dict[str, Any]], tokenizer, max_length: int) -> dict[str, Any]:
    """Token-length statistics and how many rows `max_length` would truncate."""
    lengths = []
    truncated = 0
    for row in rows:
        row_lengths = [
            len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in row_texts(row, tokenizer)
        ]
        lengths.extend(row_lengths)
        truncated += max(row_lengths) > max_length
    ordered = sorted(lengths)
    return {
        "tokens_min": ordered[0],
        "tokens_mean": round(statistics.fmean(ordered), 2),
        "tokens_p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
        "tokens_max": ordered[-1],
        "max_length": max_length,
        "truncated_rows": truncated,
    }


def file_report(result: ReadResult) -> dict[str, Any]:
    reasons: dict[str, int] = {}
    for _, reason in result.bad:
        reasons[reason] = reasons.get(reason, 0) + 1
    return {
        "lines": result.lines,
        "kept": len(result.rows),
        "dropped": len(result.bad),
        "dropped_reasons": reasons,
        "dropped_lines": [f"{result.where(line)}: {reason}" for line, reason in result.bad],
        "duplicates_removed": result.duplicates,
        "extra_fields_set_aside": dict(sorted(result.extra_fields.items())),
    }
