"""flows/lockfile.py: a `dvc` command killed while it rewrote dvc.lock or its lock table leaves them half-written;
the next run puts back the whole copy a stage kept, or resets the table, and DVC works again."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
from conftest import DIAMOND_DAG, dvc, make_shell_project, project_env

from flows.lockfile import REPOSITORY_LOCK, LockfileError, lock_problem, read_whole_lock, recover_after_kill
from tasks.lib.stage import WHOLE_LOCK_COPY, _keep_whole_lock_copy


def test_a_half_written_dvc_lock_and_lock_table_are_repaired(tmp_path, monkeypatch):
    project = make_shell_project(tmp_path, DIAMOND_DAG)
    dvc(project, "repro")
    monkeypatch.chdir(project)
    _keep_whole_lock_copy()  # what every stage process does as it starts
    whole = (project / "dvc.lock").read_bytes()
    assert (project / WHOLE_LOCK_COPY).read_bytes() == whole

    (project / "dvc.lock").write_bytes(whole[: len(whole) // 2])
    (project / ".dvc/tmp/rwlock").write_text('{"read": {"')
    broken = dvc(project, "status", check=False)
    assert broken.returncode != 0 and "validation failed" in broken.stderr

    repaired = subprocess.run(
        [sys.executable, "-m", "flows.lockfile"], cwd=project, env=project_env(project), capture_output=True, text=True
    )
    assert repaired.returncode == 0, repaired.stderr
    assert "rwlock was half-written" in repaired.stdout and "dvc.lock was half-written" in repaired.stdout
    assert (project / "dvc.lock").read_bytes() == whole
    assert "up to date" in dvc(project, "status").stdout
    assert recover_after_kill(project) == []


def test_without_a_whole_copy_the_message_says_how_to_get_one(tmp_path):
    project = make_shell_project(tmp_path, DIAMOND_DAG)
    dvc(project, "repro")
    whole = (project / "dvc.lock").read_bytes()
    (project / "dvc.lock").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(LockfileError, match=r"half-written .* `git checkout dvc.lock`"):
        recover_after_kill(project)


# A whole dvc.lock of one stage, written by hand: these tests need the file, not a reproduced pipeline.
ONE_STAGE_LOCK = b"""schema: '2.0'
stages:
  source:
    cmd: echo source > source.txt
    outs:
    - path: source.txt
      hash: md5
      md5: 3b0332e02daabf31651a5a0d81ba830a
      size: 7
"""


def test_a_running_dvc_commands_half_written_dvc_lock_is_left_to_it(tmp_path):
    """DVC rewrites dvc.lock in place: a run starting beside a live `dvc repro` can meet it half-written. While a
    process holds DVC's repository lock, that is its write in progress, not a kill: nothing is repaired or refused."""
    project = make_shell_project(tmp_path, DIAMOND_DAG)
    half = ONE_STAGE_LOCK[:40]
    (project / "dvc.lock").write_bytes(half)
    hold = f"held = make_lock({str(project / REPOSITORY_LOCK)!r}); held.lock(); print('held', flush=True)"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import time; from dvc.lock import make_lock; {hold}; time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        assert recover_after_kill(project) == []
        assert (project / "dvc.lock").read_bytes() == half
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(LockfileError):  # the holder is gone: now it is a killed command's half-written file
        recover_after_kill(project)


def test_a_reader_takes_dvc_lock_once_its_rewrite_is_whole(tmp_path):
    lock, whole = tmp_path / "dvc.lock", ONE_STAGE_LOCK
    assert lock_problem(lock, whole) is None and lock_problem(lock, whole[:40]) is not None
    lock.write_bytes(whole[: len(whole) // 2])
    finisher = threading.Timer(0.3, lock.write_bytes, args=(whole,))
    started = time.monotonic()
    finisher.start()
    assert read_whole_lock(lock) == whole
    assert time.monotonic() - started >= 0.3
    lock.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(LockfileError, match="stayed half-written"):
        read_whole_lock(lock, timeout_s=0.2)
