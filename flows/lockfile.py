"""DVC's state files survive a killed `dvc` command.

DVC rewrites dvc.lock in place after every stage, and its lock table `.dvc/tmp/rwlock` around every command, so a
SIGKILL during either write leaves the file half-written and every later `dvc` command refuses the project
(`'./dvc.lock' validation failed`, `Unable to read RWLock-file`). A half-written rwlock is reset to empty, under
DVC's own guard for it (no `dvc` command is then editing it; the locks it held died with their holders). Each stage
process keeps a copy of dvc.lock as it finds it (`tasks.lib.stage.WHOLE_LOCK_COPY`: DVC has just read it whole to
start the stage).
`recover_after_kill` puts that copy back when dvc.lock no longer validates against DVC's own schema; the stages it
does not record then re-run or come back from DVC's run-cache. The flow calls it before it reads the project, and
`make demo` through `python -m flows.lockfile`.

A live `dvc` command also leaves dvc.lock half-written for the milliseconds of each rewrite, so another run that starts
meanwhile must not take it for a killed one's: the repair happens only under DVC's own repository lock (no `dvc`
command is running), and a reader that copies dvc.lock (a run's workspace) re-reads it until it is whole.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import yaml

from flows.leftovers import remove_dead_runs
from tasks.lib.files import atomic_path
from tasks.lib.stage import WHOLE_LOCK_COPY

LOCK_FILE = "dvc.lock"
RWLOCK_DIR = ".dvc/tmp"
REPOSITORY_LOCK = ".dvc/tmp/lock"
"""DVC's lock on the whole repository, held by every `dvc` command that reads or writes the pipeline."""
SETTLE_TIMEOUT_S = 10.0
"""How long a reader waits for a half-written dvc.lock to become whole (DVC's rewrite takes milliseconds)."""


class LockfileError(RuntimeError):
    """dvc.lock is half-written and no whole copy is kept."""


def lock_problem(path: Path, content: bytes | None = None) -> str | None:
    """Why `path` (or `content`, read from it) is not a whole dvc.lock (DVC's own schema), or None."""
    from dvc.schema import COMPILED_LOCKFILE_SCHEMA

    try:
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        data = yaml.load(path.read_bytes() if content is None else content, Loader=loader)
        COMPILED_LOCKFILE_SCHEMA(data)
    except Exception as error:  # noqa: BLE001  (any parse or schema error means the same: not whole)
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return None


def recover_after_kill(root: Path) -> list[str]:
    """Repair what a `dvc` command killed mid-write left behind, and remove what killed runs left (flows/leftovers.py);
    one line per repair."""
    repaired = [message for message in (_recover_rwlock(root), _recover_lock(root)) if message]
    return repaired + remove_dead_runs(root)


def _recover_rwlock(root: Path) -> str | None:
    import json

    from dvc.lock import make_lock
    from dvc.rwlock import RWLOCK_FILE, RWLOCK_LOCK

    lock_dir = root / RWLOCK_DIR
    table = lock_dir / RWLOCK_FILE
    if not table.is_file():
        return None
    with make_lock(str(lock_dir / RWLOCK_LOCK), tmp_dir=str(lock_dir)):
        try:
            json.loads(table.read_text(encoding="utf-8"))
            return None
        except ValueError:
            table.write_text("{}", encoding="utf-8")
    return f"{table} was half-written (a dvc command was killed while writing it): reset to empty"


def read_whole_lock(path: Path, timeout_s: float = SETTLE_TIMEOUT_S) -> bytes:
    """dvc.lock's bytes once whole: a `dvc` command that is running rewrites it in place, so a reader can meet it
    half-written for a moment. Still half-written after `timeout_s`: LockfileError (a killed command left it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        content = path.read_bytes()
        problem = lock_problem(path, content)
        if problem is None:
            return content
        if time.monotonic() > deadline:
            raise LockfileError(f"{path} stayed half-written for {timeout_s:.0f} s ({problem}): run the flow in the "
                                "project once (it repairs it), or `git checkout dvc.lock`")  # fmt: skip
        time.sleep(0.05)


def _recover_lock(root: Path) -> str | None:
    """Put the last whole dvc.lock back if DVC left it half-written; what was done, or None if it is whole."""
    from dvc.lock import LockError, make_lock

    lock = root / LOCK_FILE
    if not lock.is_file() or lock_problem(lock) is None:
        return None
    repository_lock = make_lock(str(root / REPOSITORY_LOCK), tmp_dir=str(root / RWLOCK_DIR))
    try:
        repository_lock.lock()  # DVC's own wait (3 s) for a running command's lock
    except LockError:
        return None  # a running dvc command holds the project: it is rewriting dvc.lock, not killed while doing so
    try:
        return _repair_lock(root, lock)
    finally:
        repository_lock.unlock()


def _repair_lock(root: Path, lock: Path) -> str | None:
    problem = lock_problem(lock)
    if problem is None:
        return None  # a command finished its rewrite before the repository lock was taken
    copy = root / WHOLE_LOCK_COPY
    if not copy.is_file() or lock_problem(copy) is not None:
        raise LockfileError(
            f"{lock} is half-written ({problem}): a dvc command was killed while writing it, and no whole copy is "
            "kept. `git checkout dvc.lock` puts back the committed one (stages since then re-run or come back from "
            "DVC's run-cache)"
        )
    kept_at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(copy)))
    with atomic_path(lock) as scratch:
        shutil.copy2(copy, scratch)
    return (
        f"{lock} was half-written ({problem}): a dvc command was killed while writing it. Put back the last whole "
        f"copy (kept {kept_at}); the stages it does not record re-run or come back from DVC's run-cache"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=Path, default=Path("."), help="the project folder")
    for message in recover_after_kill(parser.parse_args().project):
        print(message)


if __name__ == "__main__":
    main()
