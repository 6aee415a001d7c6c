"""Benchmark: a 3-point beta sweep of round 1 as DVC experiments vs three plain TRL runs of the same round.

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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from onpolicy import clone, environment  # noqa: E402  (the clean-clone helpers)

PLAIN = Path(__file__).resolve().with_name("plain_trl_round.py")


def run(command: list[str], project: Path) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, cwd=project, env=environment(project), capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def prepared_project(scratch: Path) -> Path:
    project = clone(scratch / "project", scratch / "cache")
    dvc = [sys.executable, "-m", "dvc"]
    run([*dvc, "repro", "pairs@r1"], project)
    run(["git", "add", "-A"], project)
    run(["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "round 1 pairs"], project)
    return project


def pipeline_arm(project: Path, betas: str, cache: Path) -> float:
    shutil.rmtree(cache / "runs", ignore_errors=True)  # each repeat computes the reference log-probs once
    started = time.perf_counter()
    run([sys.executable, "-m", "flows.sweep", f"dpo.loss.beta={betas}", "--target", "dpo@r1"], project)
    wall = time.perf_counter() - started
    run([sys.executable, "-m", "dvc", "exp", "remove", "--all-commits"], project)
    return wall


def plain_arm(project: Path, betas: str, scratch: Path) -> float:
    started = time.perf_counter()
    for beta in betas.split(","):
        out = scratch / f"plain-{beta}"
        run([sys.executable, str(PLAIN), "--project", str(project), "--beta", beta, "--out", str(out)], project)
        shutil.rmtree(out)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--betas", default="0.05,0.1,0.5")
    args = parser.parse_args()
    walls: dict[str, list[float]] = {"pipeline": [], "plain": []}
    with tempfile.TemporaryDirectory(prefix="sftdpo-bench-sweep-") as scratch:
        scratch = Path(scratch)
        project = prepared_project(scratch)
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
    pipeline, plain = statistics.median(walls["pipeline"]), statistics.median(walls["plain"])
    print(f"\n{len(args.betas.split(','))}-point beta sweep of round 1 ({args.betas}), medians of {args.repeats}:")
    print(f"pipeline (DVC experiments, reference log-probs once) {pipeline:.1f} s")
    print(f"plain TRL script per point                         {plain:.1f} s")
    print(f"pipeline is {plain / pipeline:.2f}x faster")


if __name__ == "__main__":
    main()
