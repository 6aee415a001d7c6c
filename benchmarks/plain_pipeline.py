"""What a user would write instead of the pipeline: the demo's work as one plain script in one process.

Only transformers, TRL, peft, datasets and lm-eval, with the demo's settings read from params.yaml:
1. SFT of the base model (SFTTrainer, prompt/completion rows: the loss on the completion only);
2. per round (`dpo.rounds`): draw `onpolicy.prompts.per_round` prompts, sample `samples_per_prompt` answers each
   from the current policy, score them with the task's reward, pair the best and worst answer of each prompt
   (`onpolicy.pairs.min_gap`), train DPOTrainer with a LoRA adapter against the SFT model as its reference
   (computed on the fly), merge the adapter;
3. lm-eval on the SFT policy and each round's policy: the project's task YAMLs (preference accuracy, task accuracy
   from greedy answers, perplexity) on documents this script renders with the model's chat template;
4. save the final merged model.

It starts from the pipeline's inputs (the `base` model folder and the `prepare` stage's split) and uses the
project's code for one thing only, the built-in task's reward (`tasks/lib/builtin_task.py`): the task a user
brings. Not done here and done by the pipeline: KL and win rates in eval, the collapse guard and gate, lineage,
the dashboard. Used by `make bench-peer` as the peer of `dvc repro`.

    python benchmarks/plain_pipeline.py --project PATH --out DIR
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import tempfile
import time
from pathlib import Path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def prompt_completion(row: dict) -> dict:
    messages = row["messages"]
    return {"prompt": messages[:-1], "completion": messages[-1:]}


def render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def continuation(tokenizer, prompt: list[dict], answer: list[dict]) -> str:
    context = render(tokenizer, prompt, True)
    full = render(tokenizer, prompt + answer, False)
    return full[len(context) :] if full.startswith(context) else answer[-1]["content"]


def train_settings(section: dict, out: Path) -> dict:
    train = section["train"]
    return {
        "output_dir": str(out),
        "learning_rate": train["learning_rate"],
        "num_train_epochs": train["epochs"],
        "per_device_train_batch_size": train["batch_size"],
        "gradient_accumulation_steps": train["gradient_accumulation"],
        "warmup_steps": train["warmup_ratio"],
        "lr_scheduler_type": train["scheduler"],
        "seed": train["seed"],
        "use_cpu": True,
        "report_to": [],
        "save_strategy": "no",
        "logging_steps": 10,
    }


def sft(params: dict, base: Path, rows: list[dict], scratch: Path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(base)
    config = SFTConfig(max_length=params["sft"]["max_length"], **train_settings(params["sft"], scratch / "sft"))
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(base),
        args=config,
        train_dataset=Dataset.from_list([prompt_completion(row) for row in rows]),
        processing_class=tokenizer,
    )
    trainer.train()
    return trainer.model, tokenizer


def sample(model, tokenizer, prompts: list[dict], settings: dict, seed: int) -> list[list[str]]:
    """`samples_per_prompt` sampled answers per prompt, prompts batched so a batch holds `batch_size` answers."""
    import torch

    tokenizer.padding_side = "left"
    per_batch = max(1, settings["batch_size"] // settings["samples_per_prompt"])
    answers = []
    model.eval()
    for index, start in enumerate(range(0, len(prompts), per_batch)):
        texts = [render(tokenizer, row["prompt"], True) for row in prompts[start : start + per_batch]]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        torch.manual_seed(seed + index)
        with torch.no_grad():
            output = model.generate(
                **inputs,
                do_sample=True,
                temperature=settings["temperature"],
                top_p=settings["top_p"],
                max_new_tokens=settings["max_new_tokens"],
                num_return_sequences=settings["samples_per_prompt"],
                pad_token_id=tokenizer.pad_token_id,
            )
        decoded = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        count = settings["samples_per_prompt"]
        answers.extend(decoded[i : i + count] for i in range(0, len(decoded), count))
    return answers


def best_worst_pairs(prompts: list[dict], answers: list[list[str]], judge: dict, min_gap: float) -> list[dict]:
    from tasks.lib.builtin_task import verify

    pairs = []
    for row, group in zip(prompts, answers, strict=True):
        question = row["prompt"][-1]["content"]
        scored = []
        for answer in group:
            verdict = verify(question, answer)
            if verdict is None:
                score = 0.0
            else:
                score = judge["correct_weight"] * verdict.correct + judge["polite_weight"] * verdict.polite
            scored.append((score, answer))
        scored.sort(key=lambda item: item[0])
        (low, worst), (high, best) = scored[0], scored[-1]
        if high - low >= min_gap:
            chosen, rejected = [{"role": "assistant", "content": best}], [{"role": "assistant", "content": worst}]
            pairs.append({"prompt": row["prompt"], "chosen": chosen, "rejected": rejected})
    return pairs


def dpo(params: dict, policy, reference, tokenizer, pairs: list[dict], scratch: Path):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    section = params["dpo"]
    loss, lora = section["loss"], section["lora"]
    config = DPOConfig(
        beta=loss["beta"],
        loss_type=loss["types"],
        max_length=section["sequence"]["max_length"],
        truncation_mode=section["sequence"]["truncation_mode"],
        **train_settings(section, scratch),
    )
    adapter = LoraConfig(
        r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], target_modules=lora["target_modules"],
        task_type="CAUSAL_LM",
    )  # fmt: skip
    tokenizer.padding_side = "right"
    trainer = DPOTrainer(
        model=policy,
        ref_model=reference,
        args=config,
        train_dataset=Dataset.from_list(pairs),
        processing_class=tokenizer,
        peft_config=adapter,
    )
    trainer.train()
    return trainer.model.merge_and_unload()


def documents(tokenizer, eval_pairs: list[dict], heldout: list[dict]) -> dict[str, list[dict]]:
    preference, generation, perplexity = [], [], []
    for pair in eval_pairs:
        context = render(tokenizer, pair["prompt"], True)
        chosen, rejected = (continuation(tokenizer, pair["prompt"], pair[key]) for key in ("chosen", "rejected"))
        preference.append({"context": context, "chosen": chosen, "rejected": rejected})
        generation.append(
            {
                "context": context,
                "question": pair["prompt"][-1]["content"],
                "chosen": pair["chosen"][-1]["content"],
                "prompt_json": json.dumps(pair["prompt"]),
            }
        )
    for row in map(prompt_completion, heldout):
        context = render(tokenizer, row["prompt"], True)
        perplexity.append({"context": context, "completion": continuation(tokenizer, row["prompt"], row["completion"])})
    return {"sftdpo_preference": preference, "sftdpo_generation": generation, "sftdpo_perplexity": perplexity}


def evaluate(params: dict, project: Path, model, tokenizer, docs: dict) -> dict[str, float]:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    task_dir = project / "tasks" / "lm_eval_tasks"
    tokenizer.padding_side = "left"
    specs = []
    with tempfile.TemporaryDirectory() as scratch:
        for task, rows in docs.items():
            data = Path(scratch) / f"{task}.jsonl"
            data.write_text("".join(json.dumps(row) + "\n" for row in rows))
            spec = load_yaml(task_dir / f"{task}.yaml")
            spec["dataset_kwargs"] = {"data_files": {"test": str(data)}}
            if task == "sftdpo_generation":
                spec["generation_kwargs"] = {
                    "until": [tokenizer.eos_token],
                    "do_sample": False,
                    "max_gen_toks": params["eval"]["max_new_tokens"],
                }
            specs.append(spec)
        lm = HFLM(pretrained=model.eval(), tokenizer=tokenizer, batch_size=params["eval"]["batch_size"])
        results = lm_eval.simple_evaluate(
            model=lm, tasks=specs, task_manager=TaskManager(include_path=str(task_dir), include_defaults=False)
        )["results"]
    return {
        "preference_accuracy": results["sftdpo_preference"]["acc,none"],
        "task_accuracy": results["sftdpo_generation"]["exact_match,none"],
        "perplexity": results["sftdpo_perplexity"]["perplexity,none"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, required=True, help="a clone where `base` and `prepare` have run")
    parser.add_argument("--out", type=Path, required=True, help="folder for the final model and its metrics")
    args = parser.parse_args()
    started = time.perf_counter()
    sys.path.insert(0, str(args.project))  # the built-in task's reward
    import yaml

    project = args.project
    params = yaml.safe_load((project / "params.yaml").read_text())
    prepared = project / "data" / "prepared"
    eval_docs_source = read_jsonl(prepared / "eval_pairs.jsonl"), read_jsonl(prepared / "sft_heldout.jsonl")
    pool = read_jsonl(project / params["onpolicy"]["prompts"]["pool"])
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        policy, tokenizer = sft(params, project / "models" / "base", read_jsonl(prepared / "sft_train.jsonl"), scratch)
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
        docs = documents(tokenizer, *eval_docs_source)
        metrics = {"sft": evaluate(params, project, policy, tokenizer, docs)}
        onpolicy = params["onpolicy"]
        for index, name in enumerate(params["dpo"]["rounds"], start=1):
            prompts = random.Random(onpolicy["prompts"]["seed"] + index).sample(pool, onpolicy["prompts"]["per_round"])
            answers = sample(policy, tokenizer, prompts, onpolicy["generate"], onpolicy["generate"]["seed"])
            pairs = best_worst_pairs(prompts, answers, onpolicy["judge"], onpolicy["pairs"]["min_gap"])
            policy = dpo(params, policy, reference, tokenizer, pairs, scratch / name)
            metrics[name] = {"pairs": len(pairs), **evaluate(params, project, policy, tokenizer, docs)}
    policy.save_pretrained(args.out / "model")
    tokenizer.save_pretrained(args.out / "model")
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))
    print(f"plain pipeline: {time.perf_counter() - started:.1f} s in this process")


if __name__ == "__main__":
    main()
