"""storage.remote: the flow pulls what a run needs before it starts, pushes each stage's outputs when the stage
completes and checks the push before the run is done. Two clones share one local-folder remote: the second reuses
every output the first pushed. A failed push fails the run; an interrupted push is completed by the next one."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import commit_all, dvc, edit_params, make_project, make_shell_project, micro, project_env, read_json

from flows.dvc_project import REMOTE_NAME, push_outputs, unpushed_outputs, use_remote

# `report` (the summary stage) reads dpo.loss.beta; each stage appends to a counts file outside the projects.
REMOTE_DAG = r"""
stages:
  source:
    cmd: echo base > source.txt && echo ran >> {counts}/source
    outs: [source.txt]
  left:
    cmd: cat source.txt source.txt > left.txt && echo ran >> {counts}/left
    deps: [source.txt]
    outs: [left.txt]
  report:
    cmd: >-
      mkdir -p metrics && python -c "import yaml, json; params = yaml.safe_load(open('params.yaml'));
      merged = {{'task_accuracy': params['dpo']['loss']['beta'], 'chars': len(open('left.txt').read())}};
      json.dump({{'merged': merged}}, open('metrics/eval.json', 'w'))"
      && echo ran >> {counts}/report
    deps: [left.txt]
    params: [dpo.loss.beta]
    metrics: [metrics/eval.json]
"""


def runs(counts: Path) -> dict[str, int]:
    return {path.name: len(path.read_text().splitlines()) for path in sorted(counts.iterdir())}


def with_remote(url: Path):
    def edit(params: dict) -> None:
        params["storage"]["remote"] = str(url)
        params["orchestration"]["retries"] = 0

    return edit


def set_beta(beta: float):
    def edit(params: dict) -> None:
        params["dpo"]["loss"]["beta"] = beta

    return edit


# Slow (24 s of flow runs): make test was over its 6 minutes; the real-pipeline test below covers the same path.
@pytest.mark.slow
def test_a_second_clone_reuses_what_the_first_pushed_and_runs_only_what_changed(harness, tmp_path):
    from flows.pipeline import sft_dpo

    counts, remote = tmp_path / "counts", tmp_path / "remote"
    counts.mkdir()
    (tmp_path / "a").mkdir()
    first = make_shell_project(tmp_path / "a", REMOTE_DAG.format(counts=counts))
    edit_params(first, with_remote(remote))
    commit_all(first, "remote")

    sft_dpo(project=str(first))
    assert runs(counts) == {"left": 1, "report": 1, "source": 1}
    assert unpushed_outputs(first) == []
    commit_all(first, "first run")  # dvc.lock travels by git; outputs by the DVC remote

    second = tmp_path / "b"
    subprocess.run(["git", "clone", "-q", str(first), str(second)], check=True)
    edit_params(second, set_beta(0.3))
    sft_dpo(project=str(second))
    assert runs(counts) == {"left": 1, "report": 2, "source": 1}, "the second clone re-ran what the first pushed"
    assert (second / "left.txt").read_text() == (first / "left.txt").read_text()

    edit_params(first, set_beta(0.3))
    sft_dpo(project=str(first))
    assert read_json(second / "metrics/eval.json") == read_json(first / "metrics/eval.json")
    assert unpushed_outputs(second) == []


@pytest.mark.slow
def test_a_clone_finishes_the_micro_pipeline_another_clone_ran_to_dpo_r1(harness, tmp_path):
    """Clone A runs the micro pipeline to dpo@r1 and pushes; clone B pulls and runs the rest, re-running nothing A
    ran; B's final metrics are the ones A gets when it runs to the end itself."""
    from flows.pipeline import sft_dpo

    remote = tmp_path / "remote"

    def micro_with_remote(params: dict) -> None:
        micro(params)
        with_remote(remote)(params)

    first = make_project(tmp_path / "a", micro_with_remote)
    use_remote(first, str(remote))
    dvc(first, "repro", "dpo@r1")
    dvc(first, "push")
    commit_all(first, "ran to dpo@r1")
    ran_by_first = set(yaml.safe_load((first / "dvc.lock").read_text())["stages"])
    assert "dpo@r1" in ran_by_first and "eval@r1" not in ran_by_first

    second = tmp_path / "b"
    subprocess.run(["git", "clone", "-q", str(first), str(second)], check=True)
    outcomes = sft_dpo(project=str(second))["stages"]
    assert {name for name, outcome in outcomes.items() if outcome == "Skipped"} == ran_by_first
    assert {"eval@r1", "gate@r1", "dpo@r2", "report"} <= {n for n, outcome in outcomes.items() if outcome == "Ran"}
    assert unpushed_outputs(second) == []

    dvc(first, "repro")
    assert read_json(second / "metrics/eval.json") == read_json(first / "metrics/eval.json")


def test_an_unusable_remote_fails_the_run_before_any_stage_and_null_forgets_the_remote(harness, tmp_path):
    from flows.pipeline import sft_dpo

    counts = tmp_path / "counts"
    counts.mkdir()
    (tmp_path / "project").mkdir()
    project = make_shell_project(tmp_path / "project", REMOTE_DAG.format(counts=counts))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    edit_params(project, with_remote(blocker / "remote"))

    state = sft_dpo(project=str(project), return_state=True)

    assert state.is_failed()
    with pytest.raises(Exception, match=r"storage.remote .*a-file is a file"):
        state.result()
    assert runs(counts) == {}, "a stage ran before the remote was found unusable"

    def no_remote(params: dict) -> None:
        params["storage"]["remote"] = None

    edit_params(project, no_remote)
    assert sft_dpo(project=str(project), return_state=True).is_completed()
    assert REMOTE_NAME not in dvc(project, "remote", "list", "--local").stdout
    assert runs(counts) == {"left": 1, "report": 1, "source": 1}


def test_an_interrupted_push_is_seen_and_the_next_push_completes_it(tmp_path):
    (tmp_path / "project").mkdir()
    project = make_shell_project(tmp_path / "project", "stages: {}\n")
    files = project / "many"
    files.mkdir()
    for index in range(400):
        (files / f"{index:04d}.txt").write_text(f"file {index}\n" * 50)
    dvc(project, "add", "many")
    for attempt in range(5):
        remote = tmp_path / f"remote{attempt}"
        use_remote(project, str(remote))
        push = subprocess.Popen(
            [sys.executable, "-m", "dvc", "push"], cwd=project, env=project_env(project), stdout=subprocess.DEVNULL
        )
        while push.poll() is None and not any(path.is_file() for path in remote.rglob("*")):
            time.sleep(0.005)
        if push.poll() is None:
            push.send_signal(signal.SIGKILL)
            push.wait()
            break
    else:
        pytest.fail("every push finished before it could be interrupted: nothing was tested")
    missing = unpushed_outputs(project)
    assert missing and all("many" in entry for entry in missing)

    push_outputs(project)

    assert unpushed_outputs(project) == []
    stored = [path for path in (remote / "files" / "md5").rglob("*") if path.is_file()]
    # A killed upload leaves its partial file under a hidden temporary name, never under an object's name.
    assert all(path.name.startswith(".") and path.name.endswith(".tmp") for path in stored if path.name[0] == ".")
    objects = [path for path in stored if not path.name.startswith(".")]
    assert len(objects) >= 400
    for path in objects:  # content-addressed: every object holds exactly the content its name hashes
        name = (path.parent.name + path.name).removesuffix(".dir")
        assert hashlib.md5(path.read_bytes()).hexdigest() == name, path
    remote_config = (project / ".dvc" / "config.local").read_text()
    assert REMOTE_NAME in remote_config and str(remote) in remote_config
