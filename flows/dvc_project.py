"""What the flows ask of DVC: the stage graph of dvc.yaml, which stages changed, running one stage.

dvc.yaml stays the only declaration of stages and their dependencies; nothing here lists them.
Stages run through the `dvc` command line so DVC records each one in dvc.lock exactly as
`dvc repro` would, and its output can be streamed line by line.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

RAN, SKIPPED, RESTORED = "Ran", "Skipped", "Restored"
"""Outcomes of a stage: its command ran; nothing it depends on changed; DVC's run-cache restored its outputs."""

_OUTCOME_LINES = (  # What `dvc repro` prints for each outcome (dvc/stage/run.py, cache.py, __init__.py).
    (RAN, "Running stage '{}'"),
    (RESTORED, "Stage '{}' is cached - skipping run"),
    (SKIPPED, "Stage '{}' didn't change, skipping"),
)
SUMMARY_STAGE = "report"
"""The stage whose metrics file is the `{model: {metric: value}}` table (eval summary, sweep results)."""
_EXIT_STATUS = re.compile(r"exited with (-?\d+)")
ERROR_TAIL_LINES = 25


@dataclass(frozen=True)
class StageGraph:
    """The pipeline as DVC reads it from dvc.yaml (foreach stages expanded to `name@key`)."""

    order: list[str]
    """Stage names in an order that runs every stage after the stages it depends on."""
    upstream: dict[str, set[str]]
    """For each stage, the stages whose outputs it reads."""
    metric_files: dict[str, list[str]]
    """For each stage, its metrics and plots files (paths relative to the project)."""
    outputs: dict[str, list[str]]
    """For each stage, every output path (relative to the project)."""
    changed: set[str]
    """Stages whose dependencies, params or outputs differed from dvc.lock when the graph was read (`dvc status`)."""


@dataclass
class StageRun:
    """One stage as the flow ran it."""

    name: str
    outcome: str
    seconds: float = 0.0
    exit_status: int = 0
    output_tail: list[str] = field(default_factory=list)


class StageFailed(RuntimeError):
    """A stage's command failed; the message carries the stage's own last lines of output."""

    def __init__(self, name: str, exit_status: int, output_tail: list[str]):
        self.name, self.exit_status, self.output_tail = name, exit_status, output_tail
        super().__init__(f"stage {name} failed (exit status {exit_status}):\n" + "\n".join(output_tail))


def read_graph(root: Path) -> StageGraph:
    """Read dvc.yaml's stage graph (ties in the topological order kept in dvc.yaml's order) and its status."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        stages = list(repo.index.stages)
        position = {stage.name: index for index, stage in enumerate(stages)}
        # DVC's edges point from a stage to the stages it depends on.
        dependencies = nx.relabel_nodes(repo.index.graph, lambda stage: stage.name)
        order = list(nx.lexicographical_topological_sort(dependencies.reverse(), key=position.__getitem__))
        upstream = {name: set(dependencies.successors(name)) for name in order}
        metric_files = {
            stage.name: [str(out.def_path) for out in stage.outs if out.metric or out.plot] for stage in stages
        }
        outputs = {stage.name: [str(out.def_path) for out in stage.outs] for stage in stages}
        # Status is keyed by addresses relative to the working directory; map them back to stage names.
        names = {stage.addressing: stage.name for stage in stages}
        changed = {names[address] for address in repo.status()}
    return StageGraph(order, upstream, metric_files, outputs, changed)


def stage_environment() -> dict[str, str]:
    """The environment of a stage: this interpreter's tools first, unbuffered output, calm progress bars."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    # Progress bars redraw with carriage returns, which become one log line each; fewer redraws.
    env.setdefault("TQDM_MININTERVAL", "10")
    return env


def run_stage(root: Path, name: str, on_line: Callable[[str], None], force: bool = False) -> StageRun:
    """Run one stage with `dvc repro --single-item` (`--force`: even if nothing changed), passing each output line
    to `on_line` as it comes."""
    started = time.perf_counter()
    command = [sys.executable, "-m", "dvc", "repro", "--single-item", *(["--force"] if force else []), name]
    tail: list[str] = []
    outcome = SKIPPED
    with subprocess.Popen(
        command,
        cwd=root,
        env=stage_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        errors="replace",
    ) as process:
        for raw in process.stdout:
            line = raw.rstrip()
            if not line:
                continue
            on_line(line)
            tail = (tail + [line])[-ERROR_TAIL_LINES:]
            outcome = next((kind for kind, text in _OUTCOME_LINES if text.format(name) in line), outcome)
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        statuses = _EXIT_STATUS.findall("\n".join(tail))
        raise StageFailed(name, int(statuses[-1]) if statuses else process.returncode, tail)
    return StageRun(name, outcome, seconds)


def save_experiment(
    root: Path, name: str, files: list[str], targets: list[str] | None = None, message: str | None = None
) -> str:
    """Record the workspace (params.yaml, dvc.lock and the given metrics files) as a DVC experiment.

    `targets`: commit only these stages' outputs (a failed run's completed stages; by default `dvc exp save`
    commits every stage). Returns the experiment's commit; `dvc exp show` lists every recorded run.
    """
    include = [argument for path in files if (root / path).exists() for argument in ("--include-untracked", path)]
    command = [sys.executable, "-m", "dvc", "exp", "save", "--name", name, "--force", *include]
    command += ["--message", message] if message else []
    command += targets or []
    result = subprocess.run(
        command, cwd=root, env=with_git_identity(root, stage_environment()), capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"dvc exp save failed:\n{result.stdout}{result.stderr}")
    commit = experiment_commits(root).get(name)
    if commit is None:
        raise RuntimeError(f"dvc exp save reported success but no experiment named {name} exists")
    return commit


