"""The whole pipeline on a real third-party tokenizer: Qwen3's (official chat template: hybrid thinking, no
generation markers) with a random-init, test-sized Qwen3 model, from `dvc repro` on a fresh project to the merged
model. Slow (a second pipeline beside the micro one): `make test-slow`, which CI runs after `make test`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import ROOT, commit_all, dvc, make_project, micro, real_artifact

pytestmark = pytest.mark.slow


def tiny_qwen3(folder: Path) -> Path:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from qwen3_template import tiny_qwen3 as build

    build(real_artifact("tokenizers/qwen3"), folder)
    return folder


def qwen3_micro(base: Path):
    def edit(params: dict) -> None:
        micro(params)
        params["model"]["base"] = str(base)
        params["data"]["max_rows"] = 96
        params["sft"]["train"]["epochs"] = 1
        params["onpolicy"]["prompts"]["per_round"] = 8
        params["onpolicy"]["generate"].update(samples_per_prompt=2, max_new_tokens=8)
        params["dpo"]["rounds"] = {"r1": params["dpo"]["rounds"]["r1"]}
        params["dpo"]["train"]["epochs"] = 1
        params["eval"].update(limit=8, max_new_tokens=8, kl_samples=2)

    return edit


def test_qwen3_tokenizer_and_template_run_the_whole_pipeline(tmp_path):
    project = make_project(tmp_path / "project", qwen3_micro(tiny_qwen3(tmp_path / "tiny-qwen3")))
    # A random model's samples all tie under the rule judge; human pairs give the round something to train on.
    human = (ROOT / "data/builtin/pairs_r1.jsonl").read_text().splitlines()[:16]
    (project / "data/incoming/r1.jsonl").write_text("\n".join(human) + "\n")
    commit_all(project, "qwen3")
    dvc(project, "repro")

    sft = json.loads((project / "metrics/sft.json").read_text())
    assert sft["loss_mask"] == "last_assistant_turn" and sft["train_loss_last"] < sft["train_loss_first"]
    data = json.loads((project / "metrics/data.json").read_text())
    assert data["sft"]["template"] == {
        "loss_mask": "last_assistant_turn", "prompt_boundary": "prefix", "rows_inference_prompt": 0,
        "rows_common_prefix": 0,
    }  # fmt: skip
    assert data["sft"]["sampled"] == 96  # data.max_rows
    pairs = json.loads((project / "metrics/rounds/r1/pairs.json").read_text())
    assert pairs["human_pairs"] == 16 and pairs["template"]["prompt_boundary"] == "prefix"
    scores = json.loads((project / "metrics/eval.json").read_text())
    assert {"sft", "merged"} <= set(scores) and "win_rate_vs_sft" in scores["merged"]
    merged = project / "models/merged"
    tokenizer_config = json.loads((merged / "tokenizer_config.json").read_text())
    assert tokenizer_config["eos_token"] == "<|im_end|>"
    assert "<think>" in (merged / "chat_template.jinja").read_text()  # Qwen3's own template, carried to the end
    assert "up to date" in dvc(project, "status").stdout
