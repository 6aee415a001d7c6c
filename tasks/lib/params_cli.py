"""params.yaml from the command line: validate a file, or print the params reference (docs/params.md) from the schema.

python -m tasks.lib.params_cli --params params.yaml     # validate
python -m tasks.lib.params_cli --markdown               # the reference table (`make params-reference`)
"""

from __future__ import annotations

import argparse
import typing

from pydantic import BaseModel

from tasks.lib.params import ParamsError, load_params
from tasks.lib.schema import Params, Section
from tasks.lib.stage import exit_bad_input


def _mapping_entry(annotation) -> type[Section] | None:
    """The section type of a `dict[str, Section]` field (a mapping of named entries), else None."""
    if typing.get_origin(annotation) is dict:
        value = typing.get_args(annotation)[1]
        if isinstance(value, type) and issubclass(value, Section):
            return value
    return None


def _field_rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        # A docstring may wrap over several source lines; a table row is one line.
        meaning = " ".join(field.description.split()) if field.description else None
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, Section):
            rows.append(f"| `{key}` | section | {meaning} |")
            rows.extend(_field_rows(annotation, key + "."))
            continue
        entry = _mapping_entry(annotation)
        if entry is not None:
            rows.append(f"| `{key}` | mapping | {meaning} |")
            rows.extend(_field_rows(entry, key + ".<name>."))
            continue
        default = "required" if field.is_required() else f"`{field.get_default(call_default_factory=True)}`"
        rows.append(f"| `{key}` | {default} | {meaning} |")
    return rows


def params_reference_markdown() -> str:
    """The params reference table for docs/params.md, generated from the schema."""
    header = ["| key | default | meaning |", "| --- | --- | --- |"]
    return "\n".join(header + _field_rows(Params, "")) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description="Validate params.yaml, or print its reference.")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--markdown", action="store_true", help="print the params reference table")
    args = parser.parse_args()
    if args.markdown:
        print(params_reference_markdown(), end="")
        return
    try:
        load_params(args.params)
    except ParamsError as error:
        exit_bad_input(f"invalid params:\n{error}")  # the status a stage exits with for the same params
    print(f"{args.params}: valid")


if __name__ == "__main__":
    main()
