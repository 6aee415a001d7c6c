"""Crash injection: SIGKILL `dvc repro`, or the Prefect flow's process, at seeded random moments in every stage, then
run again, and check what a crash may never do.

A reproduced project is the reference (its outputs' digests, its `metrics/eval.json`). Each trial picks a stage
(every stage of dvc.yaml in turn, in a seeded order), drops its entry from dvc.lock so that it must run, starts the
pipeline (`dvc repro --no-run-cache`, or the flow with DVC's run-cache emptied, so the stage really works rather than
being restored; the stages after it see the same bytes and do not run), and kills the whole process group with
SIGKILL at a moment drawn uniformly within the stage's measured duration. Then:
- right after the kill, every output path of every stage is absent or whole (byte-identical to the reference): a
  half-written output is counted as corrupted;
- the run again (`dvc repro`, or the flow) completes, `dvc status` is clean, every output and `metrics/eval.json`
  equal the reference ("resumed identical"); scratch folders left beside outputs by the killed stage are counted,
  right after the kill and after the rerun (whose writer of that output removes them).
TensorBoard event files (`logs/`) carry wall-clock times in their names and content: only their presence is compared.
The dashboard (`reports/`) lists the DVC experiments, which the flow's trials add: it is checked whole, not for bytes.

    .venv/bin/python benchmarks/chaos.py [--trials 50] [--seed 0] [--flow-every 5]   # make chaos

On a clean clone of this checkout (the demo config), reproduced first; `run_trials` is what tests/test_chaos.py
calls on the micro pipeline.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from onpolicy import clone, environment, timed_run  # noqa: E402  (the clean-clone helpers)

DVC = [sys.executable, "-m", "dvc"]
SUMMARY = "metrics/eval.json"
FLOW_START_S = 5.0
"""Seconds a flow process takes on this 2-core machine before its first stage starts (imports, Prefect's run)."""
WALL_CLOCK_OUTPUTS = ("logs/",)
"""Outputs whose bytes differ between identical runs (TensorBoard event files): only their presence is compared."""
RUNS_PANEL_OUTPUTS = ("reports/",)
"""The dashboard, whose runs panel lists the DVC experiments, which the flow's trials add to: checked whole (the page
closes, the headline is not empty), not against the reference's bytes."""


@dataclass
class Trial:
    stage: str
    mode: str
    kill_after_s: float
    killed: bool = False
    corrupted: list[str] = field(default_factory=list)
    rerun_completed: bool = False
    identical: bool = False
    scratch_left: list[str] = field(default_factory=list)
    scratch_after_rerun: list[str] = field(default_factory=list)
    lock_put_back: bool = False
    note: str = ""


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def digest(project: Path, output: str) -> object:
    """An output's content: None when absent, a file's sha256, or a folder's {relative path: sha256}."""
    path = project / output
    if output.startswith(WALL_CLOCK_OUTPUTS):
        # Event files are named after the wall clock, host and pid and hold times (a resumed run adds one): whether
        # the folder is there with files in it.
        return None if not path.exists() else any(p.is_file() for p in path.rglob("*"))
    if output.startswith(RUNS_PANEL_OUTPUTS) and path.is_file():
        text = path.read_text(encoding="utf-8", errors="replace").rstrip()
        return "whole" if (text.endswith("</html>") if path.suffix == ".html" else bool(text)) else "partial"
    if path.is_file():
        return _file_digest(path)
    if path.is_dir():
        return {str(p.relative_to(path)): _file_digest(p) for p in sorted(path.rglob("*")) if p.is_file()}
    return None


def stage_outputs(project: Path) -> tuple[list[str], dict[str, list[str]]]:
    from flows.dvc_project import read_graph

    graph = read_graph(project)
    return graph.order, graph.outputs


def snapshot(project: Path, outputs: dict[str, list[str]]) -> dict[str, object]:
    return {output: digest(project, output) for paths in outputs.values() for output in paths}


def scratch_left_beside(project: Path, outputs: list[str]) -> list[str]:
    """Hidden scratch folders `tasks.lib.files.atomic_path` makes beside an output (`.<name>.<random>`)."""
    found = []
    for output in outputs:
        path = project / output
        found += [str(p.relative_to(project)) for p in path.parent.glob(f".{path.name}.*")]
    return found


def flow_command(project: Path) -> list[str]:
    script = textwrap.dedent(
        f"""
        from flows.pipeline import sft_dpo
        sft_dpo(project={str(project)!r})
        """
    )
    return [sys.executable, "-c", script]


def pipeline_command(mode: str, project: Path, rerun: bool = False) -> list[str]:
    """The killed run; a rerun after a killed `dvc repro` first puts back a dvc.lock DVC left half-written, as
    `make demo` does (the flow does it itself)."""
    if mode == "flow":
        return flow_command(project)
    repro = [*DVC, "repro", "--no-run-cache"]
    if not rerun:
        return repro
    return ["sh", "-c", f"{shlex.quote(sys.executable)} -m flows.lockfile && {shlex.join(repro)}"]


def start(command: list[str], project: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        command, cwd=project, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def prepare_stage_run(project: Path, mode: str, stage: str) -> None:
    """Make the stage run for real: dvc.lock forgets it, and for the flow (which lets DVC restore), no run-cache."""
    import yaml

    lock = project / "dvc.lock"
    data = yaml.safe_load(lock.read_text())
    data["stages"].pop(stage)
    lock.write_text(yaml.safe_dump(data, sort_keys=False))
    if mode == "flow":
        shutil.rmtree(project / ".dvc" / "cache" / "runs", ignore_errors=True)


def measure(project: Path, stages: list[str], outputs: dict[str, list[str]], env: dict[str, str]) -> dict[str, float]:
    """Each stage's wall when the pipeline has only it to run (also proves it reruns to the same bytes)."""
    durations = {}
    reference = snapshot(project, outputs)
    for stage in stages:
        prepare_stage_run(project, "dvc repro", stage)
        started = time.perf_counter()
        result = subprocess.run([*DVC, "repro", "--no-run-cache"], cwd=project, env=env, capture_output=True)
        durations[stage] = time.perf_counter() - started
        if f"Running stage '{stage}'".encode() not in result.stdout:
            raise RuntimeError(f"{stage} did not run:\n{result.stdout.decode()[-3000:]}")
        if result.returncode != 0:
            raise RuntimeError(f"{stage} did not rerun:\n{result.stdout.decode()[-3000:]}{result.stderr.decode()}")
        changed = [out for out, content in snapshot(project, outputs).items() if content != reference[out]]
        if changed:
            raise RuntimeError(f"rerunning {stage} changed {changed}: the reference is not reproducible")
    return durations


def run_trial(
    project: Path, trial: Trial, outputs: dict[str, list[str]], reference: dict[str, object], env: dict[str, str]
) -> Trial:
    prepare_stage_run(project, trial.mode, trial.stage)
    process = start(pipeline_command(trial.mode, project), project, env)
    try:
        process.wait(timeout=trial.kill_after_s)
        trial.note = "finished before the kill"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        trial.killed = True
    time.sleep(0.2)  # a warm stage's child dies when the server sees its stage process gone
    trial.corrupted = [
        out for out, content in snapshot(project, outputs).items() if content is not None and content != reference[out]
    ]
    trial.scratch_left = scratch_left_beside(project, [out for outs in outputs.values() for out in outs])
    rerun = subprocess.run(pipeline_command(trial.mode, project, rerun=True), cwd=project, env=env, capture_output=True)
    trial.rerun_completed = rerun.returncode == 0
    trial.lock_put_back = b"was half-written" in rerun.stdout + rerun.stderr
    if not trial.rerun_completed:
        trial.note = (rerun.stdout + rerun.stderr).decode(errors="replace")[-1500:]
        return trial
    status = subprocess.run([*DVC, "status"], cwd=project, env=env, capture_output=True, text=True).stdout
    trial.identical = "up to date" in status and snapshot(project, outputs) == reference
    trial.scratch_after_rerun = scratch_left_beside(project, [out for outs in outputs.values() for out in outs])
    return trial


def run_trials(
    project: Path,
    trials: int,
    seed: int,
    flow_every: int,
    env: dict[str, str],
    only: list[str] | None = None,
    log=print,
) -> list[Trial]:
    """`trials` kills over every stage of `project` (reproduced; `only`: these stages), one in `flow_every` of the
    flow's process."""
    stages, outputs = stage_outputs(project)
    stages = [stage for stage in stages if only is None or stage in only]
    reference = snapshot(project, outputs)
    durations = measure(project, stages, outputs, env)
    rng = random.Random(seed)
    order: list[str] = []
    done: list[Trial] = []
    for index in range(trials):
        if not order:
            order = rng.sample(stages, len(stages))
        stage = order.pop()
        mode = "flow" if flow_every and index % flow_every == flow_every - 1 else "dvc repro"
        if mode == "flow":  # its process starts, then runs the stage, then records: kills land in all three
            kill_after = rng.uniform(FLOW_START_S / 2, FLOW_START_S + durations[stage] + 2.0)
        else:
            kill_after = rng.uniform(0.05, 1.0) * durations[stage]
        trial = run_trial(project, Trial(stage, mode, round(kill_after, 2)), outputs, reference, env)
        done.append(trial)
        log(
            f"{index + 1:3d} {mode:9s} {stage:20s} kill at {trial.kill_after_s:5.2f} s: "
            f"{'killed' if trial.killed else 'not killed'}, corrupted {trial.corrupted or 0}, "
            f"rerun {'ok' if trial.rerun_completed else 'FAILED'}, identical {trial.identical}"
            + (f", scratch left {trial.scratch_left}" if trial.scratch_left else "")
            + (f"\n{trial.note}" if not trial.rerun_completed else "")
        )
    return done


def summary_rows(trials: list[Trial]) -> list[dict]:
    rows = []
    for mode in ("dvc repro", "flow"):
        chosen = [trial for trial in trials if trial.mode == mode]
        if not chosen:
            continue
        rows.append(
            {
                "killed": mode,
                "trials": len(chosen),
                "kills landed": sum(trial.killed for trial in chosen),
                "stages": len({trial.stage for trial in chosen}),
                "stage kinds": len({trial.stage.split("@")[0] for trial in chosen}),
                "rerun completed": sum(trial.rerun_completed for trial in chosen),
                "resumed identical": sum(trial.identical for trial in chosen),
                "corrupted outputs": sum(bool(trial.corrupted) for trial in chosen),
                "dvc.lock put back": sum(trial.lock_put_back for trial in chosen),
                "scratch left by the kill": sum(bool(trial.scratch_left) for trial in chosen),
                "scratch left after the rerun": sum(bool(trial.scratch_after_rerun) for trial in chosen),
            }
        )
    return rows


def markdown(rows: list[dict]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(row[key]) for key in header) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--flow-every", type=int, default=5, help="one trial in this many kills the flow's process")
    args = parser.parse_args()
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    from tasks.lib.warm import warm_stages

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sftdpo-chaos-") as scratch:
        project = clone(Path(scratch) / "project", Path(scratch) / "project" / ".dvc" / "cache")
        subprocess.run(["git", "config", "user.email", "chaos@localhost"], cwd=project, check=True)
        subprocess.run(["git", "config", "user.name", "chaos"], cwd=project, check=True)
        with prefect_test_harness(server_startup_timeout=120), warm_stages(environment(project)):
            env = {**environment(project), "PREFECT_API_URL": PREFECT_API_URL.value()}
            env["SFT_DPO_WARM"] = os.environ["SFT_DPO_WARM"]
            timed_run([*DVC, "repro"], project, env)
            trials = run_trials(project, args.trials, args.seed, args.flow_every, env)
    rows = summary_rows(trials)
    print(markdown(rows))
    print(json.dumps({"seed": args.seed, "minutes": round((time.perf_counter() - started) / 60, 1)}))


if __name__ == "__main__":
    main()
