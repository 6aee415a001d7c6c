"""Shared fixtures: a temporary git + DVC copy of the project, run once on the micro config.

The micro pipeline (`tests/micro.yaml` over params.yaml) runs once per session with `dvc repro`;
tests read its outputs and never change it. A test that edits params, data or outputs works on its
own copy (`project_copy`): a copy holds the finished outputs, dvc.lock and DVC cache, so it re-runs
only what the test's edit changes, and the tests pass in any order.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from filelock import FileLock

ROOT = Path(__file__).resolve().parents[1]
COPIED = (
    "tasks",
    "chat_templates",
    "flows",
    "data/builtin",
    "data/incoming",
    "data/generate.py",
    "dvc.yaml",
    "params.yaml",
    "prefect.toml",
)
MICRO = Path(__file__).with_name("micro.yaml")
REAL = Path(os.environ.get("SFT_DPO_REAL_ARTIFACTS", ROOT.parent / "shared" / "real"))
"""Real third-party tokenizers, models and datasets (../shared/real); CI sets the variable and requires the folder."""
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Say hi."},
    {"role": "assistant", "content": "Hello there!"},
    {"role": "user", "content": "Add 2 and 2."},
    {"role": "assistant", "content": "The answer is 4."},
]
"""A two-turn conversation with a system message, for the chat-template tests."""


def real_artifact(relative: str) -> Path:
    """A folder of the real artifacts, or skip the test saying where they were looked for."""
    folder = REAL / relative
    if not folder.is_dir():
        pytest.skip(f"no real artifacts at {REAL} (set SFT_DPO_REAL_ARTIFACTS)")
    return folder


MICRO_POOL = 64
"""Prompts in the micro pool (the built-in pool's first lines): two rounds use it up, a third reuses it."""

# Before Prefect is imported anywhere: no telemetry, and Prefect's files in a temporary folder, not the project's.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="sftdpo-prefect-home-")
atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Two xdist workers, each starting stage processes, share two cores: one torch thread per process avoids
# oversubscription (a test stage's time is mostly start-up, not compute). Measured: 6 min 00 s -> 4 min 14 s.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def project_env(project: Path) -> dict[str, str]:
    """The environment a project's DVC commands run in: this interpreter's tools, the project's site cache."""
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "DVC_SITE_CACHE_DIR": str(project / ".dvc" / "site_cache"),
    }


def run(command: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=project_env(cwd), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} exited {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result


def dvc(project: Path, *arguments: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "dvc", *arguments], project, check=check)


def read_json(path: Path):
    return json.loads(path.read_text())


def read_params(project: Path) -> dict:
    return yaml.safe_load((project / "params.yaml").read_text())


def write_params(project: Path, params: dict) -> None:
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def edit_params(project: Path, edit: Callable[[dict], None]) -> None:
    params = read_params(project)
    edit(params)
    write_params(project, params)


def micro(params: dict) -> None:
    """Apply tests/micro.yaml's dotted keys to a params mapping."""
    for dotted, value in yaml.safe_load(MICRO.read_text()).items():
        node = params
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value


@functools.cache
def noise_free_sft() -> bytes:
    """The built-in SFT data without its noisy sums (`data/generate.py --noisy-facts 0`): the data the micro
    pipeline's thresholds were measured on (tests/micro.yaml says why). Generated once per test process."""
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run(
            [sys.executable, str(ROOT / "data" / "generate.py"), "--out", folder, "--noisy-facts", "0"],
            check=True,
            capture_output=True,
        )
        return (Path(folder) / "sft.jsonl").read_bytes()


def make_project(target: Path, edit: Callable[[dict], None] | None = micro) -> Path:
    """A git + DVC repository holding a copy of the project's pipeline, its params edited by `edit`."""
    for name in COPIED:
        source, destination = ROOT / name, target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, destination, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, destination)
    pool = (ROOT / "data/builtin/prompts.jsonl").read_text().splitlines(keepends=True)[:MICRO_POOL]
    (target / "data" / "micro").mkdir(parents=True)
    (target / "data" / "micro" / "prompts.jsonl").write_text("".join(pool))
    (target / "data" / "micro" / "sft.jsonl").write_bytes(noise_free_sft())
    if edit is not None:
        edit_params(target, edit)
    run(["git", "init", "-q"], target)
    dvc(target, "init", "-q")
    shutil.copy(ROOT / ".dvc" / "config", target / ".dvc" / "config")
    (target / ".gitignore").write_text((ROOT / ".gitignore").read_text())
    commit_all(target, "init")
    return target


def commit_all(project: Path, message: str) -> None:
    run(["git", "add", "-A"], project)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", message], project)


def copy_project(source: Path, target: Path) -> Path:
    """A copy of a project with its git history, dvc.lock, outputs and DVC cache: nothing it ran runs again."""
    shutil.copytree(source, target, symlinks=True, ignore=shutil.ignore_patterns("site_cache", "tmp"))
    return target


