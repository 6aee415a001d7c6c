"""The `sft-dpo` Prefect flow: dvc.yaml's stages, one Prefect task run each, in DVC's order.

The flow holds no ML logic and no stage list. It validates the run's params, reads the stage graph
from DVC, runs each stage with `dvc repro --single-item` (so DVC decides ran / skipped / restored
from its run-cache and records dvc.lock), forwards every line of output to the run's logs, records
the run as a DVC experiment and publishes the `eval-summary` and `run-report` artifacts, and the `dashboard`
stage's page: a link artifact to the file and its headline (tables and charts) as a markdown artifact.

A run with parameters (overrides, rounds, next_round) works in a git worktree of its own (flows/workspace.py) and
never writes the project's tree; a plain run works in the tree and holds it (flows/project_lock.py). Every run
first repairs DVC state a killed `dvc` command left half-written (flows/lockfile.py).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.states import Completed

from flows.dvc_project import (
    RAN,
    RESTORED,
    SKIPPED,
    SUMMARY_STAGE,
    RemoteError,
    StageFailed,
    StageGraph,
    StageRun,
    check_remote_usable,
    forget_remote,
    is_git_repository,
    matching_experiment,
    pull_outputs,
    push_outputs,
    read_graph,
    restore_stage_outputs,
    run_stage,
    save_experiment,
    stage_environment,
    unpushed_outputs,
    use_remote,
)
from flows.lockfile import recover_after_kill
from flows.params_file import extended_rounds, write_params
from flows.project_lock import holding_experiments, holding_tree
from flows.reports import changed_params, eval_summary_rows, guard_warnings, read_scores, run_report_markdown
from flows.sweep import point_rows, run_sweep
from flows.workspace import Workspace, WorkspaceConflict, bring_back, isolated_workspace, restore_outputs
from tasks.lib.params import ParamsError, apply_overrides, load_params
from tasks.lib.schema import Params
from tasks.lib.stage import BAD_INPUT_EXIT
from tasks.lib.warm import warm_stages

FLOW_NAME = "sft-dpo"
PARAMS_FILE = "params.yaml"
DASHBOARD_STAGE = "dashboard"
"""The stage whose outputs are the eval dashboard page (.html) and its headline (.md)."""


@dataclass
class RunPlan:
    """What a run changes in params.yaml, validated by the schema before any stage starts."""

    params: Params
    lasting: dict[str, Any] = field(default_factory=dict)
    """Changes brought back into the project after a successful run (the round `next_round` appends)."""
    this_run: dict[str, Any] = field(default_factory=dict)
    """Overrides for this run only: they live in the run's workspace and its experiment."""


def plan_run(path: Path, overrides: dict[str, Any], rounds: int | None, next_round: bool) -> RunPlan:
    """Validate the run's overrides, round count and next-round request against params.yaml."""
    if next_round and rounds is not None:
        raise ParamsError("give either rounds or next_round, not both")
    lasting: dict[str, Any] = {}
    if next_round:
        current = load_params(path, overrides)
        lasting = {"dpo.rounds": extended_rounds(current, len(current.dpo.rounds) + 1)}
    this_run = dict(overrides)
    if rounds is not None:
        this_run["dpo.rounds"] = extended_rounds(load_params(path, {**lasting, **this_run}), rounds)
    return RunPlan(load_params(path, {**lasting, **this_run}), lasting, this_run)


def _forward(logger, line: str) -> None:
    level = "error" if line.startswith("ERROR") else "warning" if line.startswith("WARNING") else "info"
    getattr(logger, level)(line)


def _retry_unless_bad_input(task, task_run, state) -> bool:
    """Retry failures that may pass next time (a lock, memory, a flaky disk), not a refused input."""
    error = state.result(raise_on_failure=False)
    return not (isinstance(error, StageFailed) and error.exit_status == BAD_INPUT_EXIT)


