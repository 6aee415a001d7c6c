"""flows/pipeline.py under prefect_test_harness on copies of the micro pipeline: re-run, overridden, broken, resumed
and refused. Ordering, retries, logging and next-round are tested on shell-command DAGs (test_flows_retries.py);
the next round's real on-policy chain under DVC in test_onpolicy.py."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time

import pytest
import yaml
from conftest import dvc

from flows.dvc_project import RAN, RESTORED, SKIPPED, StageFailed, experiment_commits, read_graph
from flows.pipeline import sft_dpo
from tasks.lib.params import ParamsError

FAST_RETRIES = {"orchestration.retries": 1, "orchestration.retry_delay_seconds": 0}


def run_flow(project, **parameters):
    return sft_dpo(project=str(project), return_state=True, **parameters)


def task_runs(state) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read():
        async with get_client() as client:
            flow_filter = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
            return await client.read_task_runs(flow_run_filter=flow_filter)

    # Task runs reach the API as events, a moment after the flow returns: read until the list stops growing.
    runs, previous = asyncio.run(read()), None
    deadline = time.monotonic() + 15
    while (previous is None or len(runs) != len(previous)) and time.monotonic() < deadline:
        time.sleep(1)
        previous, runs = runs, asyncio.run(read())
    return runs


def latest_artifact(key: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    async def read():
        async with get_client() as client:
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                sort=ArtifactSort.CREATED_DESC,
                limit=1,
            )
            return found[0]

    return asyncio.run(read())


@pytest.fixture
def flow_project(harness, project_copy):
    """A private copy of the finished micro pipeline, for a flow run to change."""
    return project_copy


def test_run_after_repro_skips_every_stage_and_publishes_the_dashboard(flow_project):
    project = flow_project
    state = run_flow(project)
    assert state.is_completed()
    assert set(state.result()["stages"].values()) == {SKIPPED}
    runs = task_runs(state)
    assert len(runs) == len(read_graph(project).order) and {run.state.name for run in runs} == {SKIPPED}

    summary = latest_artifact("eval-summary")
    rows = json.loads(summary.data) if isinstance(summary.data, str) else summary.data
    assert [row["model"] for row in rows if not row["model"].endswith("*")] == ["sft", "r1", "r2", "merged"]
    assert rows[0]["preference_accuracy"].endswith("(+0)")
    report = latest_artifact("run-report").data
    assert "| sft | Skipped |" in report and "Params that differ from params.yaml" in report
    # Prefect stores a link artifact as a markdown link.
    assert (project / "reports" / "dashboard.html").as_uri() in latest_artifact("dashboard").data
    headline = latest_artifact("dashboard-headline").data
    assert "| r1 | sft |" in headline and headline.count("](data:image/png;base64,") >= 3


@pytest.mark.slow  # 40 s; make test keeps test_flows_workspace's run apart from the tree
def test_an_override_runs_what_dvc_says_apart_from_the_tree_and_dvc_exp_apply_takes_it(flow_project):
    project = flow_project
    before = {name: (project / name).read_bytes() for name in ("params.yaml", "dvc.lock", "metrics/eval.json")}
    # Only the gates read it, and both rounds pass either tolerance: DVC re-runs the gates and nothing after them.
    override = {"dpo.gate.max_chosen_nll_rise": 0.5}

    state = run_flow(project, overrides=override)
    assert state.is_completed(), state.message
    ran = {name for name, outcome in state.result()["stages"].items() if outcome != SKIPPED}
    gates = {"gate@r1", "gate@r2"}
    assert gates <= ran <= gates | {"check_params", "lineage@r1", "lineage@r2", "report", "dashboard"}
    assert {name: (project / name).read_bytes() for name in before} == before, "the run wrote the user's tree"
    assert "`dpo.gate.max_chosen_nll_rise`: 0.05 → 0.5" in latest_artifact("run-report").data

    experiment = state.result()["experiment"]
    recorded = subprocess.run(
        ["git", "show", f"{experiment_commits(project)[experiment]}:params.yaml"],
        cwd=project,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert yaml.safe_load(recorded)["dpo"]["gate"]["max_chosen_nll_rise"] == 0.5

    dvc(project, "exp", "apply", experiment)
    assert yaml.safe_load((project / "params.yaml").read_text())["dpo"]["gate"]["max_chosen_nll_rise"] == 0.5
    status = dvc(project, "status").stdout
    assert "up to date" in status, status


def test_failing_stage_fails_the_flow_keeps_its_previous_outputs_and_is_recorded(flow_project):
    """In place (no overrides): the failed stage's previous outputs are back, the run is a `-failed` experiment."""
    project = flow_project
    pairs = project / "data" / "incoming" / "r2.jsonl"
    good = (project / "data" / "builtin" / "pairs_r2.jsonl").read_text().splitlines()[:3]
    bad_line = len(good) + 1
    pairs.write_text("\n".join(good) + '\n{"prompt": "no answers"}\n')
    previous = {path: path.read_bytes() for path in (project / "data/rounds/r2").glob("*prompts.jsonl")}
    assert previous

    state = run_flow(project)
    assert state.is_failed()
    with pytest.raises(StageFailed) as error:
        state.result()
    assert error.value.name == "prompts@r2" and error.value.exit_status == 2
    assert f"incoming/r2.jsonl:{bad_line}" in str(error.value)
    failed = next(run for run in task_runs(state) if run.name == "prompts@r2")
    assert failed.run_count == 1, "a stage that refused its input must not be retried"
    report = latest_artifact("run-report").data
    assert "### Failure" in report and "-failed` (commit" in report
    assert {path: path.read_bytes() for path in previous} == previous, "the failed stage's outputs were lost"

    pairs.unlink()
    outcomes = run_flow(project).result()["stages"]
    active = {name for name, outcome in outcomes.items() if outcome != SKIPPED}
    # data/incoming is one dependency of every round's prompts stage: prompts@r1 re-runs, to the same output, so
    # nothing downstream of it does; prompts@r2's outputs were put back, so it has nothing to do.
    assert outcomes["prompts@r1"] in (RAN, RESTORED) and outcomes["prompts@r2"] == SKIPPED
    assert active <= {"check_params", "prompts@r1"}


def test_bad_override_fails_before_any_stage_with_the_schema_message(flow_project):
    project = flow_project
    params_before = (project / "params.yaml").read_text()
    state = run_flow(project, overrides={"dpo.beta": 0.2})
    assert state.is_failed()
    with pytest.raises(ParamsError, match=r"dpo.beta: unknown key; did you mean dpo.loss.beta\?"):
        state.result()
    assert task_runs(state) == []
    assert (project / "params.yaml").read_text() == params_before
