"""Benchmark: the demo's `sft` and `dpo@r1` on 1 vs 2 processes, and push/pull through a local DVC remote.

A clean clone is reproduced up to round 1's reference log-probs. Then, alternating, `--repeats` times: each stage's
command (as dvc.lock resolved it, outputs redirected to a scratch folder) with `compute.processes` 1 and 2 and the
same global batch (the per-process `batch_size` halved on 2). Prints wall and training rows per second (rows x
epochs / wall, whole process: start-up and saving included). Then `dvc push` of every output to a local-folder
remote, and `dvc pull` of all of it into a second clone, with their walls and the bytes moved.

    .venv/bin/python benchmarks/scale.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from onpolicy import clone, timed_run  # noqa: E402  (the clean-clone helpers)

DVC = [sys.executable, "-m", "dvc"]
STAGES = {"sft": "sft", "dpo@r1": "dpo"}
"""Stage -> its params section."""
REDIRECTED = ("--out", "--checkpoints", "--logs", "--plots", "--metrics")


def stage_command(project: Path, stage: str, params: Path, scratch: Path) -> list[str]:
    """The stage's command from dvc.lock, reading `params` and writing under `scratch`."""
    words = shlex.split(yaml.safe_load((project / "dvc.lock").read_text())["stages"][stage]["cmd"])
    for index, word in enumerate(words):
        if word == "--params":
            words[index + 1] = str(params)
        elif word in REDIRECTED:
            words[index + 1] = str(scratch / word.strip("-"))
    return [sys.executable, *words[1:]]


def params_for(project: Path, section: str, processes: int, folder: Path) -> Path:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["compute"]["processes"] = processes
    params[section]["train"]["batch_size"] //= processes
    target = folder / f"params_{section}_{processes}.yaml"
    target.write_text(yaml.safe_dump(params, sort_keys=False))
    return target


def training_rows(project: Path, stage: str) -> int:
    params = yaml.safe_load((project / "params.yaml").read_text())
    section = STAGES[stage]
    data = "data/prepared/sft_train.jsonl" if section == "sft" else "models/reference_logps/r1/train.jsonl"
    rows = len((project / data).read_text().splitlines())
    return rows * params[section]["train"]["epochs"]


def size_of(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sftdpo-bench-scale-") as scratch:
        scratch = Path(scratch)
        project = clone(scratch / "project", scratch / "cache")
        timed_run([sys.executable, "-m", "tasks.lib.warm", "--", *DVC, "repro", "reference_logps@r1"], project)
        walls: dict[tuple[str, int], list[float]] = {}
        for repeat in range(args.repeats):
            for processes in (1, 2) if repeat % 2 == 0 else (2, 1):
                for stage, section in STAGES.items():
                    out = scratch / f"run-{stage}-{processes}-{repeat}"
                    command = stage_command(project, stage, params_for(project, section, processes, scratch), out)
                    wall = timed_run(command, project)
                    walls.setdefault((stage, processes), []).append(wall)
                    shutil.rmtree(out)
                    print(f"repeat {repeat + 1}: {stage} on {processes} process(es) {wall:.1f} s", flush=True)
        print(f"\nmedians of {args.repeats}, same global batch:")
        for (stage, processes), values in walls.items():
            wall = statistics.median(values)
            rows = training_rows(project, stage)
            print(f"{stage:7} {processes} process(es): {wall:6.1f} s, {rows / wall:6.1f} training rows/s")

        remote = scratch / "remote"
        timed_run([*DVC, "remote", "add", "--local", "-d", "bench", str(remote)], project)
        push = timed_run([*DVC, "push"], project)
        other = clone(scratch / "other", scratch / "other-cache")
        timed_run([*DVC, "remote", "add", "--local", "-d", "bench", str(remote)], other)
        pull = timed_run([*DVC, "pull", "--allow-missing"], other)
        moved = size_of(remote) / 1e6
        print(f"\nlocal-folder remote, {moved:.1f} MB of outputs: dvc push {push:.1f} s, ", end="")
        print(f"dvc pull into a fresh clone {pull:.1f} s")


if __name__ == "__main__":
    main()
