"""Benchmark: one DPO round, and a 3-point beta sweep of it, as the pipeline runs them vs plain TRL runs.

Single round (whole-process figures): `reference_logps@r1` + `dpo@r1`, each its own process as DVC resolves it
from dvc.yaml (no DVC around them), vs one `benchmarks/plain_trl_round.py` run.

One clean clone is reproduced up to round 1's pairs (the demo's SFT policy and 160-odd on-policy pairs) and
committed. Then, alternating, `--repeats` times each:
- pipeline: `python -m flows.sweep dpo.loss.beta=B1,B2,B3 --target dpo@r1` (`make sweep`'s command, limited to
  round 1's training: each point a `dvc exp run --temp` in DVC's own temporary workspace; `reference_logps@r1` runs
  once and the other points restore it from DVC's run-cache, emptied before each repeat so every repeat computes
  it once);
- plain: `benchmarks/plain_trl_round.py` once per beta (DPOTrainer + LoRA, reference = adapter disabled, merge,
  save), what a user would write instead.
Prints each arm's wall per repeat, the medians and their ratio.

    .venv/bin/python benchmarks/sweep.py [--repeats 3] [--betas 0.05,0.1,0.5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from onpolicy import clone, environment, timed_run  # noqa: E402  (the clean-clone helpers)

PLAIN = Path(__file__).resolve().with_name("plain_trl_round.py")


def _cold_env(project: Path) -> dict[str, str]:
    from tasks.lib.warm import WARM_ENV

    env = environment(project)
    env.pop(WARM_ENV, None)
    return env


def prepared_project(scratch: Path) -> Path:
    project = clone(scratch / "project", scratch / "cache")
    dvc = [sys.executable, "-m", "dvc"]
    timed_run([*dvc, "repro", "pairs@r1"], project)
    timed_run(["git", "add", "-A"], project)
    timed_run(
        ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "round 1 pairs"], project
    )
    return project


def pipeline_arm(project: Path, betas: str, cache: Path) -> float:
    shutil.rmtree(cache / "runs", ignore_errors=True)  # each repeat computes the reference log-probs once
    started = time.perf_counter()
    timed_run([sys.executable, "-m", "flows.sweep", f"dpo.loss.beta={betas}", "--target", "dpo@r1"], project)
    wall = time.perf_counter() - started
    timed_run([sys.executable, "-m", "dvc", "exp", "remove", "--all-commits"], project)
    return wall


def plain_arm(project: Path, betas: str, scratch: Path) -> float:
    started = time.perf_counter()
    for beta in betas.split(","):
        out = scratch / f"plain-{beta}"
        timed_run([sys.executable, str(PLAIN), "--project", str(project), "--beta", beta, "--out", str(out)], project)
        shutil.rmtree(out)
    return time.perf_counter() - started


def stage_commands(project: Path, names: tuple[str, ...]) -> list[list[str]]:
    """The commands DVC resolved for these stages (dvc.lock), to run as their own processes."""
    import shlex

    import yaml

    stages = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    return [[sys.executable, *shlex.split(stages[name]["cmd"])[1:]] for name in names]


def round_arms(project: Path, scratch: Path, repeats: int) -> dict[str, list[float]]:
    """One round: the pipeline's two stage processes (cold, and warm with the server already up as in a flow run or
    `make demo`) vs one plain TRL run (default beta), alternating."""
    import yaml

    from tasks.lib.warm import warm_stages

    timed_run([sys.executable, "-m", "dvc", "repro", "dpo@r1"], project)  # the stages' inputs and dvc.lock entries
    commands = stage_commands(project, ("reference_logps@r1", "dpo@r1"))
    beta = str(yaml.safe_load((project / "params.yaml").read_text())["dpo"]["loss"]["beta"])
    arms = ("pipeline", "pipeline-warm", "plain")
    walls: dict[str, list[float]] = {arm: [] for arm in arms}
    with warm_stages(environment(project)):
        timed_run(commands[0], project)  # the server has finished importing before anything is timed
        for repeat in range(repeats):
            for arm in arms if repeat % 2 == 0 else arms[::-1]:
                if arm == "plain":
                    wall = plain_arm(project, beta, scratch)
                else:
                    env = _cold_env(project) if arm == "pipeline" else None
                    wall = sum(timed_run(command, project, env) for command in commands)
                walls[arm].append(wall)
                print(f"round, repeat {repeat + 1}: {arm} {wall:.1f} s", flush=True)
    return walls


def print_round(walls: dict[str, list[float]], repeats: int) -> None:
    plain = statistics.median(walls["plain"])
    print(f"\none round, medians of {repeats} (reference_logps@r1 + dpo@r1 processes vs one plain TRL script):")
    for arm, values in walls.items():
        median = statistics.median(values)
        print(f"{arm:14} {median:5.1f} s   {median / plain:.2f}x the plain time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--betas", default="0.05,0.1,0.5")
    parser.add_argument("--round-only", action="store_true", help="only the single-round comparison")
    args = parser.parse_args()
    walls: dict[str, list[float]] = {"pipeline": [], "plain": []}
    with tempfile.TemporaryDirectory(prefix="sftdpo-bench-sweep-") as scratch:
        scratch = Path(scratch)
        project = prepared_project(scratch)
        round_walls = round_arms(project, scratch, args.repeats)
        if args.round_only:
            print_round(round_walls, args.repeats)
            return
        # The sweep starts from the committed round-1 pairs: DVC stages dvc.lock as it writes it (core.autostage),
        # so the index is reset too, or the experiments would find the round's reference log-probs and training done.
        timed_run(["git", "reset", "-q", "--hard"], project)
        for repeat in range(args.repeats):
            arms = ("pipeline", "plain") if repeat % 2 == 0 else ("plain", "pipeline")
            for arm in arms:
                wall = (
                    pipeline_arm(project, args.betas, scratch / "cache")
                    if arm == "pipeline"
                    else plain_arm(project, args.betas, scratch)
                )
                walls[arm].append(wall)
                print(f"repeat {repeat + 1}: {arm} {wall:.1f} s", flush=True)
    print_round(round_walls, args.repeats)
    pipeline, plain = statistics.median(walls["pipeline"]), statistics.median(walls["plain"])
    print(f"\n{len(args.betas.split(','))}-point beta sweep of round 1 ({args.betas}), medians of {args.repeats}:")
    print(f"pipeline (DVC experiments, reference log-probs once) {pipeline:.1f} s")
    print(f"plain TRL script per point                         {plain:.1f} s")
    print(f"pipeline is {plain / pipeline:.2f}x faster")


if __name__ == "__main__":
    main()
