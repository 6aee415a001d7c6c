"""Stages `eval_sft`, `eval@<round>`, `eval_merged`: lm-eval on one model, offline.

The project's task YAMLs (tasks/lm_eval_tasks/) define preference accuracy (multiple choice by
log-likelihood), task accuracy from greedy generations, and held-out perplexity. This stage
renders the held-out data with the evaluated model's own chat template, points the tasks at
those documents, and writes `{metric: value}` for the model.

The greedy answers lm-eval generated for the held-out prompts are kept (`--answers-out`), scored by
the run's judge (`onpolicy.judge`), with their length in tokens. From them the stage also reports:
- `answer_tokens_mean`, `answer_tokens_p95`, `answer_truncated_rate` (answers that reached
  `eval.max_new_tokens` tokens) and `judge_score_mean`;
- `kl_to_sft` (with `--sft-policy`): KL(pi || pi_sft) estimated by Monte Carlo, the mean of
  log pi(y|x) - log pi_sft(y|x) over `eval.kl_samples` responses y sampled from the model (temperature 1)
  for each held-out prompt, scored on the sampled token ids: how far the model moved from the frozen SFT
  reference that every round's drift is measured against;
- `win_rate_vs_<other>` (with `--versus-sft` / `--versus-previous`, the other model's answers): its
  judged win rate on the same prompts (ties half), `..._ci_low`/`..._ci_high` (95 % bootstrap),
  `lc_win_rate_vs_<other>` (length-controlled, see tasks/lib/stats.py) and `..._prompts`.

On several processes (`compute.processes`) lm-eval runs in its data-parallel mode: its evaluator deals the
requests by rank and gathers them on rank 0, which scores the answers, estimates the KL and writes.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from tasks.lib.chat import adds_special_tokens, last_content, render, response_text
from tasks.lib.distributed import ensure_process_group, is_main, rank, world_size
from tasks.lib.errors import DataError, SettingError
from tasks.lib.files import atomic_path, load_records, write_json, write_records
from tasks.lib.judges import open_judge
from tasks.lib.policies import has_cuda, load_model, load_tokenizer
from tasks.lib.schema import PROJECT_EVAL_TASKS, Params
from tasks.lib.stage import stage_main
from tasks.lib.stats import head_to_head, length_summary
from tasks.lib.timing import phase

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
STDERR_SUFFIX = "_stderr"
REPORTED = {
    ("sftdpo_preference", "acc"): "preference_accuracy",
    ("sftdpo_generation", "exact_match"): "task_accuracy",
    ("sftdpo_generation", "correct"): "correct",
    ("sftdpo_generation", "polite"): "polite",
    ("sftdpo_perplexity", "perplexity"): "perplexity",
    ("sftdpo_chosen_nll", "nll"): "chosen_nll",
    ("sftdpo_text_nll", "nll"): "text_nll",
}


def _continuation(tokenizer, prompt, response) -> str:
    """The response exactly as it follows the rendered prompt (end-of-turn token included), as training split it."""
    text = response_text(tokenizer, prompt, response)
    return text if text is not None else last_content(response)


def task_documents(tokenizer, eval_pairs: list[dict], sft_heldout: list[dict], lm=None) -> dict[str, list[dict]]:
    """Documents of each task, rendered for this model.

    With `lm` (lm-eval's model) the NLL tasks' documents carry their token counts, split as lm-eval splits them,
    for a per-token figure.
    """
    preference, generation, chosen_nll, text_nll, seen = [], [], [], [], set()
    for pair in eval_pairs:
        context = render(tokenizer, pair["prompt"])
        chosen = _continuation(tokenizer, pair["prompt"], pair["chosen"])
        preference.append(
            {
                "context": context,
                "chosen": chosen,
                "rejected": _continuation(tokenizer, pair["prompt"], pair["rejected"]),
            }
        )
        if lm is not None:
            chosen_nll.append(
                {"context": context, "chosen": chosen, "tokens": len(lm._encode_pair(context, chosen)[1])}
            )
        if context not in seen:
            seen.add(context)
            if lm is not None:
                text = last_content(pair["prompt"])
                text_nll.append({"text": text, "tokens": len(lm.tok_encode(text))})
            generation.append(
                {
                    "context": context,
                    "question": last_content(pair["prompt"]),
                    "chosen": last_content(pair["chosen"]),
                    # JSON text: one column type whatever the data format, for lm-eval's dataset loader.
                    "prompt_json": json.dumps(pair["prompt"], ensure_ascii=False),
                }
            )
    perplexity = []
    for row in sft_heldout:
        prompt, completion = (
            (row["messages"][:-1], row["messages"][-1:]) if "messages" in row else (row["prompt"], row["completion"])
        )
        context = render(tokenizer, prompt)
        perplexity.append({"context": context, "completion": _continuation(tokenizer, prompt, completion)})
    return {
        "sftdpo_preference": preference,
        "sftdpo_generation": generation,
        "sftdpo_perplexity": perplexity,
        "sftdpo_chosen_nll": chosen_nll,
        "sftdpo_text_nll": text_nll,
    }


def prompt_key(prompt: Any) -> str:
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def open_lm(params: Params, model: Path, add_bos_token: bool = False):
    """lm-eval's `hf` model on a folder, as `lm_eval --model hf` would build it.

    `add_bos_token` for string rows: contexts then start with the tokenizer's BOS, as in SFT and DPO
    (`chat.adds_special_tokens`); a chat template writes its own.
    """
    from lm_eval.api.registry import get_model

    ensure_process_group()
    if world_size() > 1 and not has_cuda():
        os.environ["ACCELERATE_USE_CPU"] = "true"  # else accelerate ignores the launcher's CPU processes
    with phase("load"):
        lm = get_model("hf").create_from_arg_obj(
            {
                "pretrained": str(model),
                "dtype": params.model.dtype,
                "trust_remote_code": params.model.trust_remote_code,
                "add_bos_token": add_bos_token,
            },
            {"batch_size": params.eval.batch_size, "device": "cuda" if has_cuda() else "cpu"},
        )
    if world_size() > 1 and lm.world_size == 1:
        # lm-eval's `hf` model turns its data-parallel mode on only with more than one GPU; on CPU processes it
        # holds the launcher's accelerator but calls itself rank 0 of 1, so every process would do all the work.
        lm._rank, lm._world_size = rank(), world_size()
    return lm


def greedy_answers(params: Params, generation_samples: list[dict], tokenizer) -> list[dict]:
    """The generation task's logged samples as answers: prompt, reference answer, response and its length."""
    answers = []
    for sample in sorted(generation_samples, key=lambda sample: sample["doc_id"]):
        response = sample["filtered_resps"][0].strip()
        tokens = len(tokenizer(response, add_special_tokens=False)["input_ids"])
        answers.append(
            {
                "prompt": json.loads(sample["doc"]["prompt_json"]),
                "reference": sample["doc"]["chosen"],
                "response": response,
                "tokens": tokens,
                "truncated": tokens >= params.eval.max_new_tokens,
            }
        )
    return answers


def answer_metrics(answers: list[dict]) -> dict[str, float | None]:
    lengths = length_summary([answer["tokens"] for answer in answers])
    return {
        "answer_tokens_mean": lengths["mean"],
        "answer_tokens_p95": lengths["p95"],
        "answer_truncated_rate": statistics.fmean(answer["truncated"] for answer in answers) if answers else None,
        "judge_score_mean": statistics.fmean(answer["score"] for answer in answers) if answers else None,
    }


def versus(answers: list[dict], other_answers: Path, name: str) -> dict[str, float | int]:
    """Head-to-head figures of these answers against another model's, on the prompts both answered."""
    theirs = {prompt_key(answer["prompt"]): answer for answer in load_records(other_answers)}
    matched = [(answer, theirs.get(prompt_key(answer["prompt"]))) for answer in answers]
    matched = [(ours, other) for ours, other in matched if other is not None]
    if not matched:
        raise DataError(f"--versus-{name} {other_answers}: answers to none of this model's {len(answers)} prompts")
    result = head_to_head(
        [ours["score"] for ours, _ in matched],
        [other["score"] for _, other in matched],
        [ours["tokens"] for ours, _ in matched],
        [other["tokens"] for _, other in matched],
    )
    return {
        f"win_rate_vs_{name}": result["win_rate"],
        f"win_rate_vs_{name}_ci_low": result["ci_low"],
        f"win_rate_vs_{name}_ci_high": result["ci_high"],
        f"lc_win_rate_vs_{name}": result["lc_win_rate"],
        f"win_rate_vs_{name}_prompts": result["prompts"],
    }


def task_kinds(tasks: list[str]) -> tuple[list[str], list[Path], list[str]]:
    """`eval.tasks` split into the project's own tasks, task YAML files, and names from lm-eval's registry."""
    own = [task for task in tasks if task in PROJECT_EVAL_TASKS]
    files = [Path(task) for task in tasks if task.endswith((".yaml", ".yml"))]
    named = [task for task in tasks if task not in own and not task.endswith((".yaml", ".yml"))]
    return own, files, named


def project_task_spec(params: Params, task: str, documents: dict, tokenizer, scratch: Path) -> dict:
    """The project task's YAML pointed at this model's rendering of the held-out data."""
    from lm_eval.tasks._yaml_loader import load_yaml  # resolves include: and !function like the CLI

    data_file = scratch / f"{task}.jsonl"
    write_records(data_file, documents[task])
    spec = load_yaml(TASKS_DIR / f"{task}.yaml")
    spec["dataset_kwargs"] = {"data_files": {"test": str(data_file)}}
    if task == "sftdpo_generation":
        spec["generation_kwargs"] = {
            "until": [tokenizer.eos_token],
            "do_sample": False,
            "max_gen_toks": params.eval.max_new_tokens,
        }
    return spec


def run_lm_eval(params: Params, lm, specs: list[dict], named: list[str]) -> dict:
    """`lm_eval.simple_evaluate` on task specs and registered names; an unknown or unavailable task is bad input."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    # Indexing lm-eval's own task registry takes seconds: only when a task is named from it.
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=bool(named))
    unknown = [task for task in named if task not in manager.all_tasks]
    if unknown:
        raise SettingError(f"eval.tasks: {', '.join(unknown)}: not a task lm-eval knows, nor a project task or YAML")
    try:
        return lm_eval.simple_evaluate(
            model=lm, tasks=[*specs, *named], task_manager=manager, limit=params.eval.limit, log_samples=True
        )
    except ConnectionError as error:  # datasets' offline error: the task's dataset is not in the local cache
        raise DataError(
            f"eval.tasks: a task's dataset is not available: {error} (offline, lm-eval reads the local Hugging Face "
            "cache: run once with network, or copy the dataset into the cache)"
        ) from error


def other_task_metrics(results: dict[str, dict]) -> dict[str, float]:
    """Every metric of the tasks that are not the project's own, as `<task>/<metric>` (filters other than none kept)."""
    metrics = {}
    for task, values in results.items():
        if task in PROJECT_EVAL_TASKS:
            continue
        for key, value in values.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or metric.endswith(STDERR_SUFFIX) or not isinstance(value, (int, float)):
                continue
            name = metric if filter_name == "none" else f"{metric}[{filter_name}]"
            metrics[f"{task}/{name}"] = value
    return metrics


def evaluate_model(
    params: Params,
    model: Path,
    eval_pairs: Path,
    sft_heldout: Path,
    out: Path,
    answers_out: Path,
    sft_policy: Path | None = None,
    versus_sft: Path | None = None,
    versus_previous: Path | None = None,
) -> dict:
    """Evaluate one model with lm-eval on the held-out data; write `{metric: value}` and its judged greedy answers.

    Args:
        params: the pipeline's params
        model: a model folder
        eval_pairs: prepared held-out pairs
        sft_heldout: held-out SFT rows
        out: the model's metrics, JSON `{metric: value}`
        answers_out: its greedy answers to the held-out prompts, judged, with lengths (JSON lines)
        sft_policy: the SFT policy, to estimate the model's KL from it with `eval.kl_samples` samples (optional)
        versus_sft: the SFT policy's answers, for the win rate against it (optional)
        versus_previous: the previous round's policy's answers, for the win rate against it (optional)
    """
    from lm_eval.tasks._yaml_loader import load_yaml  # resolves include: and !function like the CLI

    tokenizer = load_tokenizer(str(model), params.model)
    pairs = load_records(eval_pairs)
    strings = bool(pairs) and adds_special_tokens(pairs[0]["prompt"])
    lm = open_lm(params, model, add_bos_token=strings)
    documents = task_documents(tokenizer, pairs, load_records(sft_heldout), lm)
    own, files, named = task_kinds(params.eval.tasks)
    with tempfile.TemporaryDirectory() as scratch:
        specs = [project_task_spec(params, task, documents, tokenizer, Path(scratch)) for task in own]
        evaluation = run_lm_eval(params, lm, specs + [load_yaml(path) for path in files], named)
    if not is_main():
        return {}  # lm-eval gathered everything on rank 0, which writes
    results = evaluation["results"]
    scores: dict[str, Any] = {
        name: results[task][f"{metric},none"]
        for (task, metric), name in REPORTED.items()
        if task in results and f"{metric},none" in results[task]
    }
    scores.update(other_task_metrics(results))
    answers = greedy_answers(params, evaluation["samples"].get("sftdpo_generation", []), tokenizer)
    if answers:
        judged = open_judge(params, model).score([a["prompt"] for a in answers], [a["response"] for a in answers])
        for answer, score in zip(answers, judged, strict=True):
            answer["score"] = score
        scores.update(answer_metrics(answers))
        if sft_policy is not None and params.eval.kl_samples > 0:
            scores["kl_to_sft"] = kl_estimate(params, lm, model, sft_policy, tokenizer, answers)
        for name, other in (("sft", versus_sft), ("previous", versus_previous)):
            if other is not None:
                scores.update(versus(answers, other, name))
    with atomic_path(answers_out) as scratch:
        write_records(scratch, answers)
    write_json(out, scores)
    print(f"{model}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items() if isinstance(v, float)))
    return scores


def kl_estimate(params: Params, lm, model: Path, sft_policy: Path, tokenizer, answers: list[dict]) -> float:
    """Monte Carlo KL(model || SFT) over the answers' prompts; each answer keeps its samples and their log-probs."""
    from tasks.lib.generation import TransformersBackend, completion_logps

    settings = params.onpolicy.generate.model_copy(
        update={
            "samples_per_prompt": params.eval.kl_samples,
            "temperature": 1.0,
            "top_p": 1.0,
            "max_new_tokens": params.eval.max_new_tokens,
        }
    )
    backend = TransformersBackend(model, params.model, loaded=lm.model)
    per_call = max(1, params.eval.batch_size // params.eval.kl_samples)
    prompt_ids, completions = [], []
    for index, start in enumerate(range(0, len(answers), per_call)):
        batch = answers[start : start + per_call]
        rendered = [render(tokenizer, answer["prompt"]) for answer in batch]
        special = adds_special_tokens(batch[0]["prompt"])
        groups = backend.sample(rendered, settings, params.eval.seed + index, add_special_tokens=special)
        for text, group in zip(rendered, groups, strict=True):
            ids = tokenizer(text, add_special_tokens=special)["input_ids"]
            prompt_ids.extend([ids] * len(group))
            completions.extend(group)
    token_ids = [list(completion.token_ids) for completion in completions]
    own = completion_logps(backend.model, prompt_ids, token_ids, params.eval.batch_size)
    reference = completion_logps(
        load_model(str(sft_policy), params.model).eval(), prompt_ids, token_ids, params.eval.batch_size
    )
    per_prompt = params.eval.kl_samples
    for position, answer in enumerate(answers):
        answer["kl_samples"] = [
            {"response": completions[i].text, "logp": own[i], "sft_logp": reference[i]}
            for i in range(position * per_prompt, (position + 1) * per_prompt)
        ]
    return math.fsum(a - b for a, b in zip(own, reference, strict=True)) / len(completions)


if __name__ == "__main__":
    stage_main(evaluate_model)
