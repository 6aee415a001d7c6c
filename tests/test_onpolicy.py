"""The on-policy round stages: tasks/prompts.py, generate.py (+ generation.py), judge.py, pairs.py, gate.py.

Unit checks first, then the stages on the micro pipeline's SFT policy, then DVC projects: with a
planted regression the gate refuses it and the next round starts from the last promoted policy; a
round killed mid-generation resumes; an appended round re-runs only itself and what follows.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import dvc, edit_params, project_env, read_json, read_params, tiny_reward_model

from flows.params_file import extended_rounds
from tasks.gate import refusals
from tasks.generate import generate_round
from tasks.judge import judge_round, scored_rows
from tasks.lib.errors import DataError, SettingError
from tasks.lib.files import load_records, write_records
from tasks.lib.hashing import file_digest
from tasks.lib.judges import FunctionJudge, RuleJudge
from tasks.lib.params import ParamsError, load_params, validate
from tasks.lib.policies import TRAINED_PAIRS_FILE
from tasks.lib.schema import GateParams, JudgeParams, OnPolicyParams, PairParams
from tasks.pairs import build_pairs, judged_pairs, prompt_pairs
from tasks.prompts import round_slice

ROOT = Path(__file__).resolve().parents[1]
QUESTION = [{"role": "user", "content": "What is 3 plus 4?"}]
ROUND_STAGES = ("prompts", "generate", "judge", "pairs", "reference_logps", "dpo", "guard", "eval", "gate", "lineage")


def test_round_slices_do_not_reuse_prompts_until_the_pool_runs_out():
    first, reused_first = round_slice(320, 160, 0, seed=0)
    second, reused_second = round_slice(320, 160, 1, seed=0)
    third, reused_third = round_slice(320, 160, 2, seed=0)
    assert len(set(first)) == len(set(second)) == 160 and not set(first) & set(second)
    assert reused_first == reused_second == 0 and reused_third == 160 and set(third) == set(first)
    assert round_slice(320, 160, 0, seed=1)[0] != first


def test_rule_judge_scores_known_good_and_bad_answers():
    judge = RuleJudge(JudgeParams(correct_weight=1.0, polite_weight=0.5))
    answers = ["The answer is 7. Happy to help!", "The answer is 7.", "The answer is 8. Happy to help!", "Seven?"]
    assert judge.score([QUESTION] * 4, answers) == [1.5, 1.0, 0.5, 0.0]
    assert judge.identity["kind"] == "rule" and len(judge.identity["source_sha256"]) == 64
    with pytest.raises(DataError, match="not a built-in task question"):
        judge.score(["Write a haiku."], ["An old pond."])


def test_function_judge_is_imported_by_path(tmp_path, monkeypatch):
    (tmp_path / "my_judges.py").write_text("def shortest(prompt, response):\n    return -len(response)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    judge = FunctionJudge(JudgeParams(kind="function", function="my_judges:shortest"))
    assert judge.score([QUESTION, QUESTION], ["ab", "abcd"]) == [-2.0, -4.0]
    with pytest.raises(SettingError, match="cannot import 'my_judges:missing'"):
        FunctionJudge(JudgeParams(kind="function", function="my_judges:missing"))


def scored_row(scores, texts, tokens=None, attributes=None) -> dict:
    row = {"prompt": QUESTION, "responses": texts, "scores": scores, "tokens": tokens or [len(t) for t in texts]}
    return {**row, "attributes": attributes} if attributes is not None else row


def test_best_worst_pairs_pick_the_extremes_and_drop_ties_and_degenerate_prompts():
    settings = PairParams(strategy="best_worst", min_gap=0.25)
    assert prompt_pairs(scored_row([0.5, 1.5, 0.0, 1.0], ["a", "b", "c", "d"]), settings) == ([(1, 2)], None)
    assert prompt_pairs(scored_row([1.0, 1.0, 1.1], ["a", "b", "c"]), settings) == ([], "tie")
    assert prompt_pairs(scored_row([1.5, 0.0], ["same", "same"]), settings) == ([], "degenerate")
    assert prompt_pairs(scored_row([1.5, 0.0], ["", "x"]), settings) == ([], "degenerate")
    rows = [scored_row([1.5, 0.0], ["good", "bad"]), scored_row([1.0, 1.0], ["x", "y"])]
    pairs, stats = judged_pairs(rows, settings)
    assert pairs == [
        {
            "prompt": QUESTION,
            "chosen": [{"role": "assistant", "content": "good"}],
            "rejected": [{"role": "assistant", "content": "bad"}],
        }
    ]
    assert stats == {
        "prompts": 2, "ties_dropped": 1, "degenerate_dropped": 0, "weak_chosen_dropped": 0,
        "length_mismatch_dropped": 0, "near_identical_dropped": 0, "no_single_attribute_dropped": 0,
        "mean_score_gap": 1.5,
    }  # fmt: skip


def test_margin_pairs_keep_every_wide_enough_gap_widest_first():
    settings = PairParams(strategy="margin", min_gap=0.5, max_pairs_per_prompt=2)
    pairs, _ = prompt_pairs(scored_row([1.5, 1.0, 0.0], ["a", "b", "c"]), settings)
    assert pairs == [(0, 2), (1, 2)]


def test_length_matched_pairs_differ_by_at_most_k_tokens_taking_the_widest_gap_within():
    row = scored_row([1.5, 1.0, 0.0, 0.2], ["a", "b", "c", "d"], tokens=[30, 9, 8, 12])
    assert prompt_pairs(row, PairParams(strategy="best_worst"))[0] == [(0, 2)]  # 22 tokens apart
    pairs, _ = prompt_pairs(row, PairParams(strategy="best_worst", max_length_difference=4))
    assert pairs == [(1, 2)]
    assert abs(row["tokens"][1] - row["tokens"][2]) <= 4
    margin, _ = prompt_pairs(row, PairParams(strategy="margin", max_length_difference=4, min_gap=0.5))
    assert all(abs(row["tokens"][c] - row["tokens"][r]) <= 4 for c, r in margin) and margin == [(1, 2), (1, 3)]
    assert prompt_pairs(row, PairParams(max_length_difference=0)) == ([], "length")


def test_min_chosen_score_keeps_only_pairs_whose_chosen_answer_is_correct():
    # The rule judge: correct 1.0 + polite 0.5. No correct sample: best_worst would teach the polite wrong answer.
    all_wrong = scored_row([0.5, 0.0, 0.5], ["The answer is 8. Happy to help!", "The answer is 9.", "x"])
    assert prompt_pairs(all_wrong, PairParams())[0] == [(0, 1)]
    assert prompt_pairs(all_wrong, PairParams(min_chosen_score=1.0)) == ([], "weak_chosen")
    one_right = scored_row([0.5, 1.0, 0.0], ["The answer is 8. Happy to help!", "The answer is 7.", "x"])
    assert prompt_pairs(one_right, PairParams(min_chosen_score=1.0))[0] == [(1, 2)]
    margin = PairParams(strategy="margin", min_chosen_score=1.0, min_gap=0.5)
    assert prompt_pairs(one_right, margin)[0] == [(1, 2), (1, 0)]
    _, stats = judged_pairs([all_wrong, one_right], PairParams(min_chosen_score=1.0))
    assert stats["weak_chosen_dropped"] == 1


def test_near_identical_pairs_are_dropped_above_max_similarity():
    row = scored_row([1.5, 0.0, 0.5], ["The answer is 7.", "The answer is 8.", "I do not know."])
    assert prompt_pairs(row, PairParams())[0] == [(0, 1)]
    assert prompt_pairs(row, PairParams(max_similarity=0.9))[0] == [(0, 2)]
    assert prompt_pairs(
        scored_row([1.5, 0.0], ["The answer is 7.", "The answer is 8."]), PairParams(max_similarity=0.9)
    ) == (
        [],
        "similar",
    )


def test_one_attribute_pairs_never_mix_correctness_with_style():
    attributes = [
        {"correct": True, "polite": True},
        {"correct": False, "polite": False},
        {"correct": True, "polite": False},
        {"correct": False, "polite": True},
    ]
    row = scored_row([1.5, 0.0, 1.0, 0.5], ["a", "b", "c", "d"], attributes=attributes)
    settings = PairParams(strategy="one_attribute")
    pairs, reason = prompt_pairs(row, settings)
    assert reason is None
    # best_worst would pair (0, 1): both attributes at once. One pair per attribute, widest gap first.
    assert pairs == [(0, 3), (0, 2)]
    for chosen, rejected in pairs:
        differing = [k for k in attributes[chosen] if attributes[chosen][k] != attributes[rejected][k]]
        assert len(differing) == 1 and attributes[chosen][differing[0]]
    both_apart = scored_row([1.5, 0.0], ["a", "b"], attributes=attributes[:2])
    assert prompt_pairs(both_apart, settings) == ([], "attribute")


def test_one_attribute_pairs_need_a_judge_that_reports_attributes():
    with pytest.raises(ValueError, match="one_attribute needs a judge that reports attributes"):
        OnPolicyParams(
            prompts={"pool": "p.jsonl"},
            judge={"kind": "function", "function": "m:f"},
            pairs={"strategy": "one_attribute"},
        )


def test_gate_names_every_regression_beyond_its_tolerance():
    gate = GateParams(
        max_task_accuracy_drop=0.05, max_perplexity_rise=0.5, max_chosen_nll_rise=None, max_chosen_nll_rise_vs_sft=None
    )
    baseline = {"task_accuracy": 0.60, "perplexity": 100.0}
    assert refusals(gate, {"task_accuracy": 0.56, "perplexity": 149.0}, baseline, {"quality": "ok"}, baseline) == []
    reasons = refusals(
        gate,
        {"task_accuracy": 0.50, "perplexity": 151.0},
        baseline,
        {"quality": "failed-quality", "guard_reasons": ["sanity"]},
        baseline,
    )
    assert len(reasons) == 3 and "task_accuracy fell 0.6000 -> 0.5000" in reasons[0] and "+51.0%" in reasons[1]


def test_gate_refuses_a_round_that_forgets_the_preferred_answers_not_one_that_learns_their_style():
    gate = GateParams(max_chosen_nll_rise=0.05)  # perplexity of SFT completions unchecked by default
    start = {"task_accuracy": 0.6, "perplexity": 100.0, "chosen_nll": 0.80}
    learned_style = {"task_accuracy": 0.6, "perplexity": 400.0, "chosen_nll": 0.60}
    assert refusals(gate, learned_style, start, {"quality": "ok"}, start) == []
    forgot = {"task_accuracy": 0.6, "perplexity": 90.0, "chosen_nll": 0.90}
    (reason,) = refusals(gate, forgot, start, {"quality": "ok"}, {**start, "chosen_nll": 1.0})
    assert reason == "chosen_nll rose 0.8 -> 0.9 (+12.5%; dpo.gate.max_chosen_nll_rise: 5%)"


def test_gate_keeps_the_forgetting_of_all_rounds_within_a_budget_over_sft_that_rises_per_round_would_exceed():
    gate = GateParams(max_chosen_nll_rise=0.05, max_chosen_nll_rise_vs_sft=0.05)
    sft, ok = {"task_accuracy": 0.5, "chosen_nll": 0.80}, {"quality": "ok"}
    policies = [sft]
    for _ in range(4):  # each round +4 % over the last: within the per-round limit, not within the budget
        policies.append({"task_accuracy": 0.5, "chosen_nll": policies[-1]["chosen_nll"] * 1.04})
    decisions = [refusals(gate, new, old, ok, sft) for old, new in itertools.pairwise(policies)]
    assert decisions[0] == [], "a round +4 % over SFT was refused"
    assert decisions[1] == ["chosen_nll rose from the SFT policy's 0.8 -> 0.8653 (+8.2%; "
                            "dpo.gate.max_chosen_nll_rise_vs_sft: 5%)"]  # fmt: skip
    below_sft = {"task_accuracy": 0.5, "chosen_nll": 0.60}
    assert refusals(gate, {**below_sft, "chosen_nll": 0.62}, below_sft, ok, sft) == []
    assert refusals(GateParams(max_chosen_nll_rise_vs_sft=None), policies[2], policies[1], ok, sft) == []


def test_gate_refuses_a_round_whose_thresholds_it_could_not_check_and_params_name_the_missing_eval_task():
    gate = GateParams(max_task_accuracy_drop=0.0, max_chosen_nll_rise=0.05)
    only_accuracy = {"task_accuracy": 0.6}
    (reason, budget) = refusals(gate, only_accuracy, only_accuracy, {"quality": "ok"}, only_accuracy)
    assert reason.startswith("chosen_nll unchecked: the round's and baseline's eval has none")
    assert budget.startswith("chosen_nll unchecked: the round's and SFT policy's eval has none")
    unchecked = GateParams(max_chosen_nll_rise=None, max_chosen_nll_rise_vs_sft=None)
    assert refusals(unchecked, only_accuracy, only_accuracy, {"quality": "ok"}, only_accuracy) == []

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["eval"]["tasks"] = ["sftdpo_preference", "sftdpo_generation"]
    with pytest.raises(ParamsError, match=r"dpo.gate.max_chosen_nll_rise: its metric comes from the eval task "
                       r"sftdpo_chosen_nll, which eval.tasks leaves out"):  # fmt: skip
        validate(raw)
    raw["dpo"]["gate"]["max_chosen_nll_rise"] = None
    with pytest.raises(ParamsError, match=r"dpo.gate.max_chosen_nll_rise_vs_sft: its metric comes from"):
        validate(raw)
    raw["dpo"]["gate"]["max_chosen_nll_rise_vs_sft"] = None
    validate(raw)


def test_a_length_penalty_lowers_long_responses_scores_and_keeps_the_judges_own():
    judge = RuleJudge(JudgeParams())
    rows = [
        {"prompt": QUESTION, "responses": ["The answer is 7.", "The answer is 7. Happy to help!"], "tokens": [6, 10]}
    ]
    plain = scored_rows(rows, [1.0, 1.5], judge, 0.0)[0]
    assert plain["scores"] == [1.0, 1.5] and "judge_scores" not in plain
    assert plain["attributes"] == [{"correct": True, "polite": False}, {"correct": True, "polite": True}]
    penalised = scored_rows(rows, [1.0, 1.5], judge, 0.2)[0]
    assert penalised["judge_scores"] == [1.0, 1.5] and penalised["scores"] == pytest.approx([-0.2, -0.5])


def round_prompts(pipeline: Path, tmp_path: Path, count: int) -> Path:
    prompts = tmp_path / "prompts.jsonl"
    write_records(prompts, load_records(pipeline / "data" / "rounds" / "r1" / "prompts.jsonl")[:count])
    return prompts


def test_generation_is_deterministic_under_a_seed_and_resumes_batch_by_batch(pipeline, tmp_path):
    samples = load_params(pipeline / "params.yaml").onpolicy.generate.samples_per_prompt
    two_prompts_a_batch = {"onpolicy.generate.batch_size": 2 * samples}
    params = load_params(pipeline / "params.yaml", two_prompts_a_batch)
    policy, prompts = pipeline / "models" / "policies" / "sft", round_prompts(pipeline, tmp_path, 10)
    first = generate_round(params, policy, prompts, tmp_path / "a.jsonl", tmp_path / "ckpt_a", tmp_path / "a.json")
    generate_round(params, policy, prompts, tmp_path / "b.jsonl", tmp_path / "ckpt_b", tmp_path / "b.json")
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    rows = load_records(tmp_path / "a.jsonl")
    assert first["batches"] == 5 and len(rows) == 10 and all(len(row["responses"]) == samples for row in rows)
    assert first["new_tokens"] > 0 and first["resumed_batches"] == 0

    (tmp_path / "ckpt_a" / "000003.jsonl").unlink()
    resumed = generate_round(params, policy, prompts, tmp_path / "c.jsonl", tmp_path / "ckpt_a", tmp_path / "c.json")
    assert resumed["resumed_batches"] == 4 and (tmp_path / "c.jsonl").read_text() == (tmp_path / "a.jsonl").read_text()

    reseeded = load_params(pipeline / "params.yaml", {**two_prompts_a_batch, "onpolicy.generate.seed": 1})
    generate_round(reseeded, policy, prompts, tmp_path / "d.jsonl", tmp_path / "ckpt_a", tmp_path / "d.json")
    assert (tmp_path / "d.jsonl").read_text() != (tmp_path / "a.jsonl").read_text()


def as_set(rows: list[dict]) -> set[str]:
    return {json.dumps(row, sort_keys=True) for row in rows}


def test_a_round_replays_the_pairs_its_starting_policy_was_trained_on(pipeline, tmp_path):
    rounds, policies = pipeline / "data" / "rounds", pipeline / "models" / "policies"
    trained = as_set(load_records(policies / "r1" / TRAINED_PAIRS_FILE))
    assert trained == as_set(load_records(pipeline / "data" / "prepared" / "pairs" / "r1.jsonl"))  # every split

    def r2_pairs(fraction: float, previous: str) -> tuple[dict, set[str]]:
        params = load_params(pipeline / "params.yaml", {"onpolicy.pairs.replay_fraction": fraction})
        out = tmp_path / f"{fraction}_{previous}.jsonl"
        report = build_pairs(
            params, rounds / "r2" / "scored.jsonl", rounds / "r2" / "incoming.jsonl", policies / previous,
            pipeline / "models" / "base", out, tmp_path / "report.json",
        )  # fmt: skip
        return report, as_set(load_records(out))

    plain, fresh = r2_pairs(0.0, "r1")
    half, mixed = r2_pairs(0.5, "r1")
    assert plain["replayed_pairs"] == 0 and 0 < half["replayed_pairs"] <= round(0.5 * len(trained))
    assert fresh < mixed < r2_pairs(1.0, "r1")[1] == fresh | trained and mixed - fresh <= trained
    assert half["pairs"] == len(mixed)
    assert r2_pairs(0.5, "r1")[1] == mixed  # seeded
    assert r2_pairs(0.5, "sft")[0]["replayed_pairs"] == 0  # the SFT snapshot was trained on no pairs


def test_reward_model_judge_scores_with_a_local_sequence_classifier(pipeline, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    policy = pipeline / "models" / "policies" / "sft"
    reward_model = tiny_reward_model(policy, tmp_path / "rm")
    generations = tmp_path / "generations.jsonl"
    write_records(generations, load_records(pipeline / "data" / "rounds" / "r1" / "generations.jsonl")[:3])
    params = load_params(
        pipeline / "params.yaml",
        {"onpolicy.judge.kind": "reward_model", "onpolicy.judge.reward_model": str(reward_model)},
    )
    summary = judge_round(params, generations, policy, tmp_path / "scored.jsonl", tmp_path / "judge.json")
    assert summary["judge"]["kind"] == "reward_model" and len(summary["judge"]["sha256"]) == 64
    scored = load_records(tmp_path / "scored.jsonl")
    assert all(len(row["scores"]) == len(row["responses"]) for row in scored)

    row = scored[0]
    tokenizer = AutoTokenizer.from_pretrained(reward_model)
    text = tokenizer.apply_chat_template(
        row["prompt"] + [{"role": "assistant", "content": row["responses"][0]}], tokenize=False
    )
    with torch.no_grad():
        model = AutoModelForSequenceClassification.from_pretrained(reward_model)
        direct = model(**tokenizer(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
    assert row["scores"][0] == pytest.approx(direct, abs=1e-4)


def test_gate_refuses_the_regression_and_the_next_round_starts_from_the_last_promoted_policy(regressed):
    project, log = regressed
    decision = read_json(project / "metrics" / "eval" / "r1.json")
    assert decision["promoted"] is False and decision["source"] == "sft" and decision["reasons"]
    policies = project / "models" / "policies"
    assert file_digest(policies / "r1" / "model.safetensors") == file_digest(policies / "sft" / "model.safetensors")
    assert read_json(project / "metrics" / "rounds" / "r2" / "generate.json")["policy"] == "models/policies/r1"
    lineage = read_json(project / "metrics" / "rounds" / "r1" / "lineage.json")
    assert lineage["gate"]["promoted"] is False and lineage["gate"]["reasons"] == decision["reasons"]
    final_source = read_json(project / "metrics" / "eval" / "r2.json")["source"]
    assert read_json(project / "metrics" / "merge.json")["round"] == final_source
    assert "refused" in log and "kept sft" in log


def test_round_killed_mid_generation_resumes_under_dvc_repro(project_copy, tmp_path):
    """Small batches (one prompt each) so the kill lands mid-generation; only generate@r1 is reproduced."""

    def reseed(params):
        params["onpolicy"]["generate"].update(seed=7, batch_size=params["onpolicy"]["generate"]["samples_per_prompt"])

    edit_params(project_copy, reseed)
    batches = project_copy / "checkpoints" / "generate_r1"
    repro = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", "generate@r1"], cwd=project_copy, env=project_env(project_copy),
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while len(list(batches.glob("0*.jsonl"))) < 3 and time.monotonic() < deadline and repro.poll() is None:
        time.sleep(0.05)
    os.killpg(repro.pid, signal.SIGKILL)
    repro.wait()
    finished_before_kill = len(list(batches.glob("0*.jsonl")))
    total = len(load_records(project_copy / "data" / "rounds" / "r1" / "prompts.jsonl"))  # one prompt a batch
    assert 3 <= finished_before_kill < total, "the kill should land mid-generation"

    log = dvc(project_copy, "repro", "generate@r1").stdout
    resumed = int(re.search(r"(\d+) batches resumed", log).group(1))
    assert resumed >= finished_before_kill

    fresh = load_params(project_copy / "params.yaml")
    rounds = project_copy / "data" / "rounds" / "r1"
    generate_round(fresh, project_copy / "models" / "policies" / "sft", rounds / "prompts.jsonl",
                   tmp_path / "uninterrupted.jsonl", tmp_path / "ckpt", tmp_path / "m.json")  # fmt: skip
    assert (rounds / "generations.jsonl").read_text() == (tmp_path / "uninterrupted.jsonl").read_text()


@pytest.mark.slow  # a whole on-policy round (47 s); make test covers the same append on shell-command DAGs
def test_adding_round_three_reruns_only_round_three_and_what_follows(project_copy):
    """The round the `next-round` flow appends (flows.params_file.extended_rounds) runs its real on-policy chain."""
    rounds = extended_rounds(load_params(project_copy / "params.yaml"), 3)
    edit_params(project_copy, lambda params: params["dpo"].update(rounds=rounds))
    log = dvc(project_copy, "repro").stdout
    ran = set(re.findall(r"Running stage '([^']+)'", log))
    chain = {f"{stage}@r3" for stage in ROUND_STAGES}
    assert chain <= ran <= chain | {"check_params", "merge", "eval_merged", "report", "dashboard"}
    prompts = read_json(project_copy / "metrics" / "rounds" / "r3" / "prompts.json")
    per_round = read_params(project_copy)["onpolicy"]["prompts"]["per_round"]
    assert prompts["pool_exhausted"] and prompts["reused_prompts"] == per_round and "prompt pool is exhausted" in log
    assert read_json(project_copy / "metrics" / "rounds" / "r3" / "lineage.json")["round"] == "r3"