@task(
    name="stage",
    task_run_name="{name}",
    cache_policy=NO_CACHE,
    persist_result=False,
    retry_condition_fn=_retry_unless_bad_input,
)
def dvc_stage(project: str, name: str, may_have_changed: bool, push: bool = False):
    """One stage of dvc.yaml. The task run's state is named after the outcome: Ran, Skipped or Restored.

    `push`: send the outputs of a stage that ran or was restored to `storage.remote` (a failed push fails the task).
    """
    logger = get_run_logger()
    if not may_have_changed:
        logger.info("%s: dvc status shows no change and no stage it reads from ran; not started", name)
        return Completed(name=SKIPPED, message="nothing changed", data=StageRun(name, SKIPPED))
    run = run_stage(Path(project), name, on_line=lambda line: _forward(logger, line))
    logger.info("%s: %s in %.1f s", name, run.outcome, run.seconds)
    if push and run.outcome != SKIPPED:
        push_outputs(Path(project), name)
        logger.info("%s: outputs pushed to storage.remote", name)
    return Completed(name=run.outcome, message=f"{run.outcome} in {run.seconds:.1f} s", data=run)


class TreeChanged(RuntimeError):
    """Another command (a `dvc repro`, a run in another folder's process) changed the project during this run."""


def _lock_bytes(root: Path) -> bytes:
    lock = root / "dvc.lock"
    return lock.read_bytes() if lock.is_file() else b""


def _lock_entries(root: Path) -> tuple[bytes, dict[str, Any]]:
    raw = _lock_bytes(root)
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return raw, (yaml.load(raw, Loader=loader) or {}).get("stages", {}) if raw else {}


def run_stages(
    root: Path, graph: StageGraph, params: Params
) -> tuple[list[StageRun], StageFailed | TreeChanged | None]:
    """Every stage in order until one fails, or until dvc.lock shows another command's work.

    A stage that `dvc status` reports unchanged, and whose upstream stages all skipped, is not started at all.
    Between its stages, a run checks that dvc.lock changed only where its own stage did: a `dvc repro` typed while
    the run works in the same tree stops it (with a message) rather than mixing that command's results into its own.
    """
    stage_task = dvc_stage.with_options(
        retries=params.orchestration.retries, retry_delay_seconds=params.orchestration.retry_delay_seconds
    )
    executed: set[str] = set()
    runs: list[StageRun] = []
    before = _lock_entries(root)
    for name in graph.order:
        started = time.perf_counter()
        if _lock_bytes(root) != before[0]:
            return runs, _tree_changed(root, name, before[1], _lock_entries(root)[1])
        may_have_changed = name in graph.changed or bool(graph.upstream[name] & executed)
        push = params.storage.remote is not None
        state = stage_task(str(root), name, may_have_changed, push, return_state=True)
        if state.is_failed() or state.is_crashed():
            error = state.result(raise_on_failure=False)
            runs.append(StageRun(name, "Failed", time.perf_counter() - started))
            if not isinstance(error, StageFailed):
                raise error
            return runs, error
        run = state.result()
        runs.append(run)
        if run.outcome != SKIPPED:
            executed.add(name)
        if _lock_bytes(root) == before[0]:
            continue  # a stage that did not run left dvc.lock as it was: nothing to parse
        seen = _lock_entries(root)
        others = {stage for stage in set(before[1]) | set(seen[1]) if stage != name}
        if any(before[1].get(stage) != seen[1].get(stage) for stage in others):
            return runs, _tree_changed(root, name, before[1], seen[1], while_running=True)
        before = seen
    return runs, None


def _tree_changed(root: Path, name: str, expected: dict, found: dict, while_running: bool = False) -> TreeChanged:
    changed = sorted(stage for stage in set(expected) | set(found) if expected.get(stage) != found.get(stage))
    when = f"while {name} ran" if while_running else f"before {name}"
    return TreeChanged(
        f"another command changed {root / 'dvc.lock'} {when} (stages {', '.join(changed)}): a `dvc repro` or "
        "another run in this tree. This run stopped so that its record holds only its own results; run it again "
        "when the other command is done"
    )


