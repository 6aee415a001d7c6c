"""`onpolicy.generate.backend: vllm` (tasks/lib/generation.py, tasks/lib/vllm_worker.py) against the transformers
backend on the micro pipeline's float32 policies, on the CPU build of vLLM in `.venv-vllm` (`make vllm`).

Where vLLM's environment is missing these tests are skipped, unless SFT_DPO_REQUIRE_VLLM is set (CI builds it and
sets it), where a missing environment fails them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, dvc, edit_params, read_json

from tasks.check_params import check_params
from tasks.lib.chat import render
from tasks.lib.errors import SettingError
from tasks.lib.files import load_records
from tasks.lib.generation import TransformersBackend, VllmBackend, completion_logps, vllm_problem
from tasks.lib.params import ParamsError, load_params, validate
from tasks.lib.schema import VllmParams

slow = pytest.mark.slow

PROMPTS = 24
# vLLM's CPU kernels (its own attention and fused matmuls) add and multiply in another order than the transformers
# forward pass, so float32 log-probs of the same tokens in the same context differ in the last digits; measured
# here up to 0.019 nats per token. A real fault is far larger: a token scored against a context shifted by one
# position, or under another template, is off by nats (the built-in vocabulary's per-token NLL is ~0.8-3).
TOKEN_LOGP_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def vllm_available():
    problem = vllm_problem(VllmParams())
    if problem:
        if os.environ.get("SFT_DPO_REQUIRE_VLLM"):
            pytest.fail(problem)
        pytest.skip(problem)


def greedy_transformers(backend: TransformersBackend, prompt_ids: list[list[int]], max_new_tokens: int) -> list:
    import torch

    answers = []
    for ids in prompt_ids:  # one prompt per call: no padding, the same positions vLLM sees
        with torch.no_grad():
            output = backend.model.generate(
                torch.tensor([ids]), do_sample=False, max_new_tokens=max_new_tokens,
                eos_token_id=backend.stop_ids, pad_token_id=backend.tokenizer.pad_token_id,
            )  # fmt: skip
        answers.append(output[0, len(ids) :].tolist())
    return answers


def prompt_ids_of(pipeline: Path, tokenizer) -> list[list[int]]:
    rows = load_records(pipeline / "data/prepared/eval_pairs.jsonl")[:PROMPTS]
    return [tokenizer(render(tokenizer, row["prompt"]), add_special_tokens=False)["input_ids"] for row in rows]


@pytest.fixture(scope="module")
def sft_backends(pipeline, vllm_available):
    params = load_params(pipeline / "params.yaml")
    policy = pipeline / "models/policies/sft"
    engine = VllmBackend(policy, params.model, params.onpolicy.generate)
    yield engine, TransformersBackend(policy, params.model), params
    engine.close()


@slow
def test_greedy_answers_are_the_transformers_backends_token_for_token(pipeline, sft_backends):
    engine, reference, params = sft_backends
    prompt_ids = prompt_ids_of(pipeline, reference.tokenizer)
    answers = engine.generate_ids(prompt_ids, [0] * len(prompt_ids), 1, 0.0, 1.0, params.eval.max_new_tokens)
    assert [group[0]["token_ids"] for group in answers] == greedy_transformers(
        reference, prompt_ids, params.eval.max_new_tokens
    )
    assert all(group[0]["finish_reason"] in ("stop", "length") for group in answers)


@slow
def test_sampled_tokens_log_probs_agree_with_a_transformers_forward_pass(pipeline, sft_backends):
    engine, reference, params = sft_backends
    prompt_ids = prompt_ids_of(pipeline, reference.tokenizer)
    settings = params.onpolicy.generate
    sampled = engine.generate_ids(
        prompt_ids, list(range(len(prompt_ids))), settings.samples_per_prompt, 1.0, 1.0, settings.max_new_tokens,
        logprobs=True,
    )  # fmt: skip
    pairs = [(ids, out) for ids, group in zip(prompt_ids, sampled, strict=True) for out in group]
    import torch

    worst = 0.0
    for ids, out in pairs:
        with torch.no_grad():
            log_softmax = reference.model(torch.tensor([ids + out["token_ids"]])).logits.float().log_softmax(-1)[0]
        ours = [log_softmax[len(ids) - 1 + i, token].item() for i, token in enumerate(out["token_ids"])]
        worst = max(worst, *(abs(a - b) for a, b in zip(ours, out["logprobs"], strict=True)))
    assert worst < TOKEN_LOGP_TOLERANCE, f"per-token log-probs differ by up to {worst:.4f} nats"
    summed = completion_logps(reference.model, [ids for ids, _ in pairs], [out["token_ids"] for _, out in pairs], 16)
    assert summed == pytest.approx([sum(o["logprobs"]) for _, o in pairs], abs=TOKEN_LOGP_TOLERANCE * 8)
    assert len({tuple(o["token_ids"]) for _, o in pairs}) > len(prompt_ids), "sampling drew one answer per prompt"


@slow
def test_the_same_seed_draws_the_same_samples_and_another_seed_others(pipeline, sft_backends):
    engine, reference, params = sft_backends
    rows = load_records(pipeline / "data/prepared/eval_pairs.jsonl")[:8]
    texts = [render(reference.tokenizer, row["prompt"]) for row in rows]
    settings = params.onpolicy.generate
    first, again, other = (engine.sample(texts, settings, seed) for seed in (3, 3, 4))
    assert first == again
    assert first != other
    assert all(len(group) == settings.samples_per_prompt for group in first)
    # A prompt's samples do not depend on the batch it is drawn in.
    assert engine.sample(texts[:1], settings, 3)[0] == first[0]


@slow
def test_a_round_sampled_by_vllm_trains_and_its_lora_policy_samples_like_transformers(project_copy, vllm_available):
    def use_vllm(params: dict) -> None:
        params["onpolicy"]["generate"]["backend"] = "vllm"

    edit_params(project_copy, use_vllm)
    before = load_records(project_copy / "data/rounds/r1/generations.jsonl")
    log = dvc(project_copy, "repro", "dpo@r1").stdout
    assert "Running stage 'generate@r1'" in log and "Running stage 'dpo@r1'" in log

    generated = load_records(project_copy / "data/rounds/r1/generations.jsonl")
    assert read_json(project_copy / "metrics/rounds/r1/generate.json")["backend"] == "vllm"
    assert [sorted(row) for row in generated] == [sorted(row) for row in before], "records differ in shape"
    for row in generated:
        assert all(isinstance(text, str) for text in row["responses"])
        assert all(0 < count <= 24 for count in row["tokens"]) and all(isinstance(f, bool) for f in row["finished"])
    assert read_json(project_copy / "metrics/rounds/r1/pairs.json")["pairs"] > 0
    assert read_json(project_copy / "metrics/dpo_r1.json")["steps"] > 0

    candidate = project_copy / "models/candidates/r1"
    assert (candidate / "adapter").is_dir(), "the round's policy was not trained as a LoRA adapter"
    params = load_params(project_copy / "params.yaml")
    engine = VllmBackend(candidate, params.model, params.onpolicy.generate)
    try:
        reference = TransformersBackend(candidate, params.model)
        prompt_ids = prompt_ids_of(project_copy, reference.tokenizer)[:8]
        answers = engine.generate_ids(prompt_ids, [0] * len(prompt_ids), 1, 0.0, 1.0, 16)
    finally:
        engine.close()
    assert [group[0]["token_ids"] for group in answers] == greedy_transformers(reference, prompt_ids, 16)


def test_a_missing_vllm_environment_is_one_clear_error_at_the_first_stage(tmp_path):
    """`check_params`, the stage every other waits for, refuses the backend with what to run (a SettingError: the
    command line exits 2, which orchestrators do not retry) and writes nothing."""
    missing = tmp_path / "nowhere/bin/python"
    params = load_params(
        ROOT / "params.yaml", {"onpolicy.generate.backend": "vllm", "onpolicy.generate.vllm.python": str(missing)}
    )
    with pytest.raises(SettingError) as error:
        check_params(params, tmp_path / "valid.json")
    assert str(error.value) == (
        f"onpolicy.generate.backend: vllm, but there is no vLLM environment at {missing} "
        "(onpolicy.generate.vllm.python): run `make vllm` to build it"
    )
    assert not (tmp_path / "valid.json").exists()
    problem = vllm_problem(VllmParams(python=sys.executable))
    assert problem.endswith("cannot import vllm: run `make vllm` to (re)build it")


def test_vllm_runs_generate_on_one_process():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["onpolicy"]["generate"]["backend"] = "vllm"
    raw["compute"]["processes"] = 2
    with pytest.raises(ParamsError, match=r"compute.stage_processes: \{generate: 1\}"):
        validate(raw)
    raw["compute"]["stage_processes"] = {"generate": 1}
    validate(raw)
