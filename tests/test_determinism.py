"""Re-running a stage on the same inputs rewrites byte-identical outputs (dvc.lock's hashes do not move).

The micro pipeline was built with warm stage processes (tasks/lib/warm.py, as `make demo` runs it); one stage of
every kind is re-run on a copy of it, in this process (the exact
`python -m tasks.<stage> ...` command DVC resolved from dvc.yaml, run with runpy: one import of the
libraries instead of one per stage); then `dvc status` must find every model, data, metrics and plots
output as dvc.lock recorded it. TensorBoard event files are exempt, and so is the dashboard page: its runs panel
reads the repository's recorded runs (`dvc exp show`), and committing the build gave the baseline commit metrics it
did not have while the build ran (two renders in one state are byte-identical: tests/test_dashboard.py).
"""

from __future__ import annotations

import json
import os
import runpy
import shlex
import sys
from pathlib import Path

from conftest import dvc

from flows.dvc_project import read_graph
from tasks.lib.warm import WARM_ENV

EXEMPT = ("logs/", "checkpoints/", "reports/dashboard.html")


def run_in_process(project: Path, command: str, monkeypatch) -> None:
    program, flag, module, *arguments = shlex.split(command)
    assert (program, flag) == ("python", "-m"), command
    with monkeypatch.context() as patch:
        patch.delenv(WARM_ENV, raising=False)  # here, not in a fork of the warm server that built the pipeline
        patch.chdir(project)
        patch.setattr(sys, "argv", [module, *arguments])
        patch.delitem(sys.modules, module, raising=False)  # run it as __main__, as `python -m` does
        runpy.run_module(module, run_name="__main__", alter_sys=True)


def one_stage_of_each_kind(project: Path) -> dict[str, str]:
    """{stage name: resolved command}, the first stage in dvc.yaml's order for each stage module."""
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        commands = {stage.name: stage.cmd for stage in repo.index.stages}
    chosen: dict[str, str] = {}
    for name in read_graph(project).order:
        module = shlex.split(commands[name])[2]
        if module not in {shlex.split(command)[2] for command in chosen.values()}:
            chosen[name] = commands[name]
    return chosen


def changed_outputs(project: Path) -> dict[str, list]:
    status = json.loads(dvc(project, "status", "--json").stdout or "{}")
    changed = {}
    for stage, entries in status.items():
        for entry in entries:
            outs = entry.get("changed outs", {}) if isinstance(entry, dict) else {}
            moved = [path for path in outs if not path.startswith(EXEMPT)]
            if moved or (isinstance(entry, dict) and "changed deps" in entry):
                changed[stage] = [entry]
    return changed


def test_rerunning_every_stage_kind_writes_byte_identical_outputs(project_copy, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", sys.modules.get("bitsandbytes"))  # restored afterwards
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", os.environ.get("TENSORBOARD_LOGGING_DIR", ""))
    stages = one_stage_of_each_kind(project_copy)
    assert len(stages) == 18, sorted(stages)  # check_params, base, prepare, prompts, sft, reference, ... dashboard
    for command in stages.values():
        run_in_process(project_copy, command, monkeypatch)
    assert changed_outputs(project_copy) == {}, "a re-run stage wrote different bytes"
