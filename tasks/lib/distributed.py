"""Stages on several processes: the launcher a stage re-executes itself under, and the ranks inside it.

A stage command stays one line in dvc.yaml (`python -m tasks.sft ...`). When `compute` gives its kind more than
one process, `stage_main` re-executes that same command under `torchrun --standalone --nproc_per_node N` or
`accelerate launch --num_processes N` and exits with its status; the launcher sets `RANK`, `WORLD_SIZE` and
`LOCAL_RANK` in each process, which is how a process knows it is one of several (and does not launch again).
Trainers pick the process group up themselves (transformers/accelerate: NCCL on GPUs, gloo on a CPU); `generate`
joins it with `ensure_process_group()` and deals its batches by rank. Only rank 0 writes a stage's outputs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from tasks.lib.errors import SettingError
from tasks.lib.schema import DISTRIBUTED_STAGES, ComputeParams

T = TypeVar("T")
R = TypeVar("R")

STAGE_KINDS = {("tasks.evaluate" if kind == "eval" else f"tasks.{kind}"): kind for kind in DISTRIBUTED_STAGES}
"""The stage modules that can share their work, by kind (`compute.stage_processes` keys)."""


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """Whether this process writes the stage's outputs (rank 0, or the only process)."""
    return rank() == 0


def launch_command(compute: ComputeParams, processes: int, module: str, arguments: list[str]) -> list[str]:
    """The command that runs `python -m module arguments` on `processes` processes."""
    if compute.launcher == "torchrun":
        launcher = ["torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    else:
        if not Path(str(compute.accelerate_config)).is_file():
            raise SettingError(f"compute.accelerate_config {compute.accelerate_config}: no such file")
        launcher = ["accelerate.commands.launch", "--config_file", str(compute.accelerate_config)]
        launcher += ["--num_processes", str(processes)]
    # `--`: the launchers' parsers would otherwise read a stage flag as an abbreviation of theirs (`--logs`).
    return [sys.executable, "-m", *launcher, "-m", "--", module, *arguments]


def relaunch_if_distributed(compute: ComputeParams, module: str, arguments: list[str]) -> None:
    """Re-execute this stage on its processes and exit with their status; return when it runs here on one.

    Inside a launched process (`WORLD_SIZE` set) it runs here, whatever its count.
    """
    kind = STAGE_KINDS.get(module)
    processes = compute.processes_for(kind) if kind else 1
    if processes <= 1 or "WORLD_SIZE" in os.environ:
        if kind is None and compute.processes > 1:
            print(f"{module}: runs on one process (compute.processes applies to {', '.join(STAGE_KINDS.values())})")
        return
    command = launch_command(compute, processes, module, arguments)
    print(f"{module}: on {processes} processes: {' '.join(command[2:])}", flush=True)
    sys.exit(subprocess.call(command))


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def leave_process_group() -> None:
    """Wait for every process, then close the group: a process that exits while gloo's threads still talk to the
    others is aborted by the C++ runtime (`terminate called without an active exception`), seen on 3 processes
    when the ranks that only send their share exit while rank 0 still gathers."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def ensure_process_group() -> None:
    """Join the launcher's process group (gloo on a CPU, NCCL on GPUs) for a stage that shards without a trainer."""
    import torch
    import torch.distributed as dist

    if world_size() > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def map_batches(function: Callable[[list[T]], list[R]], items: list[T], batch_size: int) -> list[R] | None:
    """`function` over `items` in batches of `batch_size`, batch i on rank i mod world size; everything, in order, on
    rank 0 and None on the others (one process: everything).

    The batches are the same whatever the process count, so batch-wise results (padding included) are too.
    """
    batches = [items[start : start + batch_size] for start in range(0, len(items), batch_size)]
    mine = {index: function(batch) for index, batch in enumerate(batches) if index % world_size() == rank()}
    if world_size() == 1:
        return [result for index in range(len(batches)) for result in mine[index]]
    import torch.distributed as dist

    ensure_process_group()
    everyone: list[Any] | None = [None] * world_size() if is_main() else None
    dist.gather_object(mine, everyone, dst=0)
    if everyone is None:
        return None
    merged = {index: results for part in everyone for index, results in part.items()}
    return [result for index in range(len(batches)) for result in merged[index]]


def check_replicas_agree(model) -> str | None:
    """After data-parallel training, fail unless every process holds the same weights; a line saying so, or None
    on one process.

    Compares a float64 checksum of the trainable parameters across processes: replicas that differ trained on
    their own rows without averaging their gradients (a known failure of data-parallel setups).
    """
    if world_size() == 1:
        return None
    import torch
    import torch.distributed as dist

    with torch.no_grad():
        trainable = [p.detach().double() for p in model.parameters() if p.requires_grad]
        checksum = (sum(float(p.sum()) for p in trainable), sum(float(p.abs().sum()) for p in trainable))
    everyone: list[Any] = [None] * world_size()
    dist.all_gather_object(everyone, checksum)
    if any(other != everyone[0] for other in everyone):
        raise RuntimeError(f"the {world_size()} processes hold different weights after training: {everyone}")
    return f"{world_size()} processes hold identical weights (trainable checksum {checksum[0]:.9g})"
