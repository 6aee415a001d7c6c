"""Runs at once in one project: two runs with overrides (each in its own workspace), two plain runs and a manual
`dvc repro` in the tree, all started together. Each ends completed or refused with a clear message; no lock, holder
file or workspace is left; no run's results land in another's record or in the tree."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import commit_all, edit_params, make_shell_project, project_env

from flows.dvc_project import experiment_commits
from flows.project_lock import TREE_LOCK
from flows.workspace import RUNS_DIR

# Each stage takes a second, so that the runs overlap; the summary metric carries the beta the run saw.
BETA_DAG = r"""
stages:
  first:
    cmd: >-
      python -c "import yaml; params = yaml.safe_load(open('params.yaml'));
      open('first.txt', 'w').write(str(params['dpo']['loss']['beta']))" && sleep 1
    params: [dpo.loss.beta]
    outs: [first.txt]
  second:
    cmd: sleep 1 && cp first.txt second.txt
    deps: [first.txt]
    outs: [second.txt]
  report:
    cmd: >-
      mkdir -p metrics && python -c "import json; beta = float(open('second.txt').read());
      json.dump({'sft': {'beta': beta}}, open('metrics/eval.json', 'w'))"
    deps: [second.txt]
    metrics: [metrics/eval.json: {cache: false}]
"""
# What a run may answer instead of completing: each names what it met.
REFUSALS = (
    "is running in the project's tree",  # a second plain run (flows/project_lock.py)
    "another command changed",  # a plain run that met the manual repro's results between its stages
    "Unable to acquire lock",  # DVC's repository lock, met by the manual repro or a plain run's stage
)


def start_flow(project: Path, api_url: str, overrides: dict | None) -> subprocess.Popen:
    script = textwrap.dedent(
        f"""
        import json
        from flows.pipeline import sft_dpo
        state = sft_dpo(project={str(project)!r}, overrides={overrides!r}, return_state=True)
        result = state.result(raise_on_failure=False) if state.is_completed() else None
        print("RESULT " + json.dumps({{"completed": state.is_completed(), "message": state.message,
                                      "experiment": result["experiment"] if result else None}}))
        """
    )
    env = {**project_env(project), "PREFECT_API_URL": api_url}
    return subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def outcome(process: subprocess.Popen) -> dict:
    output = process.communicate(timeout=300)[0]
    line = next((line for line in output.splitlines() if line.startswith("RESULT ")), None)
    assert line is not None, output[-3000:]
    return json.loads(line.removeprefix("RESULT "))


def recorded(project: Path, commit: str, path: str) -> str:
    return subprocess.run(
        ["git", "show", f"{commit}:{path}"], cwd=project, capture_output=True, text=True, check=True
    ).stdout


@pytest.mark.slow  # five processes on two cores; CI runs it
def test_runs_started_together_complete_or_are_refused_and_never_mix(harness, tmp_path):
    from filelock import FileLock
    from prefect.settings import PREFECT_API_URL

    project = make_shell_project(tmp_path, BETA_DAG)
    edit_params(project, lambda params: params["orchestration"].update(retries=0))
    commit_all(project, "no retries")
    api_url = PREFECT_API_URL.value()

    runs = {
        "beta 0.3": start_flow(project, api_url, {"dpo.loss.beta": 0.3}),
        "beta 0.7": start_flow(project, api_url, {"dpo.loss.beta": 0.7}),
        "plain A": start_flow(project, api_url, None),
        "plain B": start_flow(project, api_url, None),
    }
    manual = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro"], cwd=project, env=project_env(project), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    outcomes = {name: outcome(process) for name, process in runs.items()}
    manual_output = manual.communicate(timeout=300)[0]

    for name in ("beta 0.3", "beta 0.7"):
        assert outcomes[name]["completed"], f"{name}: {outcomes[name]['message']}"
    for name, result in outcomes.items():
        assert result["completed"] or any(refusal in result["message"] for refusal in REFUSALS), (name, result)
    assert manual.returncode == 0 or "Unable to acquire lock" in manual_output, manual_output[-2000:]
    in_tree = [outcomes["plain A"]["completed"], outcomes["plain B"]["completed"], manual.returncode == 0]
    assert any(in_tree), "nothing that works in the tree completed"

    for name, commit in experiment_commits(project).items():
        params_beta = yaml.safe_load(recorded(project, commit, "params.yaml"))["dpo"]["loss"]["beta"]
        assert json.loads(recorded(project, commit, "metrics/eval.json"))["sft"]["beta"] == params_beta, name
    for name in ("beta 0.3", "beta 0.7"):
        commit = experiment_commits(project)[outcomes[name]["experiment"]]
        assert json.loads(recorded(project, commit, "metrics/eval.json"))["sft"]["beta"] == float(name.split()[1])

    tree_beta = yaml.safe_load((project / "params.yaml").read_text())["dpo"]["loss"]["beta"]
    if (project / "metrics/eval.json").exists():
        assert json.loads((project / "metrics/eval.json").read_text())["sft"]["beta"] == tree_beta
    FileLock(str(project / TREE_LOCK)).acquire(timeout=0).lock.release()
    assert not (project / (TREE_LOCK + ".holder")).exists()
    rwlock = json.loads((project / ".dvc/tmp/rwlock").read_text() or "{}")  # DVC's per-path locks: none held
    assert not any(rwlock.values()), rwlock
    assert not list((project / RUNS_DIR).iterdir())
    assert len(subprocess.run(["git", "worktree", "list"], cwd=project, capture_output=True, text=True).stdout
               .splitlines()) == 1  # fmt: skip
