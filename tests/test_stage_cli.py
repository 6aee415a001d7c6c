"""tasks/lib/stage.py: every stage's command line comes from its work function; bad input exits 2 and writes nothing."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.lib.stage import build_parser

ROOT = Path(__file__).resolve().parents[1]
STAGES = sorted(path.stem for path in (ROOT / "tasks").glob("*.py") if path.stem != "__init__")
HEAVY = ("torch", "transformers", "trl", "peft", "datasets", "lm_eval", "bitsandbytes")


def stage_work(stage: str):
    """The function a stage module hands to stage_main when run as `python -m tasks.<stage>`."""
    module = importlib.import_module(f"tasks.{stage}")
    source = Path(module.__file__).read_text()
    name = source.rsplit("stage_main(", 1)[-1].split(")")[0].strip()
    return getattr(module, name)


@pytest.mark.parametrize("stage", STAGES)
def test_every_flag_has_help_from_the_work_functions_docstring(stage):
    parser = build_parser(stage_work(stage))
    options = [action for action in parser._actions if action.option_strings and action.dest != "help"]
    assert any(action.dest == "params" for action in options)
    undocumented = [action.option_strings[0] for action in options if not action.help]
    assert not undocumented, f"tasks/{stage}.py: add these to the Args: section of its work function: {undocumented}"


def test_importing_every_stage_loads_no_heavy_library():
    """`--help` and params validation stay fast: heavy libraries load inside the work functions."""
    imports = ", ".join(f"tasks.{stage}" for stage in STAGES)
    code = f"import sys; import {imports}; print([m for m in {HEAVY!r} if m in sys.modules])"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert loaded.strip() == "[]"


def stage(arguments: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *arguments], capture_output=True, text=True, cwd=ROOT)


def test_unknown_round_exits_2_naming_the_rounds(tmp_path):
    out = tmp_path / "prompts.jsonl"
    result = stage(["tasks.prompts", "--round", "r9", "--pool", "data/builtin/prompts.jsonl", "--incoming",
                    "data/incoming", "--out", str(out), "--incoming-out", str(tmp_path / "i.jsonl"),
                    "--report", str(tmp_path / "r.json")])  # fmt: skip
    assert result.returncode == 2 and "--round r9: not a key of dpo.rounds (r1, r2, r3)" in result.stderr
    assert not out.exists()


def test_bad_data_exits_2_with_file_and_line(tmp_path):
    pool = tmp_path / "pool.jsonl"
    pool.write_text('{"prompt": "What is 1 plus 2?"}\n{"question": "no prompt"}\n')
    out = tmp_path / "prompts.jsonl"
    outputs = ["--out", str(out), "--incoming-out", str(tmp_path / "i.jsonl"), "--report", str(tmp_path / "r.json")]
    result = stage(["tasks.prompts", "--round", "r1", "--pool", str(pool), "--incoming", str(tmp_path), *outputs])
    assert result.returncode == 2 and result.stderr.startswith("bad data:") and f"{pool}:2:" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


@pytest.mark.parametrize("base", ["/no/such/model", "no-such-org/no-such-model"])
def test_a_model_base_that_is_neither_a_folder_nor_a_cached_hub_id_exits_2_in_base(tmp_path, base):
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text().replace("base: builtin", f"base: {base}"))
    out = tmp_path / "base"
    result = stage(["tasks.base", "--params", str(params), "--corpus", "data/builtin/sft.jsonl", "--out", str(out)])
    assert result.returncode == 2, result.stderr
    assert f"model.base {base}: not a folder and not a hub id in the local cache" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


def run_with_file_size_limit(project: Path, stage_name: str, limit_bytes: int) -> subprocess.CompletedProcess:
    """The stage's own command (from dvc.lock), unwarmed, where no file may grow past `limit_bytes`: a full disk
    as a process meets it (the write fails with EFBIG instead of ENOSPC)."""
    import os
    import resource
    import shlex
    import signal

    import yaml

    from tasks.lib.warm import WARM_ENV

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer instead of failing the write
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    command = shlex.split(yaml.safe_load((project / "dvc.lock").read_text())["stages"][stage_name]["cmd"])
    env = {key: value for key, value in os.environ.items() if key != WARM_ENV}  # the limit is this process's own
    return subprocess.run(
        [sys.executable, *command[1:]], cwd=project, env=env, capture_output=True, text=True, preexec_fn=limit
    )


@pytest.mark.parametrize(
    ("stage_name", "outputs", "limit_bytes"),
    [
        ("prepare", ["data/prepared/sft_train.jsonl", "data/prepared/sft_heldout.jsonl"], 1000),
        ("merge", ["models/merged"], 20_000),  # safetensors writes from native code
    ],
)
def test_a_stage_the_disk_refuses_fails_with_one_message_and_keeps_its_previous_outputs(
    project_copy, stage_name, outputs, limit_bytes
):
    def contents() -> dict[str, bytes]:
        files = [path for output in outputs for path in [project_copy / output, *(project_copy / output).rglob("*")]]
        return {str(path): path.read_bytes() for path in files if path.is_file()}

    before = contents()
    assert before and max(len(content) for content in before.values()) > limit_bytes, "the limit proves nothing"

    result = run_with_file_size_limit(project_copy, stage_name, limit_bytes)

    assert result.returncode == 1, result.stderr[-2000:]
    assert "the file system refused:" in result.stderr and "larger than the file-size limit" in result.stderr
    assert "previous ones are left as they were" in result.stderr and "Traceback" not in result.stderr
    assert contents() == before
    leftovers = [path for output in outputs for path in (project_copy / output).parent.glob(".*")]
    assert not leftovers, f"scratch files left behind: {leftovers}"
