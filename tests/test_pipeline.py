"""End to end: `dvc repro` of the whole DAG on a micro config, then what DVC re-runs."""

from __future__ import annotations

import json
import math
import re
import sys

import pytest
import yaml
from conftest import dvc, edit_params, make_project, read_json, read_params, run

from tasks.lib.hashing import directory_digest, file_digest


def stages_run(log: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", log))


def test_every_stage_ran(pipeline_log):
    ran = stages_run(pipeline_log)
    rounds = {
        f"{stage}@{name}"
        for name in ("r1", "r2")
        for stage in (
            "prompts",
            "generate",
            "judge",
            "pairs",
            "reference_logps",
            "dpo",
            "guard",
            "eval",
            "gate",
            "lineage",
        )
    }
    assert {
        "check_params",
        "base",
        "prepare",
        "sft",
        "reference",
        "eval_sft",
        "merge",
        "eval_merged",
        "report",
        "dashboard",
    } | rounds == ran


def test_sft_loss_fell(pipeline):
    metrics = read_json(pipeline / "metrics" / "sft.json")
    assert metrics["train_loss_last"] < 0.25 * metrics["train_loss_first"]


def test_first_dpo_step_sees_policy_equal_to_reference(pipeline):
    """Stored reference log-probs match the policy at step 1: zero rewards (the sigmoid term is ln 2; the
    default loss adds an SFT term on the chosen responses)."""
    first = read_json(pipeline / "plots" / "dpo" / "r1.json")[0]
    assert first["step"] == 1
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-4)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    assert first["loss"] > math.log(2) - 1e-4


def test_onpolicy_dpo_raises_heldout_preference_accuracy_without_collapse(pipeline):
    scores = read_json(pipeline / "metrics" / "eval.json")
    assert [name for name in scores if not name.endswith("*")] == ["sft", "r1", "r2", "merged"]
    candidate = read_json(pipeline / "metrics" / "eval" / "candidate_r1.json")
    assert candidate["preference_accuracy"] > scores["sft"]["preference_accuracy"] + 0.05
    for name in ("r1", "r2"):
        assert read_json(pipeline / "metrics" / f"guard_{name}.json")["quality"] == "ok"


def test_eval_stages_report_win_rates_and_kl_recomputable_from_the_answers_they_keep(pipeline):
    from tasks.lib.files import load_records
    from tasks.lib.judges import RuleJudge
    from tasks.lib.params import load_params
    from tasks.lib.stats import head_to_head

    params = load_params(pipeline / "params.yaml")
    answers = {name: load_records(pipeline / "data/answers" / f"{name}.jsonl") for name in ("sft", "candidate_r1")}
    candidate = read_json(pipeline / "metrics/eval/candidate_r1.json")
    ours, sft = answers["candidate_r1"], answers["sft"]
    assert len(ours) == len(sft) == candidate["win_rate_vs_sft_prompts"] == params.eval.limit
    assert [a["prompt"] for a in ours] == [a["prompt"] for a in sft]
    judge = RuleJudge(params.onpolicy.judge)
    assert [a["score"] for a in ours] == judge.score([a["prompt"] for a in ours], [a["response"] for a in ours])
    figures = head_to_head(*([a[key] for a in side] for key in ("score", "tokens") for side in (ours, sft)))
    assert candidate["win_rate_vs_sft"] == figures["win_rate"]
    assert candidate["lc_win_rate_vs_sft"] == pytest.approx(figures["lc_win_rate"])
    assert candidate["win_rate_vs_sft_ci_low"] <= candidate["win_rate_vs_sft"] <= candidate["win_rate_vs_sft_ci_high"]
    samples = [sample for answer in ours for sample in answer["kl_samples"]]
    assert len(samples) == params.eval.kl_samples * len(ours)
    kl = sum(sample["logp"] - sample["sft_logp"] for sample in samples) / len(samples)
    assert candidate["kl_to_sft"] == pytest.approx(kl)
    scores = read_json(pipeline / "metrics" / "eval.json")
    # Two rounds of DPO moved the policy away from SFT (0.10 measured, 2.7 standard errors above 0).
    assert scores["r2"]["kl_to_sft"] > 0
    for name in ("r1", "r2", "merged"):
        assert {"win_rate_vs_sft", "lc_win_rate_vs_sft", "kl_to_sft", "answer_tokens_p95"} <= set(scores[name])
    assert "win_rate_vs_previous" in scores["r2"]