# A diamond (source -> left, right -> each round) and a foreach over params.yaml's rounds, like the pipeline's DAG.
DIAMOND_DAG = r"""
stages:
  source:
    cmd: echo base > source.txt
    outs: [source.txt]
  left:
    cmd: cp source.txt left.txt
    deps: [source.txt]
    outs: [left.txt]
  right:
    cmd: cp source.txt right.txt
    deps: [source.txt]
    outs: [right.txt]
  round:
    foreach: ${dpo.rounds}
    do:
      cmd: cat left.txt right.txt > round_${key}.txt
      deps: [left.txt, right.txt]
      outs: ["round_${key}.txt"]
  report:
    cmd: >-
      mkdir -p metrics && cat round_r1.txt round_r2.txt > /dev/null
      && echo '{"sft": {"accuracy": 0.5}}' > metrics/eval.json
    deps: [round_r1.txt, round_r2.txt]
    metrics: [metrics/eval.json: {cache: false}]
"""


def tiny_reward_model(policy: Path, out: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(policy)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        num_labels=1,
        pad_token_id=2,
    )  # deliberately not the tokenizer's pad (0): the judge must align them
    LlamaForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def make_shell_project(folder: Path, dag: str) -> Path:
    """A git + DVC project whose dvc.yaml is `dag` (shell commands, no models) beside the real params.yaml, cut to
    two rounds (the DAGs' tests count the rounds' stages)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["dpo"]["rounds"] = dict(list(params["dpo"]["rounds"].items())[:2])
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copytree(ROOT / "data" / "builtin", folder / "data" / "builtin")
    (folder / "dvc.yaml").write_text(dag)
    (folder / ".gitignore").write_text(".attempted\n")
    run(["git", "init", "-q"], folder)
    dvc(folder, "init", "-q")
    commit_all(folder, "init")
    return folder


def shared_folder(tmp_path_factory) -> Path:
    """A folder every pytest-xdist worker of this session sees (each worker's base temp sits inside it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(tmp_path_factory, name: str, build: Callable[[Path], str]) -> tuple[Path, str]:
    """`build(folder)` run by the first worker that needs it, under a file lock; the others wait and reuse it.

    Returns the folder and what `build` returned (kept in a file beside it).
    """
    root = shared_folder(tmp_path_factory)
    folder, log = root / name, root / f"{name}.log"
    with FileLock(str(root / f"{name}.lock")):
        if not log.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a build that failed part-way
            folder.mkdir()
            log.write_text(build(folder))
    return folder, log.read_text()


def _reproduced_micro_pipeline(folder: Path) -> str:
    make_project(folder)
    log = dvc(folder, "repro").stdout
    commit_all(folder, "micro pipeline reproduced")  # dvc.lock, so a copy's experiments start from it
    return log


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory) -> Path:
    """The micro pipeline reproduced once from scratch; tests read its outputs and never change them."""
    project, _ = built_once(tmp_path_factory, "pipeline", _reproduced_micro_pipeline)
    return project


@pytest.fixture(scope="session")
def pipeline_log(pipeline, tmp_path_factory) -> str:
    """What `dvc repro` printed when it built the micro pipeline."""
    return built_once(tmp_path_factory, "pipeline", _reproduced_micro_pipeline)[1]


@pytest.fixture
def project_copy(pipeline, tmp_path) -> Path:
    """A private copy of the finished micro pipeline, for a test that changes something."""
    return copy_project(pipeline, tmp_path / "project")


@pytest.fixture(scope="session")
def harness():
    """A temporary Prefect server and database for the flow tests."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def destructive(params: dict) -> None:
    """A planted regression: DPO steps far too large for the model (and another beta, so DPO alone re-runs)."""
    params["dpo"]["train"]["learning_rate"] = 0.05
    params["dpo"]["train"]["max_steps"] = 10
    params["dpo"]["loss"]["beta"] = 0.2


@pytest.fixture(scope="session")
def regressed(pipeline, tmp_path_factory) -> tuple[Path, str]:
    """A copy of the micro pipeline whose rounds regress, reproduced: (project, that repro's log).

    Only DPO settings changed, so DVC re-runs each round's dpo and what depends on it; tests read it.
    """

    def build(folder: Path) -> str:
        copy_project(pipeline, folder / "project")
        edit_params(folder / "project", destructive)
        return dvc(folder / "project", "repro").stdout

    folder, log = built_once(tmp_path_factory, "regressed", build)
    return folder / "project", log


NEEDS_PIPELINE = {"pipeline", "pipeline_log", "project_copy", "regressed"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Order for two workers: one test that builds the micro pipeline first, then every test that does not need
    it (the other worker runs them meanwhile), then the rest of the pipeline's tests."""
    needs = [item for item in items if NEEDS_PIPELINE & set(getattr(item, "fixturenames", ()))]
    rest = [item for item in items if item not in needs]
    items[:] = needs[:1] + rest + needs[1:]


@pytest.fixture(scope="session", autouse=True)
def warm_stages(tmp_path_factory):
    """Stage processes started by the tests start warm (tasks/lib/warm.py), as under `make demo`.

    One server per test process; a stage whose environment a test changed runs unwarmed, as it says.
    """
    from tasks.lib.warm import warm_stages

    with warm_stages() as path:
        yield path