def _check_pushed(root: Path) -> str:
    """Push whatever the remote still lacks (stages that were skipped here), then require `dvc status --cloud`
    clean: the run is not done until another machine can pull all of it."""
    push_outputs(root)
    missing = unpushed_outputs(root)
    if missing:
        raise RemoteError(f"storage.remote still lacks after the push: {', '.join(missing[:10])}")
    return "Every output dvc.lock records is in storage.remote (`dvc status --cloud` clean)."


def _metrics(root: Path, graph: StageGraph) -> dict[str, Any]:
    files = [path for paths in graph.metric_files.values() for path in paths if path.endswith(".json")]
    return {path: yaml.safe_load((root / path).read_text()) for path in files if (root / path).is_file()}


def _record(root: Path, graph: StageGraph, name: str) -> tuple[str | None, str]:
    if not is_git_repository(root):
        return None, "Not recorded: the project is not a git repository with a commit (`git init && git commit`)."
    files = [path for paths in graph.metric_files.values() for path in paths]
    unchanged = matching_experiment(root, files)
    if unchanged:
        name, commit = unchanged
        return name, f"Nothing changed since experiment `{name}` (commit `{commit[:12]}`); not recorded again."
    commit = save_experiment(root, name, files)
    return name, (
        f"Recorded as DVC experiment `{name}` (commit `{commit[:12]}`: this run's params.yaml, dvc.lock "
        "and metrics; `dvc exp show` lists every run)."
    )


def _record_failure(
    where: Path, graph: StageGraph, runs: list[StageRun], failure: Exception, name: str, workspace: Workspace | None
) -> tuple[str | None, str]:
    """Record what completed before the failure, and the failure, as experiment `<name>-failed`.

    DVC removed the failed stage's outputs before running it: they are put back first (from the project for an
    isolated run, from DVC's cache in place), and only the stages that completed are committed, so the experiment
    never holds a half-written output as if it were whole.
    """
    if not is_git_repository(where):
        return None, "Not recorded: the project is not a git repository with a commit."
    if isinstance(failure, TreeChanged):
        return None, "Not recorded: the tree holds another command's results too."
    completed = [run.name for run in runs if run.outcome in (RAN, RESTORED, SKIPPED)]
    if not completed:
        return None, "Not recorded: no stage completed."
    if isinstance(failure, StageFailed):
        outputs = graph.outputs.get(failure.name, [])
        if workspace is not None:
            restore_outputs(workspace, outputs)
        else:
            restore_stage_outputs(where, failure.name)
    files = [path for paths in graph.metric_files.values() for path in paths]
    message = f"sft-dpo run {name} failed\n\n{failure}"
    commit = save_experiment(where, f"{name}-failed", files, targets=completed, message=message)
    return f"{name}-failed", (
        f"Recorded as DVC experiment `{name}-failed` (commit `{commit[:12]}`): the stages that completed "
        "(dvc.lock, outputs in the cache) and the failure (its commit message: `git log -1 " + commit[:12] + "`)."
    )


def _sweep(root: Path, settings: dict[str, list[Any]], logger) -> dict[str, Any]:
    """Run the grid as DVC experiments, then re-render the dashboard so its runs panel compares them.

    The points run in DVC's temporary experiment workspaces; the dashboard is re-rendered in a workspace of its own
    (flows/workspace.py) and published as its headline: the project's tree is not written.
    """
    rows = point_rows(root, run_sweep(root, settings), settings)
    create_table_artifact(key="sweep", table=rows, description="Sweep points (DVC experiments) and merged's metrics")
    if DASHBOARD_STAGE in read_graph(root).order and is_git_repository(root):
        with isolated_workspace(root, f"{flow_run.name}-{flow_run.id[:8]}-dashboard") as workspace:
            run_stage(workspace.path, DASHBOARD_STAGE, partial(_forward, logger), force=True)
            publish_dashboard(None, *_dashboard_files(workspace.path, read_graph(workspace.path)))
    logger.info("sweep: %d points recorded as DVC experiments: %s", len(rows), ", ".join(r["experiment"] for r in rows))
    return {"sweep": rows}