def test_completion_logps_match_a_direct_forward_pass_batched_or_not(pipeline):
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.lib.generation import completion_logps

    model = AutoModelForCausalLM.from_pretrained(pipeline / "models/policies/sft").eval()
    prompts, completions = [[5, 9, 17, 4], [3, 8]], [[11, 12, 2], [40, 41, 42, 43, 2]]
    batched = completion_logps(model, prompts, completions, batch_size=2)
    for prompt, completion, logp in zip(prompts, completions, batched, strict=True):
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            direct = model(ids).logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0]
        assert logp == pytest.approx(direct[len(prompt) - 1 :].sum().item(), abs=1e-4)
    assert completion_logps(model, prompts, completions, batch_size=1) == pytest.approx(batched, abs=1e-4)


def test_round_pairs_come_from_the_policys_own_judged_samples(pipeline):
    generations = [
        json.loads(line) for line in (pipeline / "data/rounds/r1/generations.jsonl").read_text().splitlines()
    ]
    responses = {text for row in generations for text in row["responses"]}
    pairs = [json.loads(line) for line in (pipeline / "data/prepared/pairs/r1.jsonl").read_text().splitlines()]
    assert pairs and all(
        p["chosen"][0]["content"] in responses and p["rejected"][0]["content"] in responses for p in pairs
    )
    report = read_json(pipeline / "metrics" / "rounds" / "r1" / "pairs.json")
    assert report["pairs"] == len(pairs) == report["prompts"] - report["ties_dropped"] - report["degenerate_dropped"]


def test_lineage_ties_each_round_together_by_content_hash(pipeline):
    lineage = read_json(pipeline / "metrics" / "rounds" / "r1" / "lineage.json")
    assert lineage["prompts"]["sha256"] == file_digest(pipeline / "data/rounds/r1/prompts.jsonl")
    assert lineage["pairs"]["sha256"] == file_digest(pipeline / "data/prepared/pairs/r1.jsonl")
    assert lineage["checkpoint"]["sha256"] == directory_digest(pipeline / "models/candidates/r1")
    samples = read_params(pipeline)["onpolicy"]["generate"]["samples_per_prompt"]
    assert lineage["scores"]["judge"]["kind"] == "rule"
    assert lineage["generations"]["sampling"]["samples_per_prompt"] == samples
    assert {"chosen_tokens_mean", "rejected_tokens_mean", "mean_score_gap"} <= set(lineage["pairs"])
    assert lineage["gate"]["promoted"] == read_json(pipeline / "metrics" / "eval" / "r1.json")["promoted"]


def test_dpo_changed_the_trained_parameters(pipeline):
    from safetensors.torch import load_file

    before = load_file(pipeline / "models" / "policies" / "sft" / "model.safetensors")
    after = load_file(pipeline / "models" / "candidates" / "r1" / "model.safetensors")
    changed = [name for name in before if not (before[name] == after[name]).all()]
    assert changed and any("q_proj" in name for name in changed)


def test_merged_model_matches_adapter_and_loads_without_project_code(pipeline):
    metrics = read_json(pipeline / "metrics" / "merge.json")
    assert metrics["round"] == read_json(pipeline / "metrics" / "eval" / "r2.json")["source"]
    assert metrics["merged_adapter"] == (metrics["round"] != "sft")
    assert metrics.get("max_logit_difference", 0.0) <= 1e-4
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
    rows = [
        yaml.safe_load(line)
        for line in (pipeline / "models/reference_logps/r1/train.jsonl").read_text().splitlines()[:5]
    ]
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


def test_no_output_records_where_this_machine_keeps_things(pipeline):
    """Artifacts travel (DVC remote, model hub, experiments): the model card, metrics, data, logs and dvc.lock name
    no absolute path of this machine (the project, the checkout it was made from, the home folder)."""
    import os
    from pathlib import Path

    from conftest import ROOT

    places = {str(pipeline), str(ROOT), os.path.expanduser("~") + "/"}
    card = pipeline / "models/merged/README.md"
    assert card.is_file()
    written = [card, pipeline / "dvc.lock"] + [
        path
        for folder in ("metrics", "models", "data", "logs", "plots", "reports")
        if (pipeline / folder).is_dir()
        for path in (pipeline / folder).rglob("*")
        if path.is_file()
    ]
    leaked = {
        str(path.relative_to(pipeline)): place
        for path in written
        for place in places
        if place.encode() in Path(path).read_bytes()
    }
    assert len(written) > 50 and not leaked, leaked


