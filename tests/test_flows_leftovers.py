"""flows/leftovers.py: what a killed sweep or flow leaves is removed by the next run, and until then the dashboard
does not read a dead run's files as its result. The kill is real: SIGKILL of a `dvc exp run --temp` process group,
as a killed `make sweep` does to each point."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import dvc, make_shell_project, project_env

from flows.leftovers import DVC_TEMP_RUNS, remove_dead_runs
from flows.workspace import OWNER_SUFFIX, RUNS_DIR
from tasks.dashboard import experiment_rows

SLOW_STAGE = """stages:
  slow:
    cmd: sleep 120 && echo done > out.txt
    params: [dpo.loss.beta]
    outs: [out.txt]
"""


def start_killable_point(project: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dvc", "exp", "run", "--temp", "--set-param", "dpo.loss.beta=0.3"],
        cwd=project, env=project_env(project), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def wait_for_record(project: Path, point: subprocess.Popen) -> Path:
    """The point's DVC record, once its stage is running (its workspace holds a running `sleep`)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        records = list((project / DVC_TEMP_RUNS).glob("*/*.run"))
        info = json.loads(records[0].read_text()) if records else {}
        if info.get("status", 0) >= 2 and (Path(info["root_dir"]) / ".dvc/tmp/lock").is_file():  # 2: RUNNING
            return records[0]
        assert point.poll() is None, "the experiment ended before it could be killed"
        time.sleep(0.2)
    raise AssertionError("dvc exp run --temp never recorded its run")


def shown(project: Path) -> list[dict]:
    return json.loads(dvc(project, "exp", "show", "--json").stdout)


def test_a_killed_sweep_point_is_shown_as_running_without_metrics_then_removed_by_the_next_run(tmp_path):
    project = make_shell_project(tmp_path, SLOW_STAGE)
    point = start_killable_point(project)
    record = wait_for_record(project, point)
    workspace = Path(json.loads(record.read_text())["root_dir"])
    os.killpg(point.pid, signal.SIGKILL)
    point.wait()
    assert workspace.is_dir()
    running = [row for row in experiment_rows(shown(project)) if "running" in row["run"]]
    assert len(running) == 1 and running[0]["metrics"] == {}, "the dead point reads as a result"

    removed = remove_dead_runs(project)
    assert len(removed) == 1 and "left running by a killed process" in removed[0]
    assert not workspace.exists() and not any((project / DVC_TEMP_RUNS).iterdir())
    assert not [row["run"] for row in experiment_rows(shown(project)) if "experiment" in row["run"]]
    assert remove_dead_runs(project) == []


def test_a_live_run_is_left_alone_and_a_dead_flow_runs_workspace_is_removed(tmp_path):
    project = make_shell_project(tmp_path, SLOW_STAGE)
    runs = project / RUNS_DIR
    runs.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    subprocess.run(["git", "worktree", "add", "--detach", str(runs / "dead-run")], cwd=project, check=True)
    (runs / f"dead-run{OWNER_SUFFIX}").write_text(dead.stdout.strip())
    (runs / "live-run").mkdir()
    (runs / f"live-run{OWNER_SUFFIX}").write_text(str(os.getpid()))
    assert remove_dead_runs(project) == ["removed the workspace of flow run dead-run, whose process was killed"]
    assert not (runs / "dead-run").exists() and (runs / "live-run").is_dir()
    worktrees = subprocess.run(["git", "worktree", "list"], cwd=project, capture_output=True, text=True).stdout
    assert "dead-run" not in worktrees


def test_failed_runs_show_no_metrics_and_say_so():
    metrics = {"metrics/eval.json": {"data": {"merged": {"task_accuracy": 0.9}}}}
    revision = {"rev": "abc1234", "name": "run-1-failed", "data": {"metrics": metrics}}
    rows = experiment_rows([{"rev": "workspace", "experiments": [{"revs": [revision], "executor": None}]}])
    assert rows[1] == {"run": "run-1-failed (experiment, failed)", "params": {}, "metrics": {}}
