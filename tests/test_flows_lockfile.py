"""flows/lockfile.py: a `dvc` command killed while it rewrote dvc.lock or its lock table leaves them half-written;
the next run puts back the whole copy a stage kept, or resets the table, and DVC works again."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import DIAMOND_DAG, dvc, make_shell_project, project_env

from flows.lockfile import LockfileError, recover_after_kill
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
