"""dvc.yaml itself: every stage depends on each project module its command imports, transitively.

A helper a stage imports but does not list would leave that stage's outputs stale after an edit
of the helper: DVC only re-runs what a dependency tells it to.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tasks", "flows")


def module_file(name: str) -> Path | None:
    """The project file of a dotted module name (a package's __init__), or None outside the project."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def imported_files(source: Path) -> set[Path]:
    """Project files a Python file imports anywhere in it (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(source.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found |= {path for path in map(module_file, names) if path is not None}
    return found


def transitive_imports(start: set[Path]) -> set[Path]:
    seen, todo = set(), list(start)
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo.extend(imported_files(path) - seen)
    return seen


def stage_commands() -> dict[str, tuple[str, list[str]]]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {
        name: ((stage.get("do") or stage)["cmd"], (stage.get("do") or stage)["deps"]) for name, stage in stages.items()
    }


def code_needed(cmd: str, deps: list[str]) -> set[Path]:
    """Files the stage's command runs: its module, what it imports, and the Python of folders it depends on."""
    module = re.match(r"python -m ([\w.]+)", cmd).group(1)
    start = {module_file(module)}
    for dep in deps:
        folder = ROOT / dep
        if "${" not in dep and folder.is_dir() and dep.startswith(PACKAGES):
            start |= set(folder.rglob("*.py"))
    return transitive_imports(start) - {path for path in start if path.name == "__init__.py"}


def covered(path: Path, deps: list[str]) -> bool:
    relative = path.relative_to(ROOT).as_posix()
    return any(relative == dep or relative.startswith(dep.rstrip("/") + "/") for dep in deps)


LAUNCHERS = {"tasks/lib/warm.py"}
"""Decide how a stage process starts (warm or not), never what it writes: tests/test_determinism.py re-runs stages
unwarmed against the outputs of the warm-built micro pipeline."""


@pytest.mark.parametrize("stage", sorted(stage_commands()))
def test_stage_depends_on_every_project_module_it_imports(stage):
    cmd, deps = stage_commands()[stage]
    missing = sorted(
        path.relative_to(ROOT).as_posix()
        for path in code_needed(cmd, deps)
        if path.name != "__init__.py" and not covered(path, deps) and path.relative_to(ROOT).as_posix() not in LAUNCHERS
    )
    assert not missing, f"dvc.yaml stage {stage} imports but does not depend on: {', '.join(missing)}"


def test_every_stage_module_is_a_stage():
    """tasks/ holds one module per stage (and the lib package): a module no stage runs is misplaced."""
    run = {re.match(r"python -m tasks\.(\w+)", cmd).group(1) for cmd, _ in stage_commands().values()}
    modules = {path.stem for path in (ROOT / "tasks").glob("*.py") if path.stem != "__init__"}
    assert modules == run, f"not run by any stage: {sorted(modules - run)}"