def test_second_repro_runs_nothing(project_copy):
    assert stages_run(dvc(project_copy, "repro").stdout) == set()


def test_dpo_change_reruns_only_dpo_onwards(regressed):
    """beta and training settings change round 1's policy, so round 2 samples afresh from it; round 1's data is kept."""
    _, log = regressed
    ran = stages_run(log)
    assert {"dpo@r1", "guard@r1", "eval@r1", "gate@r1", "dpo@r2", "eval@r2", "merge", "eval_merged", "report"} <= ran
    assert not ran & {
        "base", "prepare", "sft", "reference", "eval_sft", "prompts@r1", "generate@r1", "judge@r1", "pairs@r1",
        "reference_logps@r1", "prompts@r2",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p["dpo"].update(betta=0.1), "dpo.betta: unknown key"),  # a key no stage declares
        (lambda p: p["dpo"]["loss"].update(beta=-0.1), "dpo.loss.beta: Input should be greater than 0 (got -0.1)"),
        (
            lambda p: p["onpolicy"]["judge"].update(kind="function", function="no_such_module:score"),
            "onpolicy.judge.function: cannot import 'no_such_module:score'",
        ),
    ],
    ids=["untracked-key", "bad-value", "unimportable-judge"],
)
def test_bad_params_stop_dvc_repro_before_any_stage_works(tmp_path, edit, message):
    """On a project that never ran: check_params runs first, fails, and nothing else runs or is recorded."""
    project = make_project(tmp_path)
    edit_params(project, edit)
    result = dvc(project, "repro", check=False)
    assert result.returncode != 0 and message in result.stdout + result.stderr
    assert re.search(r"params.yaml:\d+: ", result.stdout + result.stderr) or "judge" in message
    assert "exited with 2" in result.stdout + result.stderr  # bad input: the flow does not retry it
    assert stages_run(result.stdout) == {"check_params"}
    assert not (project / "dvc.lock").exists() and not (project / "models").exists()


def stale_stages(project) -> set[str]:
    return set(json.loads(dvc(project, "status", "--json").stdout or "{}"))


def test_new_eval_pairs_re_run_only_the_guard_and_evaluation(project_copy):
    """SFT depends on the SFT splits prepare writes, not on the folder that also holds the held-out pairs; no DPO
    stage reads the held-out pairs (the guard scores them after training), so no round retrains."""
    pairs = (project_copy / "data/builtin/eval_pairs.jsonl").read_text().splitlines(keepends=True)
    (project_copy / "data/eval_pairs_v2.jsonl").write_text("".join(pairs[:-1]))
    edit_params(project_copy, lambda params: params["data"].update(eval_pairs="data/eval_pairs_v2.jsonl"))
    assert stages_run(dvc(project_copy, "repro", "prepare").stdout) == {"check_params", "prepare"}
    stale = stale_stages(project_copy)
    assert {"eval_sft", "guard@r1", "eval@r1"} <= stale
    assert not stale & {"base", "sft", "reference", "generate@r1", "pairs@r1", "reference_logps@r1", "dpo@r1"}


def test_a_round_written_without_reference_parses_and_uses_the_sft_snapshot(project_copy):
    edit_params(project_copy, lambda params: params["dpo"]["rounds"]["r2"].pop("reference"))
    stale = stale_stages(project_copy)  # dvc.yaml interpolates no `reference`: it parses
    assert "reference_logps@r2" in stale and not stale & {"base", "sft", "dpo@r1", "reference_logps@r1"}


def test_an_experiment_on_a_dpo_key_reuses_everything_upstream_of_dpo(project_copy):
    """`dvc exp run` runs in DVC's temporary workspace, where only cached outputs exist: every stage must be
    restorable (no persistent checkpoint outputs, metrics cached), or a sweep would re-run SFT for each point."""
    log = dvc(project_copy, "exp", "run", "--temp", "--name", "beta-0.3", "--set-param", "dpo.loss.beta=0.3", "dpo@r1")
    log = log.stdout
    ran = set(re.findall(r"Running stage '([^']+)'", log))
    assert ran == {"check_params", "dpo@r1"}, log[-3000:]
    shown = json.loads(dvc(project_copy, "exp", "show", "--json").stdout)
    experiment = next(rev for commit in shown for e in commit.get("experiments") or [] for rev in e["revs"])
    assert experiment["name"] == "beta-0.3"
    assert experiment["data"]["metrics"]["metrics/dpo_r1.json"]["data"]["steps"] > 0