def restore_stage_outputs(root: Path, name: str) -> None:
    """Put back the outputs dvc.lock records for a stage (DVC removes them before it runs the stage) from the cache."""
    run_dvc(root, "checkout", "--force", "--allow-missing", "--quiet", name)


def experiment_commits(root: Path) -> dict[str, str]:
    """Every recorded DVC experiment of the repository: name -> commit (DVC keeps them as git refs)."""
    refs = subprocess.run(
        ["git", "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps/"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    return {
        ref.rsplit("/", 1)[-1]: commit
        for commit, ref in (line.split() for line in refs)
        if not ref.startswith("refs/exps/exec/")
    }


REMOTE_NAME = "sft-dpo"
"""The DVC remote `storage.remote` is configured as (local config: params.yaml stays the one place it is set)."""


class RemoteError(RuntimeError):
    """A pull, push or check against `storage.remote` failed: the run is not reported done."""


def run_dvc(
    root: Path,
    *arguments: str,
    error: type[Exception] = RuntimeError,
    context: str = "",
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """`dvc <arguments>` in `root` (the stages' environment unless `env`); `error` with its output if it fails."""
    command = [sys.executable, "-m", "dvc", *arguments]
    result = subprocess.run(command, cwd=root, env=env or stage_environment(), capture_output=True, text=True)
    if result.returncode != 0:
        raise error(f"dvc {' '.join(arguments)} failed{context}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return result


def _dvc_remote_command(root: Path, *arguments: str) -> subprocess.CompletedProcess:
    return run_dvc(root, *arguments, error=RemoteError, context=" (storage.remote)")


def use_remote(root: Path, url: str) -> None:
    """Make `url` the project's default DVC remote for this checkout."""
    _dvc_remote_command(root, "remote", "add", "--local", "--force", "--default", REMOTE_NAME, url)


def forget_remote(root: Path) -> None:
    """With `storage.remote: null`, drop the remote an earlier run configured, so nothing is pushed or pulled."""
    configured = run_dvc(root, "remote", "list", "--local").stdout.split()
    if REMOTE_NAME in configured:
        run_dvc(root, "remote", "remove", "--local", REMOTE_NAME)


def check_remote_usable(root: Path, url: str) -> None:
    """Fail now, before any stage, when the remote cannot be listed (an unknown scheme, missing credentials, a
    missing DVC extra) or, for a folder remote, written: a push would fail only after the stage it follows ran.
    A remote error is the user's to fix, so it is raised once, not retried."""
    _dvc_remote_command(root, "status", "--cloud", "--json")
    if "://" in url and not url.startswith("file://"):
        return  # DVC's listing above reached it; writing is checked by the first push
    folder = Path(url.removeprefix("file://"))
    folder = folder if folder.is_absolute() else root / folder
    existing = next(parent for parent in (folder, *folder.parents) if parent.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        what = "a file" if not existing.is_dir() else "not writable"
        raise RemoteError(f"storage.remote {url}: {existing} is {what}, so DVC cannot create or write the remote there")


def pull_outputs(root: Path) -> None:
    """Fetch every output dvc.lock records that the remote holds (a fresh remote holds none: not an error)."""
    _dvc_remote_command(root, "pull", "--allow-missing")


def push_outputs(root: Path, stage: str | None = None) -> None:
    """Push one stage's outputs (or every output dvc.lock records) to the remote."""
    _dvc_remote_command(root, "push", *([stage] if stage else []))


def unpushed_outputs(root: Path) -> list[str]:
    """Outputs dvc.lock records that the remote lacks or holds otherwise (`dvc status --cloud`); empty when clean."""
    import json

    status = json.loads(_dvc_remote_command(root, "status", "--cloud", "--json").stdout or "{}")
    return sorted(f"{path} ({state})" for path, state in status.items())


def with_git_identity(root: Path, env: dict[str, str]) -> dict[str, str]:
    """Experiment commits need an author; where git has none configured (a CI box), name the flow."""
    for key in ("name", "email"):
        configured = subprocess.run(["git", "config", f"user.{key}"], cwd=root, capture_output=True, text=True)
        if not configured.stdout.strip():
            value = "sft-dpo flow" if key == "name" else "sft-dpo@localhost"
            for role in ("AUTHOR", "COMMITTER"):
                env.setdefault(f"GIT_{role}_{key.upper()}", value)
    return env


def matching_experiment(root: Path, files: list[str]) -> tuple[str, str] | None:
    """The newest recorded experiment whose params.yaml, dvc.lock and `files` equal the workspace's, if any.

    A run that changed nothing need not be recorded again (`dvc exp save` costs seconds).
    """
    refs = subprocess.run(
        [
            "git",
            "for-each-ref",
            "--sort=-committerdate",
            "--count=1",
            "--format=%(objectname) %(refname:lstrip=-1)",
            "refs/exps/",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    if not refs:
        return None
    commit, name = refs
    tracked = ["params.yaml", "dvc.lock", *[path for path in files if (root / path).exists()]]
    for path in tracked:
        recorded = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=root, capture_output=True)
        if recorded.returncode != 0 or recorded.stdout != (root / path).read_bytes():
            return None
    return name, commit


def is_git_repository(root: Path) -> bool:
    result = subprocess.run(["git", "rev-parse", "--verify", "HEAD"], cwd=root, capture_output=True, text=True)
    return result.returncode == 0