def _dashboard_files(root: Path, graph: StageGraph) -> tuple[Path | None, str | None]:
    """The dashboard page (when the `dashboard` stage wrote one) and its headline's markdown."""
    outputs = [root / path for path in graph.outputs.get(DASHBOARD_STAGE, [])]
    page = next((path for path in outputs if path.suffix == ".html" and path.is_file()), None)
    headline = next((path for path in outputs if path.suffix == ".md" and path.is_file()), None)
    return (
        page.relative_to(root) if page else None,
        headline.read_text(encoding="utf-8") if headline else None,
    )


def publish_dashboard(page_root: Path | None, page: Path | None, headline: str | None) -> None:
    """The dashboard page as a link artifact (when it lives in `page_root`), its headline as a markdown artifact."""
    if page_root is not None and page is not None:
        create_link_artifact(
            key="dashboard",
            link=(page_root / page).as_uri(),
            link_text=f"eval dashboard ({page}, opens offline)",
            description="The run's eval dashboard: every round's metrics, win rates, lengths, curves, answers",
        )
    if headline is not None:
        create_markdown_artifact(
            key="dashboard-headline",
            markdown=headline,
            description="Headline of the eval dashboard: eval table, win rates and the main charts",
        )


def _run_pipeline(
    where: Path, params: Params, logger, notes: list[str]
) -> tuple[list[StageRun], StageFailed | TreeChanged | None, StageGraph, dict]:
    """Pull (with a remote), run every stage that may have changed, check the push: in `where`."""
    remote = params.storage.remote
    if remote:
        use_remote(where, remote)
        check_remote_usable(where, remote)
        pull_outputs(where)  # before reading the graph: what another machine pushed need not run here
        logger.info("pulled what storage.remote holds of dvc.lock's outputs")
    else:
        forget_remote(where)
    graph = read_graph(where)
    previous_scores = read_scores(where / graph.metric_files[SUMMARY_STAGE][0])
    # A warm server only when a stage will run (its imports cost seconds of a core).
    with warm_stages(stage_environment()) if graph.changed else contextlib.nullcontext():
        runs, failure = run_stages(where, graph, params)
    if failure is None and remote:
        notes.append(_check_pushed(where))
    return runs, failure, graph, previous_scores


def _workspace_note(workspace: Workspace, run: str, experiment: str | None, bring: bool) -> str:
    """Bring a next round back into the project, or say how to take the run."""
    if experiment is None:
        return "The run's workspace is removed; nothing was recorded."
    if not bring:
        return (
            f"Ran in a workspace of its own: the project's params.yaml, dvc.lock and outputs are untouched; "
            f"`dvc exp apply {experiment}` takes this run into the project."
        )
    with holding_tree(workspace.root, run, wait=True):  # not while a plain run works in the tree
        changed = bring_back(workspace, experiment)  # WorkspaceConflict fails the run; the experiment stays
    return f"The new round is in the project: {', '.join(changed)} updated and its outputs checked out."


