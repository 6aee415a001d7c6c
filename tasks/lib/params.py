"""Loading params.yaml: parse, apply dotted overrides, validate against the schema.

Every problem becomes one `ParamsError` whose lines read `params.yaml:LINE: key: reason (got …)`.
`python -m tasks.lib.params_cli` validates a file from the command line.
"""

from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tasks.lib.files import read_utf8
from tasks.lib.schema import Params, RoundParams, Section


class ParamsError(ValueError):
    """params.yaml (or an override) is invalid; the message names the key and what is allowed."""


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Line number of every mapping key in a YAML document, by its key path."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                child = path + (str(key.value),)
                lines[child] = key.start_mark.line + 1
                walk(value, child)
        elif isinstance(node, yaml.SequenceNode):
            for index, value in enumerate(node.value):
                lines[path + (str(index),)] = value.start_mark.line + 1
                walk(value, path + (str(index),))

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    return lines


def schema_keys(model: type[BaseModel] = None, prefix: str = "") -> list[str]:
    """Every dotted key the schema accepts (round entries as `dpo.rounds.<name>.*`)."""
    model = model or Params
    keys = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        keys.append(key)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, Section):
            keys.extend(schema_keys(annotation, key + "."))
        elif name == "rounds":
            keys.extend(schema_keys(RoundParams, key + ".<name>."))
    return keys


def _suggestion(key: str) -> str:
    known = schema_keys()
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [candidate for candidate in known if candidate.rsplit(".", 1)[-1] == leaf]
    close = same_leaf or difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def _describe(
    error: ValidationError, source: str, lines: dict[tuple[str, ...], int], overridden: tuple[str, ...] = ()
) -> str:
    messages = []
    for item in error.errors():
        path = tuple(str(part) for part in item["loc"])
        reason = item["msg"].removeprefix("Value error, ")
        inner = re.match(r"^([\w]+(?:\.[\w]+)+): (.*)$", reason, re.DOTALL)
        if inner and item["type"] == "value_error":  # a section's check naming the key inside it
            path, reason = path + tuple(inner.group(1).split(".")), inner.group(2)
        key = ".".join(path) or "(top level)"
        override = next((name for name in overridden if key == name or key.startswith(name + ".")), None)
        inside = next((name for name in overridden if name.startswith(key + ".")), None)
        line = next((lines[path[:n]] for n in range(len(path), 0, -1) if path[:n] in lines), None)
        where = "override" if override else f"{source}:{line}" if line else source
        if inside:
            where += f" with override {inside}"
        # A section-level check's input is the whole section: its message already names the culprit.
        quiet = item["type"] in ("missing", "extra_forbidden") or isinstance(item["input"], dict)
        got = "" if quiet else f" (got {item['input']!r})"
        if item["type"] == "extra_forbidden":
            reason = "unknown key" + _suggestion(key)
        messages.append(f"{where}: {key}: {reason}{got}")
    return "\n".join(messages)


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys (`{"dpo.loss.beta": 0.2}`) in a copy of a raw params mapping."""
    result = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        node = result
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ParamsError(f"override {dotted}: {part} is not a section")
        node[leaf] = value
    return result


def validate(
    raw: Any, source: str = "params.yaml", text: str | None = None, overridden: tuple[str, ...] = ()
) -> Params:
    if raw is None:
        raise ParamsError(
            f"{source}: the file is empty; it needs every section the shipped params.yaml has (dvc.yaml reads keys "
            "such as data.hub from it): start from the shipped file (`git show HEAD:params.yaml`)"
        )
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise ParamsError(_describe(error, source, _key_lines(text) if text else {}, overridden)) from None


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Read and validate params.yaml; raise ParamsError naming file:line and key on any problem."""
    path = Path(path)
    text = read_utf8(path, ParamsError)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML: {error}") from None
    if overrides:
        raw = apply_overrides(raw, overrides)
    return validate(raw, str(path), text, tuple(overrides or ()))
