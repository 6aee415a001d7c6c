"""Stages `eval_sft`, `eval@<round>`, `eval_merged`: lm-eval on one model, offline.

The project's task YAMLs (tasks/lm_eval_tasks/) define preference accuracy (multiple choice by
log-likelihood), task accuracy from greedy generations, and held-out perplexity. This stage
renders the held-out data with the evaluated model's own chat template, points the tasks at
those documents, and writes `{metric: value}` for the model.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from tasks.lib.chat import last_content, render
from tasks.lib.files import load_records, write_json, write_records
from tasks.lib.policies import has_cuda, load_tokenizer
from tasks.lib.schema import Params
from tasks.lib.stage import stage_main

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
REPORTED = {
    ("sftdpo_preference", "acc"): "preference_accuracy",
    ("sftdpo_generation", "exact_match"): "task_accuracy",
    ("sftdpo_generation", "correct"): "correct",
    ("sftdpo_generation", "polite"): "polite",
    ("sftdpo_perplexity", "perplexity"): "perplexity",
}


def _continuation(tokenizer, prompt, response, context: str) -> str:
    """The response exactly as it follows the rendered prompt (end-of-turn token included)."""
    full = render(tokenizer, prompt, response)
    return full[len(context) :] if full.startswith(context) else last_content(response)


def task_documents(tokenizer, eval_pairs: list[dict], sft_heldout: list[dict]) -> dict[str, list[dict]]:
    """Documents of each task, rendered for this model."""
    preference, generation, seen = [], [], set()
    for pair in eval_pairs:
        context = render(tokenizer, pair["prompt"])
        preference.append(
            {
                "context": context,
                "chosen": _continuation(tokenizer, pair["prompt"], pair["chosen"], context),
                "rejected": _continuation(tokenizer, pair["prompt"], pair["rejected"], context),
            }
        )
        if context not in seen:
            seen.add(context)
            generation.append(
                {"context": context, "question": last_content(pair["prompt"]), "chosen": last_content(pair["chosen"])}
            )
    perplexity = []
    for row in sft_heldout:
        prompt, completion = (
            (row["messages"][:-1], row["messages"][-1:]) if "messages" in row else (row["prompt"], row["completion"])
        )
        context = render(tokenizer, prompt)
        perplexity.append({"context": context, "completion": _continuation(tokenizer, prompt, completion, context)})
    return {"sftdpo_preference": preference, "sftdpo_generation": generation, "sftdpo_perplexity": perplexity}


def evaluate_model(params: Params, model: Path, eval_pairs: Path, sft_heldout: Path, out: Path) -> dict:
    """Evaluate one model with lm-eval on the held-out data; write `{metric: value}`.

    Args:
        params: the pipeline's params
        model: a model folder
        eval_pairs: prepared held-out pairs
        sft_heldout: held-out SFT rows
        out: the model's metrics, JSON `{metric: value}`
    """
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml  # resolves include: and !function like the CLI

    tokenizer = load_tokenizer(str(model), params.model)
    documents = task_documents(tokenizer, load_records(eval_pairs), load_records(sft_heldout))
    with tempfile.TemporaryDirectory() as scratch:
        specs = []
        for task in params.eval.tasks:
            data_file = Path(scratch) / f"{task}.jsonl"
            write_records(data_file, documents[task])
            spec = load_yaml(TASKS_DIR / f"{task}.yaml")
            spec["dataset_kwargs"] = {"data_files": {"test": str(data_file)}}
            if task == "sftdpo_generation":
                spec["generation_kwargs"] = {
                    "until": [tokenizer.eos_token],
                    "do_sample": False,
                    "max_gen_toks": params.eval.max_new_tokens,
                }
            specs.append(spec)
        results = lm_eval.simple_evaluate(
            model="hf",
            model_args={
                "pretrained": str(model),
                "dtype": params.model.dtype,
                "trust_remote_code": params.model.trust_remote_code,
            },
            tasks=specs,
            task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
            batch_size=params.eval.batch_size,
            limit=params.eval.limit,
            device="cuda" if has_cuda() else "cpu",
            log_samples=False,
        )["results"]
    scores = {
        name: results[task][f"{metric},none"]
        for (task, metric), name in REPORTED.items()
        if task in results and f"{metric},none" in results[task]
    }
    write_json(out, scores)
    print(f"{model}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))
    return scores


if __name__ == "__main__":
    stage_main(evaluate_model)
