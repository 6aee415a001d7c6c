"""Shared fixtures: a temporary git + DVC copy of the project, run once on a micro config."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COPIED = (
    "tasks",
    "flows",
    "data/builtin",
    "data/incoming",
    "data/generate.py",
    "dvc.yaml",
    "params.yaml",
    "prefect.toml",
)

# Before Prefect is imported anywhere: no telemetry, and Prefect's files in a temporary folder, not the project's.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="sftdpo-prefect-home-")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def run(command: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "DVC_SITE_CACHE_DIR": str(cwd / ".dvc" / "site_cache"),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "DVC_NO_ANALYTICS": "1",
    }
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} exited {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result


def make_project(target: Path, edit_params=None, cache: Path | None = None) -> Path:
    """A git + DVC repository holding a copy of the project's pipeline (and optional params edits).

    `cache`: another project's DVC cache to share, so stages it already ran are restored from its run-cache.
    """
    for name in COPIED:
        source = ROOT / name
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, destination, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, destination)
    if edit_params:
        params = yaml.safe_load((target / "params.yaml").read_text())
        edit_params(params)
        (target / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], target)
    run([sys.executable, "-m", "dvc", "init", "-q"], target)
    shutil.copy(ROOT / ".dvc" / "config", target / ".dvc" / "config")
    if cache is not None:
        run([sys.executable, "-m", "dvc", "cache", "dir", "--local", str(cache)], target)
    (target / ".gitignore").write_text((ROOT / ".gitignore").read_text())
    run(["git", "add", "-A"], target)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "init"], target)
    return target


def micro(params: dict) -> None:
    """The demo, made quicker for tests: DPO logs every step, evaluation on fewer documents."""
    params["dpo"]["train"]["logging_steps"] = 1
    params["eval"]["limit"] = 40


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory) -> Path:
    """The micro pipeline reproduced once from scratch; tests read its outputs."""
    project = make_project(tmp_path_factory.mktemp("pipeline"), micro)
    result = run([sys.executable, "-m", "dvc", "repro"], project)
    (project / "first_repro.log").write_text(result.stdout)
    return project


def read_json(path: Path):
    import json

    return json.loads(path.read_text())


@pytest.fixture(scope="session")
def harness():
    """A temporary Prefect server and database for the flow tests."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def micro_flow(params: dict) -> None:
    micro(params)
    params["orchestration"]["retry_delay_seconds"] = 0


@pytest.fixture(scope="session")
def flow_project(harness, tmp_path_factory):
    """The micro pipeline run once from scratch by the flow; returns (project, that run's stage outcomes)."""
    from flows.pipeline import sft_dpo

    project = make_project(tmp_path_factory.mktemp("flow"), micro_flow)
    state = sft_dpo(project=str(project), return_state=True)
    assert state.is_completed(), state.message
    return project, state.result()["stages"]
