"""Locks that keep concurrent runs of one project apart (DVC's own lock covers a single `dvc` command only).

- The tree lock: held by a run that works in the project's own tree (a plain run) for its whole length, and by a
  run bringing its results back into the tree. A second plain run is refused at once, naming the holder; bringing
  back waits for it.
- The experiments lock: around `dvc exp save`, whose temporary git refs every worktree of the repository shares.

Each lock file lives in `.dvc/tmp/` (ignored by git and DVC); the operating system releases it when its holder
dies, even by SIGKILL, so a crashed run never leaves the project locked.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

TREE_LOCK = ".dvc/tmp/sft-dpo-tree.lock"
EXPERIMENTS_LOCK = ".dvc/tmp/sft-dpo-experiments.lock"
HOLDER_SUFFIX = ".holder"
WAIT_TIMEOUT_S = 6 * 3600.0
"""How long a run waits for the tree or the experiments (another run's whole pipeline may hold the tree)."""


class ProjectBusy(RuntimeError):
    """Another run holds the project's tree."""


def _lock(root: Path, relative: str) -> FileLock:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path))


def _holder(root: Path, relative: str) -> str:
    try:
        holder = json.loads((root / (relative + HOLDER_SUFFIX)).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "another run"
    return f"run {holder['run']} (pid {holder['pid']}, since {holder['since']})"


@contextlib.contextmanager
def holding_tree(root: Path, run: str, wait: bool) -> Iterator[None]:
    """Hold the project's tree for `run`; `wait=False` refuses at once (ProjectBusy) when another run holds it."""
    lock = _lock(root, TREE_LOCK)
    try:
        lock.acquire(timeout=WAIT_TIMEOUT_S if wait else 0)
    except Timeout:
        raise ProjectBusy(
            f"{root}: {_holder(root, TREE_LOCK)} is running in the project's tree; this run would mix its outputs "
            "with that run's. Try again when it is done, or give the run overrides (it then works apart)"
        ) from None
    holder = root / (TREE_LOCK + HOLDER_SUFFIX)
    try:
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        holder.write_text(json.dumps({"run": run, "pid": os.getpid(), "since": since}), encoding="utf-8")
        yield
    finally:
        holder.unlink(missing_ok=True)
        lock.release()


@contextlib.contextmanager
def holding_experiments(root: Path) -> Iterator[None]:
    """One `dvc exp save` at a time in the repository."""
    with _lock(root, EXPERIMENTS_LOCK).acquire(timeout=WAIT_TIMEOUT_S):
        yield
