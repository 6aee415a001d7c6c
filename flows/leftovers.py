"""What a killed run leaves behind, removed by the next run before it reads the project.

A sweep point is a `dvc exp run --temp`: DVC keeps its run record and its temporary workspace under
`.dvc/tmp/exps/standalone/` while it runs and removes both when it ends. SIGKILL skips that, and `dvc exp show` then
lists the dead point as running for ever (its workspace copy's metrics as if they were the point's), `dvc exp
remove` does not know the name and `dvc exp clean` only cleans the Celery queue. The record holds no pid; the
workspace's own DVC lock (`.dvc/tmp/lock`, taken by the `dvc` process reproducing it) names its holder. A record
whose workspace has no lock yet (a point killed while DVC was still copying it) is left alone: it cannot be told
from one starting now. A flow run with parameters works
in a git worktree under `.dvc/tmp/runs/<run>` with its owner's pid beside it (`<run>.owner`). A record whose process
no longer exists is a dead run's: its workspace and record go. Live runs (another sweep, a flow) are left alone.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from flows.workspace import OWNER_SUFFIX, RUNS_DIR
from tasks.lib.files import process_running

DVC_TEMP_RUNS = ".dvc/tmp/exps/standalone/run"
"""DVC's records of `--temp` experiments: `<rev>/<rev>.run`, naming the run's workspace (`root_dir`)."""


def remove_dead_runs(root: Path) -> list[str]:
    """Remove what killed runs left in the project; one line per run removed."""
    return _dead_temp_experiments(root) + _dead_flow_workspaces(root)


def _lock_holder(workspace: Path) -> int | None:
    """The pid written in a DVC project's lock (zc.lockfile writes its holder's), or None when there is none."""
    lock = workspace / ".dvc" / "tmp" / "lock"
    text = lock.read_text(errors="replace").split() if lock.is_file() else []
    return int(text[0]) if text and text[0].isdigit() else None


def _dead_temp_experiments(root: Path) -> list[str]:
    removed = []
    records = root / DVC_TEMP_RUNS
    for info_file in sorted(records.glob("*/*.run")) if records.is_dir() else []:
        workspace = Path(json.loads(info_file.read_text())["root_dir"])
        holder = _lock_holder(workspace)
        if workspace.is_dir() and (holder is None or process_running(holder)):
            continue
        if workspace.resolve().is_relative_to((root / ".dvc" / "tmp").resolve()):
            shutil.rmtree(workspace, ignore_errors=True)
        record = info_file.parent
        shutil.rmtree(record)
        removed.append(f"removed DVC experiment {record.name[:7]} left running by a killed process (and its workspace)")
    return removed


def _dead_flow_workspaces(root: Path) -> list[str]:
    removed = []
    runs = root / RUNS_DIR
    for owner in sorted(runs.glob(f"*{OWNER_SUFFIX}")) if runs.is_dir() else []:
        if process_running(int(owner.read_text() or 0)):
            continue
        workspace = owner.with_suffix("")
        subprocess.run(["git", "worktree", "remove", "--force", str(workspace)], cwd=root, capture_output=True)
        shutil.rmtree(workspace, ignore_errors=True)
        subprocess.run(["git", "worktree", "prune"], cwd=root, capture_output=True)
        owner.unlink()
        removed.append(f"removed the workspace of flow run {workspace.name}, whose process was killed")
    return removed
