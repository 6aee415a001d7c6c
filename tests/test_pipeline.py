"""End to end: `dvc repro` of the whole DAG on a micro config, then what DVC re-runs."""

from __future__ import annotations

import math
import re
import sys

import pytest
import yaml

from conftest import read_json, run


def stages_run(log: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", log))


def test_every_stage_ran(pipeline):
    ran = stages_run((pipeline / "first_repro.log").read_text())
    assert {"base", "prepare", "sft", "reference", "dpo@r1", "dpo@r2", "merge", "eval_merged", "report"} <= ran


def test_sft_loss_fell(pipeline):
    metrics = read_json(pipeline / "metrics" / "sft.json")
    assert metrics["train_loss_last"] < 0.25 * metrics["train_loss_first"]


def test_first_dpo_step_loss_is_ln2_when_policy_equals_reference(pipeline):
    first = read_json(pipeline / "plots" / "dpo_r1.json")[0]
    assert first["step"] == 1
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)


def test_dpo_raises_heldout_preference_accuracy_without_collapse(pipeline):
    scores = read_json(pipeline / "metrics" / "eval.json")
    assert list(scores) == ["sft", "r1", "r2", "merged"]
    assert scores["r2"]["preference_accuracy"] > scores["sft"]["preference_accuracy"] + 0.05
    for name in ("r1", "r2"):
        assert read_json(pipeline / "metrics" / f"dpo_{name}.json")["quality"] == "ok"


def test_dpo_changed_the_trained_parameters(pipeline):
    from safetensors.torch import load_file

    before = load_file(pipeline / "models" / "policies" / "sft" / "model.safetensors")
    after = load_file(pipeline / "models" / "policies" / "r1" / "model.safetensors")
    changed = [name for name in before if not (before[name] == after[name]).all()]
    assert changed and any("q_proj" in name for name in changed)


def test_merged_model_matches_adapter_and_loads_without_project_code(pipeline):
    metrics = read_json(pipeline / "metrics" / "merge.json")
    assert metrics["merged_adapter"] and metrics["max_logit_difference"] <= 1e-4
    merged = pipeline / "models" / "merged"
    code = "from transformers import AutoModelForCausalLM as M; M.from_pretrained('.'); print('loaded')"
    assert "loaded" in run([sys.executable, "-c", code], merged).stdout
    for path in merged.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".md", ".jinja"):
            assert str(pipeline) not in path.read_text(), f"{path.name} leaks a build-machine path"
    assert "reference snapshot sha256" in (merged / "README.md").read_text()


def test_stored_reference_logps_equal_a_direct_computation(pipeline):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference = pipeline / "models" / "policies" / "sft"
    model = AutoModelForCausalLM.from_pretrained(reference)
    tokenizer = AutoTokenizer.from_pretrained(reference)
    rows = [yaml.safe_load(line) for line in (pipeline / "models/reference_logps/r1/train.jsonl").read_text().splitlines()[:5]]
    for row in rows:
        for side in ("chosen", "rejected"):
            prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
            full = tokenizer.apply_chat_template(row["prompt"] + row[side], tokenize=False)
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([tokenizer(full, add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                logps = model(ids).logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0]
            direct = logps[len(prompt_ids) - 1 :].sum().item()
            assert row[f"ref_{side}_logps"] == pytest.approx(direct, abs=1e-3)


def test_second_repro_runs_nothing_and_beta_change_reruns_only_dpo_onwards(pipeline):
    second = run([sys.executable, "-m", "dvc", "repro"], pipeline).stdout
    assert stages_run(second) == set()

    params = yaml.safe_load((pipeline / "params.yaml").read_text())
    params["dpo"]["loss"]["beta"] = 0.2
    (pipeline / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = stages_run(run([sys.executable, "-m", "dvc", "repro"], pipeline).stdout)
    assert {"dpo@r1", "dpo@r2", "merge", "eval@r1", "eval@r2", "eval_merged", "report"} <= third
    assert not third & {"base", "prepare", "pairs@r1", "sft", "reference", "reference_logps@r1", "reference_logps@r2",
                        "eval_sft"}
