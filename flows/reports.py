"""The eval dashboard a flow run publishes: pure functions from metrics and stage outcomes to artifacts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flows.dvc_project import StageRun

Scores = dict[str, dict[str, float]]
"""`{model: {metric: value}}`, as the report stage writes metrics/eval.json."""


def read_scores(path: Path) -> Scores:
    return json.loads(path.read_text()) if path.exists() else {}


def eval_summary_rows(current: Scores, previous: Scores) -> list[dict[str, str]]:
    """Models x metrics, each cell `value (change since the previous run)`."""
    metrics = list(dict.fromkeys(metric for values in current.values() for metric in values))
    rows = []
    for model, values in current.items():
        row = {"model": model}
        for metric in metrics:
            row[metric] = _cell(values.get(metric), previous.get(model, {}).get(metric))
        rows.append(row)
    return rows


def _cell(value: float | None, before: float | None) -> str:
    if value is None:
        return "-"
    if before is None:
        return f"{value:.4g} (new)"
    return f"{value:.4g} ({value - before:+.4g})"


def guard_warnings(metrics: dict[str, Any]) -> list[str]:
    """Collapse-guard reasons recorded in any metrics file (`guard_reasons`), as `file: reason`."""
    return [
        f"{path}: {reason}"
        for path, values in metrics.items()
        if isinstance(values, dict)
        for reason in values.get("guard_reasons") or []
    ]


def changed_params(before: dict[str, Any], after: dict[str, Any], prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two raw params mappings: `{key: (before, after)}`."""
    changes = {}
    for key in list(dict.fromkeys([*before, *after])):
        old, new = before.get(key), after.get(key)
        dotted = f"{prefix}{key}"
        if isinstance(old, dict) and isinstance(new, dict):
            changes.update(changed_params(old, new, dotted + "."))
        elif old != new:
            changes[dotted] = (old, new)
    return changes


def run_report_markdown(
    runs: list[StageRun],
    *,
    flow_seconds: float,
    failure: str | None,
    params_changes: dict[str, tuple[Any, Any]],
    warnings: list[str],
    notes: list[str],
) -> str:
    """The `run-report` artifact: each stage's outcome and duration, what differed from params.yaml, guard warnings."""
    stage_seconds = sum(run.seconds for run in runs)
    overhead = max(flow_seconds - stage_seconds, 0.0)
    lines = [f"## {'Failed' if failure else 'Completed'}: {len(runs)} stages in {flow_seconds:.1f} s", ""]
    lines += [
        f"Stage commands {stage_seconds:.1f} s, orchestration {overhead:.1f} s "
        f"({overhead / flow_seconds:.1%} of the run)."
        if flow_seconds
        else "",
        "",
    ]
    lines += ["| stage | outcome | seconds |", "| --- | --- | ---: |"]
    lines += [f"| {run.name} | {run.outcome} | {run.seconds:.1f} |" for run in runs]
    if failure:
        lines += ["", "### Failure", "", "```", failure, "```"]
    lines += ["", "### Params that differ from params.yaml", ""]
    lines += [f"- `{key}`: {old!r} → {new!r}" for key, (old, new) in params_changes.items()] or ["- none"]
    lines += ["", "### Collapse guard", ""]
    lines += [f"- ⚠ {warning}" for warning in warnings] or ["- no warnings"]
    lines += [f"\n{note}" for note in notes]
    return "\n".join(lines) + "\n"
