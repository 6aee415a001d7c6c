"""Benchmark: where the demo's time goes, stage by stage.

Runs the committed pipeline (`make demo`'s `python -m tasks.lib.warm -- dvc repro`: stages start warm; `--cold`:
plain `dvc repro`) in a clean clone with an empty DVC cache, each stage process recording
its wall time split into start-up (interpreter and the stage module's own imports), imports (libraries imported
while the stage runs: torch, transformers, TRL, ...), load (models and tokenizers), work and save
(`tasks/lib/timing.py`, switched on by `SFT_DPO_STAGE_TIMES`). Prints one row per stage, the totals, and DVC's own
share (the `dvc repro` wall minus the stage processes).

    .venv/bin/python benchmarks/stages.py [--runs 1] [--cold]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from onpolicy import clone, environment  # noqa: E402  (the clean-clone helpers)

PHASES = ("startup", "imports", "load", "work", "save")


def timed_repro(project: Path, times: Path, cold: bool) -> tuple[float, list[str]]:
    repro = [sys.executable, "-m", "dvc", "repro"]
    started = time.perf_counter()
    result = subprocess.run(
        repro if cold else [sys.executable, "-m", "tasks.lib.warm", "--", *repro],
        cwd=project,
        env={**environment(project), "SFT_DPO_STAGE_TIMES": str(times)},
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"dvc repro failed in {project}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return wall, re.findall(r"Running stage '([^']+)'", result.stdout)


def one_run(scratch: Path, cold: bool) -> tuple[float, list[dict]]:
    project = clone(scratch / "project", scratch / "cache")
    times = scratch / "times.jsonl"
    wall, stages = timed_repro(project, times, cold)
    records = [json.loads(line) for line in times.read_text().splitlines()]
    if len(records) != len(stages):
        sys.exit(f"{len(stages)} stages ran but {len(records)} recorded their times")
    return wall, [{**record, "stage": stage} for stage, record in zip(stages, records, strict=True)]


def table(wall: float, rows: list[dict]) -> str:
    lines = ["| stage | wall s | start-up | imports | load | work | save |", "|---" * 7 + "|"]
    for row in rows:
        lines.append(f"| {row['stage']} | {row['wall']:.1f} | " + " | ".join(f"{row[p]:.1f}" for p in PHASES) + " |")
    totals = {p: sum(row[p] for row in rows) for p in (*PHASES, "wall")}
    lines.append(
        f"| **all {len(rows)} stages** | {totals['wall']:.1f} | "
        + " | ".join(f"{totals[p]:.1f}" for p in PHASES)
        + " |"
    )
    fixed = totals["startup"] + totals["imports"] + totals["load"]
    stages = totals["wall"]
    lines.append(
        f"\n`dvc repro` wall {wall:.1f} s: stage processes {stages:.1f} s, DVC itself {wall - stages:.1f} s; "
        f"fixed cost per stage (start-up + imports + load) {fixed:.1f} s = {fixed / stages:.0%} of the stages"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1, help="runs from scratch; the table shows each stage's median")
    parser.add_argument("--cold", action="store_true", help="plain `dvc repro`: every stage imports its libraries")
    args = parser.parse_args()
    walls, runs = [], []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="sftdpo-bench-stages-") as scratch:
            wall, rows = one_run(Path(scratch), args.cold)
        walls.append(wall)
        runs.append(rows)
    medians = [
        {"stage": rows[0]["stage"], **{k: statistics.median(r[k] for r in rows) for k in (*PHASES, "wall")}}
        for rows in zip(*runs, strict=True)
    ]
    print(table(statistics.median(walls), medians))


if __name__ == "__main__":
    main()
