"""tasks/lib/params.py + schema.py: every bad param gets one message naming file:line and key; README stays in sync."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks.lib.params import ParamsError, load_params
from tasks.lib.params_cli import params_reference_markdown

ROOT = Path(__file__).resolve().parents[1]


def write_params(tmp_path: Path, edit) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    edit(params)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def test_shipped_params_are_valid():
    params = load_params(ROOT / "params.yaml")
    assert list(params.dpo.rounds) == ["r1", "r2", "r3"] and params.dpo.final_round == "r3"


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda p: p["dpo"]["loss"].update(beta=0), "dpo.loss.beta: Input should be greater than 0"),
        (
            lambda p: p["dpo"]["train"].update(learning_rate=-1e-4),
            "dpo.train.learning_rate: Input should be greater than 0",
        ),
        (lambda p: p["sft"]["lora"].update(r=0), "sft.lora.r: Input should be greater than or equal to 1"),
        (lambda p: p["dpo"].update(rounds={}), "dpo.rounds: Dictionary should have at least 1 item"),
        (lambda p: p["dpo"]["loss"].update(types=["sigmoid", "kto"]), "dpo.loss.types.1: Input should be 'sigmoid'"),
        (lambda p: p["dpo"].update(betaa=0.1), "dpo.betaa: unknown key"),
        (
            lambda p: p["sft"]["train"].update(batch_size="eight"),
            "sft.train.batch_size: Input should be a valid integer",
        ),
        (
            lambda p: p["dpo"]["rounds"]["r2"].update(previous="sft"),
            "dpo.rounds.r2.previous: must be 'r1', the round before it",
        ),
        (lambda p: p["dpo"]["loss"].update(weights=[1.0, 0.5, 0.1]), "weights has 3 entries but types has 2"),
        (lambda p: p["onpolicy"]["judge"].update(kind="reward_model"), "kind reward_model needs reward_model"),
        (
            lambda p: p["onpolicy"]["generate"].update(samples_per_prompt=1),
            "onpolicy.generate.samples_per_prompt: Input should be greater than or equal to 2",
        ),
    ],
)
def test_bad_param_names_key_and_line(tmp_path, edit, expected):
    path = write_params(tmp_path, edit)
    with pytest.raises(ParamsError) as error:
        load_params(path)
    message = str(error.value)
    assert expected in message
    assert message.startswith(f"{path}:") and message.split(":")[1].isdigit(), message


def test_overrides_are_validated_by_the_same_schema():
    assert load_params(ROOT / "params.yaml", {"dpo.loss.beta": 0.3}).dpo.loss.beta == 0.3
    with pytest.raises(ParamsError, match="dpo.loss.beta: Input should be greater than 0"):
        load_params(ROOT / "params.yaml", {"dpo.loss.beta": -1})


def test_invalid_params_stop_a_stage_before_it_writes(tmp_path):
    import subprocess
    import sys

    path = write_params(tmp_path, lambda p: p["dpo"]["loss"].update(beta=-1))
    out = tmp_path / "base"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tasks.base",
            "--params",
            str(path),
            "--corpus",
            str(ROOT / "data/builtin/sft.jsonl"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode != 0 and "dpo.loss.beta" in result.stderr
    assert not out.exists()


def test_every_field_is_documented_and_the_docs_params_reference_is_current():
    reference = params_reference_markdown()
    assert "| None |" not in reference, "a schema field lacks a docstring"
    page = (ROOT / "docs" / "params.md").read_text()
    assert reference in page, "docs/params.md's params reference is stale: paste `make params-reference` into it"


def test_a_broken_round_chain_is_reported_at_the_rounds_own_line(tmp_path):
    path = write_params(tmp_path, lambda p: p["dpo"]["rounds"]["r2"].update(previous="r9"))
    line = next(number for number, text in enumerate(path.read_text().splitlines(), 1) if "previous: r9" in text)
    with pytest.raises(ParamsError) as error:
        load_params(path)
    assert str(error.value).startswith(f"{path}:{line}: dpo.rounds.r2.previous: must be 'r1', the round before it")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "the file is empty; it needs every section the shipped params.yaml has"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "not UTF-8 text (invalid start byte at byte 0)"),
        (b"dpo: [unclosed\n", "not valid YAML"),
        (b"- just\n- a list\n", "expected a mapping of sections, got list"),
    ],
    ids=["empty", "binary", "not-yaml", "not-a-mapping"],
)
def test_unreadable_params_file_gets_one_clear_error(tmp_path, content, expected):
    path = tmp_path / "params.yaml"
    path.write_bytes(content)
    with pytest.raises(ParamsError, match=re.escape(f"{path}: ")) as error:
        load_params(path)
    assert expected in str(error.value)
    # The command line says the same and exits as a stage with bad input does (2: orchestrators do not retry).
    result = subprocess.run(
        [sys.executable, "-m", "tasks.lib.params_cli", "--params", str(path)], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 2 and expected in result.stderr
