"""Benchmark: what Prefect orchestration costs on top of the demo pipeline.

Clones the committed project into a temporary folder, serves its deployments on a free loopback port
(`python -m flows.serve --detach`, as `make serve DETACH=1` does) and runs, as a user would,
`prefect deployment run sft-dpo/sft-dpo --watch` twice: the demo from scratch, then again with nothing
changed. From Prefect's own records it prints each run's time, the sum of its stage task runs and the
difference (the orchestration overhead: DVC graph and status reads, task bookkeeping, recording the
DVC experiment, artifacts). `--compare-dvc` also times plain `dvc repro` on a second clean clone.

    .venv/bin/python benchmarks/orchestration.py [--compare-dvc]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def clone(target: Path) -> Path:
    subprocess.run(["git", "clone", "-q", str(ROOT), str(target)], check=True)
    return target


def environment(home: Path, port: int) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DVC_NO_ANALYTICS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def timed_deployment_run(project: Path, env: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "prefect", "deployment", "run", "sft-dpo/sft-dpo", "--watch"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"flow run failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return wall, re.search(r"UUID: ([0-9a-f-]{36})", result.stdout).group(1)


def prefect_records(run_id: str) -> dict[str, float]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read():
        async with get_client() as client:
            flow_run = await client.read_flow_run(run_id)
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
            return flow_run, runs

    flow_run, task_runs = asyncio.run(read())
    flow_seconds = (flow_run.end_time - flow_run.start_time).total_seconds()
    stage_seconds = sum(run.total_run_time.total_seconds() for run in task_runs)
    pickup = (flow_run.start_time - flow_run.created).total_seconds()
    return {
        "flow": flow_seconds,
        "stages": stage_seconds,
        "pickup": pickup,
        "tasks": len(task_runs),
        "ran": sum(run.state.name != "Skipped" for run in task_runs),
    }


def timed_dvc_repro(project: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dvc", "repro", "-q"], cwd=project, env=env, check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare-dvc", action="store_true", help="also time `dvc repro` on a clean clone")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sftdpo-bench-") as scratch:
        scratch = Path(scratch)
        project, home, port = clone(scratch / "project"), scratch / "prefect", free_port()
        env = environment(home, port)
        os.environ.update({key: env[key] for key in ("PREFECT_HOME", "PREFECT_API_URL")})
        serve = [
            sys.executable,
            "-m",
            "flows.serve",
            "--port",
            str(port),
            "--home",
            str(home),
            "--project",
            str(project),
        ]
        subprocess.run(serve + ["--detach"], cwd=project, env=env, check=True)
        try:
            rows = []
            for label in ("demo from scratch", "no change"):
                wall, run_id = timed_deployment_run(project, env)
                rows.append((label, wall, prefect_records(run_id)))
        finally:
            subprocess.run(serve + ["--stop"], cwd=project, env=env, check=True)
        print(
            f"\n{'run':<20}{'CLI wall s':>11}{'flow s':>9}{'stages s':>10}{'overhead s':>12}{'overhead':>10}"
            f"{'pickup s':>10}{'stages ran':>12}"
        )
        for label, wall, record in rows:
            overhead = record["flow"] - record["stages"]
            print(
                f"{label:<20}{wall:>11.1f}{record['flow']:>9.1f}{record['stages']:>10.1f}{overhead:>12.1f}"
                f"{overhead / record['flow']:>10.1%}{record['pickup']:>10.1f}{record['ran']:>7}/{record['tasks']}"
            )
        if args.compare_dvc:
            plain = timed_dvc_repro(clone(scratch / "plain"), env)
            print(
                f"\n`dvc repro` on a clean clone: {plain:.1f} s; the served flow's CLI wall time was "
                f"{rows[0][1]:.1f} s ({rows[0][1] / plain - 1:+.1%})"
            )


if __name__ == "__main__":
    main()
