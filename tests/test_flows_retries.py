"""The flow's mechanics on tiny shell-command DAGs (seconds, no models): ordering, next round, retries, logs,
reports."""

from __future__ import annotations

import subprocess

import networkx as nx
import pytest
import yaml
from conftest import DIAMOND_DAG, make_shell_project

from flows.dvc_project import RAN, RESTORED, SKIPPED, experiment_commits, read_graph
from flows.pipeline import sft_dpo
from flows.reports import changed_params, eval_summary_rows, guard_warnings

# `flaky` fails on its first attempt only, as a stage does when it loses a lock or a worker.
SHELL_DAG = r"""
stages:
  first:
    cmd: echo "first says hello" && echo one > first.txt
    params: [eval.limit]
    outs: [first.txt]
  flaky:
    cmd: 'test -f .attempted || { touch .attempted; echo "transient trouble" >&2; exit 1; }; cp first.txt flaky.txt'
    deps: [first.txt]
    outs: [flaky.txt]
  report:
    cmd: >-
      mkdir -p metrics && echo '{"sft": {"accuracy": 0.5}}' > metrics/eval.json
    deps: [flaky.txt]
    metrics: [metrics/eval.json: {cache: false}]
"""


@pytest.fixture
def shell_project(tmp_path):
    return make_shell_project(tmp_path, SHELL_DAG)


def test_flow_runs_every_stage_of_the_dag_in_dependency_order(harness, tmp_path):
    project = make_shell_project(tmp_path, DIAMOND_DAG)
    outcomes = sft_dpo(project=str(project))["stages"]
    graph = read_graph(project)
    assert list(outcomes) == graph.order and set(outcomes.values()) == {RAN}
    position = {name: index for index, name in enumerate(outcomes)}
    for name, upstream in graph.upstream.items():
        assert all(position[before] < position[name] for before in upstream), name
    dependencies = nx.DiGraph([(before, name) for name, ups in graph.upstream.items() for before in ups])
    assert nx.is_directed_acyclic_graph(dependencies) and {"left", "right", "round@r2", "report"} <= set(dependencies)
    assert graph.upstream["round@r1"] == {"left", "right"} and graph.upstream["report"] == {"round@r1", "round@r2"}


def test_next_round_appends_a_round_and_runs_only_its_stages(harness, tmp_path):
    """The flow appends r3 to params.yaml (kept once the run succeeds) and DVC runs r3's stages only."""
    project = make_shell_project(tmp_path, DIAMOND_DAG)
    sft_dpo(project=str(project))
    state = sft_dpo(project=str(project), next_round=True, return_state=True)
    assert state.is_completed(), state.message
    active = {name for name, outcome in state.result()["stages"].items() if outcome != SKIPPED}
    assert active == {"round@r3"}
    rounds = yaml.safe_load((project / "params.yaml").read_text())["dpo"]["rounds"]
    assert list(rounds) == ["r1", "r2", "r3"] and rounds["r3"] == {"previous": "r2", "reference": "sft"}
    assert (project / "round_r3.txt").exists()


def test_transient_failure_is_retried_and_stage_output_reaches_the_logs(harness, shell_project, caplog):
    overrides = {"orchestration.retries": 1, "orchestration.retry_delay_seconds": 0}
    result = sft_dpo(project=str(shell_project), overrides=overrides)
    assert result["stages"] == {"first": RAN, "flaky": RAN, "report": RAN}
    lines = [record.getMessage() for record in caplog.records]
    assert "first says hello" in lines and "transient trouble" in lines
    # A run with overrides works in a workspace of its own: the project's tree is untouched.
    assert result["experiment"] and not (shell_project / "flaky.txt").exists()


def test_without_retries_the_transient_failure_fails_the_run(harness, shell_project):
    state = sft_dpo(project=str(shell_project), overrides={"orchestration.retries": 0}, return_state=True)
    assert state.is_failed() and "stage flaky failed (exit status 1)" in state.message
    (shell_project / ".attempted").touch()  # the trouble is over
    again = sft_dpo(project=str(shell_project), return_state=True)
    # What the failed run completed (in its own workspace) comes back from DVC's run-cache.
    assert again.result()["stages"] == {"first": RESTORED, "flaky": RAN, "report": RAN}


def test_experiment_needs_no_configured_git_identity(harness, shell_project, monkeypatch):
    monkeypatch.setenv("HOME", str(shell_project))  # no ~/.gitconfig
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(shell_project))
    result = sft_dpo(
        project=str(shell_project), overrides={"orchestration.retries": 1, "orchestration.retry_delay_seconds": 0}
    )
    commit = experiment_commits(shell_project)[result["experiment"]]
    author = subprocess.run(
        ["git", "log", "-1", "--format=%an", commit],
        cwd=shell_project,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert result["experiment"] and author == "sft-dpo flow"


def test_eval_summary_shows_change_since_previous_run():
    rows = eval_summary_rows({"sft": {"acc": 0.5}, "r1": {"acc": 0.75}}, {"sft": {"acc": 0.5}, "r1": {"acc": 0.7}})
    assert rows == [{"model": "sft", "acc": "0.5 (+0)"}, {"model": "r1", "acc": "0.75 (+0.05)"}]
    assert eval_summary_rows({"r2": {"acc": 0.8}}, {})[0]["acc"] == "0.8 (new)"


def test_changed_params_and_guard_warnings():
    before = {"dpo": {"loss": {"beta": 0.1}, "rounds": {"r1": {"pairs": "a"}}}}
    after = {"dpo": {"loss": {"beta": 0.2}, "rounds": {"r1": {"pairs": "a"}, "r2": {"pairs": "b"}}}}
    assert changed_params(before, after) == {"dpo.loss.beta": (0.1, 0.2), "dpo.rounds.r2": (None, {"pairs": "b"})}
    metrics = {"metrics/guard_r1.json": {"guard_reasons": ["chosen log-prob fell"]}, "metrics/sft.json": {}}
    assert guard_warnings(metrics) == ["metrics/guard_r1.json: chosen log-prob fell"]