@flow(name=FLOW_NAME, persist_result=False)
def sft_dpo(
    overrides: dict[str, Any] | None = None,
    rounds: int | None = None,
    next_round: bool = False,
    project: str = ".",
    sweep: dict[str, list[Any]] | None = None,
):
    """Run the SFT → DPO pipeline of dvc.yaml stage by stage.

    Args:
        overrides: params.yaml keys for this run only, e.g. `{"dpo.loss.beta": 0.2}`; validated first.
        rounds: number of DPO rounds for this run (appended rounds generate their own on-policy pairs).
        next_round: append the next round to params.yaml's rounds (kept once the run succeeds) and run its
            chain: prompts, generate, judge, pairs, reference log-probs, dpo, eval, gate, lineage.
        project: the project folder (holding dvc.yaml and params.yaml).
        sweep: a grid of params keys to values, e.g. `{"dpo.loss.beta": [0.05, 0.1, 0.5]}`: each point runs as a
            DVC experiment sharing every output its keys do not change (flows/sweep.py); runs on its own.
    """
    started = time.perf_counter()
    logger = get_run_logger()
    root = Path(project).resolve()
    if sweep:
        if overrides or rounds or next_round:
            raise ParamsError("sweep: runs on its own; give the other keys as sweep axes with one value")
        return _sweep(root, sweep, logger)
    notes: list[str] = []
    for repaired in recover_after_kill(root):  # a dvc command killed mid-write left DVC's state half-written
        logger.warning(repaired)
        notes.append(repaired)
    original = yaml.safe_load((root / PARAMS_FILE).read_text(encoding="utf-8"))
    plan = plan_run(root / PARAMS_FILE, overrides or {}, rounds, next_round)
    changes = {**plan.lasting, **plan.this_run}
    name = f"{flow_run.name}-{flow_run.id[:8]}"
    experiment = None
    if changes and not is_git_repository(root):
        raise ParamsError(
            "overrides, rounds and next_round run in a git worktree of the project and are recorded as DVC "
            "experiments: make the project a git repository with a commit (`git init && git add -A && git commit`)"
        )
    # A run that changes params works in a workspace of its own: the user's tree stays as the user left it. A plain
    # run works in the tree and holds it: a second plain run is refused rather than mixed with this one.
    with (
        isolated_workspace(root, name) if changes else contextlib.nullcontext() as workspace,
        contextlib.nullcontext() if changes else holding_tree(root, name, wait=False),
    ):
        where = workspace.path if workspace else root
        if changes:
            write_params(where / PARAMS_FILE, changes)
        runs, failure, graph, previous_scores = _run_pipeline(where, plan.params, logger, notes)
        with holding_experiments(root):
            if failure is None:
                experiment, note = _record(where, graph, name)
            else:
                experiment, note = _record_failure(where, graph, runs, failure, name, workspace)
        notes.append(note)
        if workspace is not None:
            try:
                notes.append(_workspace_note(workspace, name, experiment, bring=failure is None and bool(plan.lasting)))
            except WorkspaceConflict as conflict:
                failure = conflict
                notes.append(str(conflict))
        scores = read_scores(where / graph.metric_files[SUMMARY_STAGE][0])
        metrics = _metrics(where, graph)
        headline = _dashboard_files(where, graph)
    report = run_report_markdown(
        runs,
        flow_seconds=time.perf_counter() - started,
        failure=str(failure) if failure else None,
        params_changes=changed_params(original, apply_overrides(original, changes)),
        warnings=guard_warnings(metrics),
        notes=notes,
    )
    create_markdown_artifact(key="run-report", markdown=report, description="Stage outcomes of the sft-dpo run")
    if failure is not None:
        raise failure
    create_table_artifact(
        key="eval-summary",
        table=eval_summary_rows(scores, previous_scores),
        description="Eval metrics per model (change since the previous run)",
    )
    # The page's link only where it outlives the run: the project's own tree (an isolated run's is removed).
    publish_dashboard(root if workspace is None or plan.lasting else None, *headline)
    outcomes = {run.name: run.outcome for run in runs}
    ran = [name for name, outcome in outcomes.items() if outcome != SKIPPED]
    restored = [name for name, outcome in outcomes.items() if outcome == RESTORED]
    logger.info(
        "%d stages: %d ran or restored (%s), %d restored from run-cache",
        len(runs),
        len(ran),
        ", ".join(ran) or "none",
        len(restored),
    )
    return {"stages": outcomes, "experiment": experiment}
