"""flows/workspace.py: a run with overrides, rounds or a next round works in a git worktree of its own and never
writes the user's working tree; it is recorded as a DVC experiment (failed runs too) that `dvc exp apply` takes; a
next round comes back only if the user did not change the same files meanwhile. Shell-command DAGs, no models."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml
from conftest import DIAMOND_DAG, commit_all, dvc, make_shell_project

from flows.dvc_project import RAN, RESTORED, SKIPPED, experiment_commits
from flows.pipeline import sft_dpo
from flows.workspace import RUNS_DIR

# The rounds append a line to the user's params.yaml (by its absolute path) when the marker exists: an edit the
# user makes while a run is under way.
EDITING_DAG = DIAMOND_DAG.replace(
    "cmd: cat left.txt right.txt > round_${key}.txt",
    "cmd: cat left.txt right.txt > round_${key}.txt && { test ! -f {marker} || echo '# edited' >> {params}; }",
)
FAILING_DAG = r"""
stages:
  first:
    cmd: echo one > first.txt
    params: [eval.limit]
    outs: [first.txt]
  second:
    cmd: test -f ok || { echo "second cannot go on" >&2; exit 1; }; cp first.txt second.txt
    deps: [first.txt]
    outs: [second.txt]
  report:
    cmd: >-
      mkdir -p metrics && echo '{"sft": {"accuracy": 0.5}}' > metrics/eval.json
    deps: [second.txt]
    metrics: [metrics/eval.json: {cache: false}]
"""
NO_RETRIES = {"orchestration.retries": 0}


def snapshot(project: Path) -> dict[str, bytes]:
    """Every file of the user's tree (outside git's and DVC's own stores)."""
    stores = {(".git",), (".dvc", "cache"), (".dvc", "tmp"), (".dvc", "site_cache")}
    files = {}
    for path in sorted(project.rglob("*")):
        parts = path.relative_to(project).parts
        if path.is_file() and parts[:1] not in stores and parts[:2] not in stores:
            files["/".join(parts)] = path.read_bytes()
    return files


def git(project: Path, *arguments: str) -> str:
    return subprocess.run(["git", *arguments], cwd=project, capture_output=True, text=True, check=True).stdout


def recorded(project: Path, experiment: str, path: str) -> str:
    return git(project, "show", f"{experiment_commits(project)[experiment]}:{path}")


def test_a_run_with_more_rounds_leaves_the_tree_as_the_user_left_it_until_dvc_exp_apply(harness, tmp_path):
    project = make_shell_project(tmp_path, DIAMOND_DAG)
    sft_dpo(project=str(project))
    commit_all(project, "two rounds")
    with (project / "params.yaml").open("a") as params:
        params.write("# an edit the user has not committed\n")
    before = snapshot(project)

    result = sft_dpo(project=str(project), rounds=3)

    assert result["stages"]["round@r3"] == RAN and result["stages"]["round@r1"] == SKIPPED
    assert snapshot(project) == before, "the run wrote the user's working tree"
    assert not (project / "round_r3.txt").exists() and not list((project / RUNS_DIR).iterdir())
    assert len(git(project, "worktree", "list").splitlines()) == 1, "the run's worktree was left behind"
    params = recorded(project, result["experiment"], "params.yaml")
    assert "# an edit the user has not committed" in params, "the run did not start from the user's tree"
    assert list(yaml.safe_load(params)["dpo"]["rounds"]) == ["r1", "r2", "r3"]

    dvc(project, "exp", "apply", result["experiment"])
    assert list(yaml.safe_load((project / "params.yaml").read_text())["dpo"]["rounds"]) == ["r1", "r2", "r3"]
    assert (project / "round_r3.txt").read_text() == "base\nbase\n"
    assert "Data and pipelines are up to date" in dvc(project, "status").stdout


def test_a_failed_run_is_recorded_with_what_completed_and_the_failure(harness, tmp_path):
    project = make_shell_project(tmp_path, FAILING_DAG)
    before = snapshot(project)

    state = sft_dpo(project=str(project), overrides=NO_RETRIES, return_state=True)

    assert state.is_failed() and "stage second failed (exit status 1)" in state.message
    assert snapshot(project) == before
    [failed] = [name for name in experiment_commits(project) if name.endswith("-failed")]
    lock = yaml.safe_load(recorded(project, failed, "dvc.lock"))["stages"]
    assert set(lock) == {"first"}, "the experiment holds a stage that did not complete"
    message = git(project, "log", "-1", "--format=%B", experiment_commits(project)[failed])
    assert "stage second failed (exit status 1)" in message and "second cannot go on" in message

    (project / "ok").write_text("")
    outcomes = sft_dpo(project=str(project), overrides=NO_RETRIES)["stages"]
    assert outcomes == {"first": RESTORED, "second": RAN, "report": RAN}, "the completed stage was not reused"


def test_a_next_round_the_user_edited_params_for_meanwhile_fails_and_stays_an_experiment(harness, tmp_path):
    marker = tmp_path / "edit-during-run"
    (tmp_path / "project").mkdir()
    project = tmp_path / "project"
    make_shell_project(
        project, EDITING_DAG.replace("{marker}", str(marker)).replace("{params}", str(project / "params.yaml"))
    )
    sft_dpo(project=str(project))
    commit_all(project, "two rounds")
    marker.write_text("")

    state = sft_dpo(project=str(project), next_round=True, return_state=True)

    assert state.is_failed()
    message = state.message
    assert "params.yaml changed in" in message and "while the run ran" in message and "dvc exp apply" in message
    params = (project / "params.yaml").read_text()
    assert params.endswith("# edited\n") and list(yaml.safe_load(params)["dpo"]["rounds"]) == ["r1", "r2"]
    assert not (project / "round_r3.txt").exists()
    kept = re.search(r"kept as DVC experiment (\S+)", message).group(1)
    assert list(yaml.safe_load(recorded(project, kept, "params.yaml"))["dpo"]["rounds"]) == ["r1", "r2", "r3"]
