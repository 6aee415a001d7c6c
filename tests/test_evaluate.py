"""tasks/evaluate.py beyond the pipeline: a user's own lm-eval task YAML over a local file, beside the project's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.evaluate import evaluate_model, other_task_metrics, task_kinds
from tasks.lib.params import ParamsError, load_params

ROOT = Path(__file__).resolve().parents[1]
UNGATED = {
    "dpo.gate.max_task_accuracy_drop": None,
    "dpo.gate.max_chosen_nll_rise": None,
    "dpo.gate.max_chosen_nll_rise_vs_sft": None,
}
"""An eval with only some of the project's tasks: the gate thresholds whose metrics it leaves out are turned off
(params refuse a threshold that nothing measures)."""
TASK_YAML = """
task: capitals_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def test_task_kinds_and_other_task_metrics():
    own, files, named = task_kinds(["sftdpo_preference", "mine/task.yaml", "gsm8k"])
    assert (own, files, named) == (["sftdpo_preference"], [Path("mine/task.yaml")], ["gsm8k"])
    results = {
        "sftdpo_preference": {"acc,none": 0.5},
        "gsm8k": {"exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.1, "alias": "gsm8k"},
        "mine": {"acc,none": 0.75, "acc_stderr,none": "N/A"},
    }
    assert other_task_metrics(results) == {"gsm8k/exact_match[strict-match]": 0.25, "mine/acc": 0.75}


def test_a_missing_task_yaml_is_a_params_error(tmp_path):
    with pytest.raises(ParamsError, match="no such task YAML: nowhere/task.yaml"):
        load_params(ROOT / "params.yaml", {"eval.tasks": ["sftdpo_preference", "nowhere/task.yaml"]})


def test_a_users_task_yaml_joins_the_project_tasks(tmp_path):
    from tasks.base import build_base

    data = tmp_path / "capitals.jsonl"
    rows = [
        {"question": "Capital of France?", "choices": [" Paris", " Rome"], "answer": 0},
        {"question": "Capital of Italy?", "choices": [" Paris", " Rome"], "answer": 1},
        {"question": "Capital of Spain?", "choices": [" Madrid", " Oslo"], "answer": 0},
    ]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    task = tmp_path / "capitals.yaml"
    task.write_text(TASK_YAML.format(data=data), encoding="utf-8")
    params = load_params(
        ROOT / "params.yaml",
        {"eval.tasks": ["sftdpo_preference", str(task)], "eval.limit": 4, "eval.kl_samples": 0, **UNGATED},
    )
    base = tmp_path / "base"
    build_base(params, ROOT / "data/builtin/sft.jsonl", base)
    scores = evaluate_model(
        params,
        base,
        ROOT / "data/builtin/eval_pairs.jsonl",
        ROOT / "data/builtin/sft.jsonl",
        tmp_path / "eval.json",
        tmp_path / "answers.jsonl",
    )
    assert set(scores) == {"preference_accuracy", "capitals_mc/acc"}
    assert scores["capitals_mc/acc"] in (0.0, 1 / 3, 2 / 3, 1.0)
    assert json.loads((tmp_path / "eval.json").read_text()) == scores


def direct_chosen_nll(model_dir: Path, params, pairs: list[dict]) -> float:
    """Per-token NLL of each preferred completion given its rendered prompt, from one plain forward pass.

    Split as lm-eval splits a request: the context's trailing whitespace (the newline after the assistant header)
    is scored as the completion's first token."""
    import torch

    from tasks.evaluate import _continuation
    from tasks.lib.chat import render
    from tasks.lib.policies import load_model, load_tokenizer

    tokenizer = load_tokenizer(str(model_dir), params.model)
    model = load_model(str(model_dir), params.model).eval()
    total, tokens = 0.0, 0
    for pair in pairs:
        context = render(tokenizer, pair["prompt"])
        whole = tokenizer(context + _continuation(tokenizer, pair["prompt"], pair["chosen"]), add_special_tokens=False)
        start = len(tokenizer(context.rstrip(), add_special_tokens=False)["input_ids"])
        ids = torch.tensor([whole["input_ids"]])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
        targets = ids[0, 1:]
        total -= float(logprobs[torch.arange(len(targets)), targets][start - 1 :].sum())
        tokens += len(targets) - (start - 1)
    return total / tokens


def test_the_forgetting_metric_is_the_per_token_nll_of_the_preferred_completions(tmp_path):
    from tasks.base import build_base

    limit = 6
    params = load_params(
        ROOT / "params.yaml",
        {"eval.tasks": ["sftdpo_chosen_nll", "sftdpo_text_nll"], "eval.limit": limit, "eval.kl_samples": 0, **UNGATED},
    )
    base = tmp_path / "base"
    build_base(params, ROOT / "data/builtin/sft.jsonl", base)
    pairs = ROOT / "data/builtin/eval_pairs.jsonl"
    scores = evaluate_model(
        params, base, pairs, ROOT / "data/builtin/sft.jsonl", tmp_path / "eval.json", tmp_path / "answers.jsonl"
    )
    rows = [json.loads(line) for line in pairs.read_text().splitlines()[:limit]]
    assert scores["chosen_nll"] == pytest.approx(direct_chosen_nll(base, params, rows), rel=1e-5)
    # A random-init model over a 512-token vocabulary: about ln(512) = 6.2 nats a token.
    assert 4.0 < scores["chosen_nll"] < 9.0 and 4.0 < scores["text_nll"] < 9.0
