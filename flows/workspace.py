"""Isolated workspaces: a flow run with overrides, rounds or a next round never writes the user's working tree.

The run gets a git worktree of HEAD under `.dvc/tmp/runs/` holding the user's working tree as it is when the run
starts (modified and untracked files copied in, like DVC's own experiment workspaces), sharing the project's DVC
cache, so outputs are linked or copied from it rather than rebuilt. The run is recorded there as a DVC experiment
(git refs are shared by every worktree of a repository); the user takes it with `dvc exp apply <name>`. A next
round is brought back by `bring_back` only if none of the files it changed were changed in the project meanwhile.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from flows.dvc_project import run_dvc
from tasks.lib.files import atomic_path

RUNS_DIR = ".dvc/tmp/runs"
"""Where run workspaces live: inside the project (same file system as its cache), ignored by git and DVC."""
OWNER_SUFFIX = ".owner"
"""Beside a run's workspace, `<run>.owner` holds its process id (flows/leftovers.py removes a dead owner's)."""


class WorkspaceConflict(RuntimeError):
    """The project changed, during the run, a file the run also changed: the run's result stays an experiment."""


@dataclass
class Workspace:
    root: Path
    """The user's project."""
    path: Path
    """The run's checkout."""
    base: str
    """The commit both started from."""
    copied: dict[str, bytes | None] = field(default_factory=dict)
    """The files git saw changed in the project when the run started, as they were then (None: absent); every
    other file was as in `base`."""

    def started(self, relative: str) -> bytes | None:
        """A file of the project as it was when the run started (None: absent)."""
        if relative in self.copied:
            return self.copied[relative]
        shown = subprocess.run(["git", "show", f"{self.base}:{relative}"], cwd=self.root, capture_output=True)
        return shown.stdout if shown.returncode == 0 else None


def _git(folder: Path, *arguments: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *arguments], cwd=folder, capture_output=True, text=True, check=check)


def _changed_files(folder: Path) -> list[str]:
    """Paths git sees as modified, added, deleted or untracked (not ignored) against HEAD."""
    entries = iter(_git(folder, "status", "--porcelain=v1", "-z", "--untracked-files=all").stdout.split("\0"))
    paths = []
    for entry in entries:
        if not entry:
            continue
        status, path = entry[:2], entry[3:]
        paths.append(path)
        if "R" in status or "C" in status:
            paths.append(next(entries))  # a rename or copy names its source next, without a status
    return paths


def _read(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


def _take(root: Path, relative: str) -> bytes | None:
    """A changed file of the project as the run starts from it; dvc.lock once whole (a `dvc` command running in the
    project rewrites it in place)."""
    from flows.lockfile import LOCK_FILE, read_whole_lock  # flows.lockfile imports this module (via leftovers)

    if relative == LOCK_FILE and (root / relative).is_file():
        return read_whole_lock(root / relative)
    return _read(root / relative)


def _copy(source: Path, target: Path) -> None:
    if source.is_dir():
        shutil.copytree(source, target, symlinks=True, dirs_exist_ok=True)
    elif source.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    elif target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink(missing_ok=True)


@contextlib.contextmanager
def isolated_workspace(root: Path, name: str) -> Iterator[Workspace]:
    """A worktree of `root` as it is now, sharing its DVC cache; removed afterwards, whatever happens."""
    root = root.resolve()
    path = root / RUNS_DIR / name
    path.parent.mkdir(parents=True, exist_ok=True)
    owner = path.with_name(name + OWNER_SUFFIX)  # a killed run's workspace is found by its dead owner (leftovers)
    owner.write_text(str(os.getpid()))
    cache = run_dvc(root, "cache", "dir").stdout.strip()
    base = _git(root, "rev-parse", "HEAD").stdout.strip()
    _git(root, "worktree", "add", "--detach", "--force", str(path), base)
    try:
        workspace = Workspace(root, path, base, {relative: _take(root, relative) for relative in _changed_files(root)})
        for relative, content in workspace.copied.items():
            _copy(root / relative, path / relative)
            if content is not None:  # what was taken, not a second read that could meet another command's write
                (path / relative).write_bytes(content)
        local_config = root / ".dvc" / "config.local"
        if local_config.is_file():
            shutil.copy2(local_config, path / ".dvc" / "config.local")
        run_dvc(path, "config", "--local", "cache.dir", cache)
        # Links where the file system allows (DVC protects linked outputs); a copy elsewhere.
        run_dvc(path, "config", "--local", "cache.type", "reflink,hardlink,copy")
        run_dvc(path, "checkout", "--allow-missing")
        yield workspace
    finally:
        _git(root, "worktree", "remove", "--force", str(path), check=False)
        shutil.rmtree(path, ignore_errors=True)
        _git(root, "worktree", "prune", check=False)
        owner.unlink(missing_ok=True)


def run_changes(workspace: Workspace) -> list[str]:
    """The git-visible files whose content the run changed in its workspace (params.yaml, dvc.lock, metrics)."""
    # A file neither copied in nor changed against `base` in the workspace is as it was when the run started.
    candidates = set(_changed_files(workspace.path)) | set(workspace.copied)
    return sorted(path for path in candidates if _read(workspace.path / path) != workspace.started(path))


def bring_back(workspace: Workspace, experiment: str) -> list[str]:
    """Copy the run's changed files into the project and check its outputs out from the shared cache.

    Refuses (WorkspaceConflict, the project untouched) when the project changed any of those files since the run
    started; the run stays available as experiment `experiment`.
    """
    changed = run_changes(workspace)
    edited = [relative for relative in changed if _read(workspace.root / relative) != workspace.started(relative)]
    if edited:
        raise WorkspaceConflict(
            f"{', '.join(edited)} changed in {workspace.root} while the run ran; the project is left as it is and "
            f"the run is kept as DVC experiment {experiment} (`dvc exp apply {experiment}` takes it)"
        )
    for relative in changed:
        source, target = workspace.path / relative, workspace.root / relative
        if source.is_file():
            with atomic_path(target) as scratch:
                shutil.copy2(source, scratch)
        else:
            target.unlink(missing_ok=True)
    run_dvc(workspace.root, "checkout", "--quiet")
    return changed


def restore_outputs(workspace: Workspace, outputs: list[str]) -> None:
    """Put a failed stage's outputs back as the project holds them (DVC removed them before the stage ran)."""
    for relative in outputs:
        _copy(workspace.root / relative, workspace.path / relative)
