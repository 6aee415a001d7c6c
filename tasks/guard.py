"""Stage `guard@<round>`: the collapse guard of a round's trained candidate, on the held-out pairs.

Two checks, after training and apart from it (so a new held-out set re-runs this stage and evaluation, never
DPO): the held-out chosen answers' log-prob drift (a DPO round against its reference, whose held-out log-probs
are computed here by TRL's precompute pass; a reference-free round against the policy it started from), and
greedy sanity generations (non-empty, not repeating itself). It also reports TRL's held-out DPO loss, reward
accuracy and margin. A round past the guard's thresholds is marked `failed-quality`; the gate refuses it
(`dpo.gate.require_guard_ok`), and `dpo.guard.fail_run` stops the run instead.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

from tasks.lib.chat import adds_special_tokens, render
from tasks.lib.errors import QualityGateFailed
from tasks.lib.files import load_records, load_splits, write_json, write_records
from tasks.lib.policies import load_model, load_tokenizer
from tasks.lib.schema import SFT_POLICY, GuardParams, Params
from tasks.lib.stage import stage_main
from tasks.lib.training import (
    dpo_loss_arguments,
    dpo_sequence_config,
    pairs_only,
    reference_free_trainer,
    reference_logps_datasets,
    stored_reference_trainer_class,
    training_arguments,
)


def distinct_trigram_ratio(tokens: list[int]) -> float:
    trigrams = [tuple(tokens[i : i + 3]) for i in range(len(tokens) - 2)]
    return len(set(trigrams)) / len(trigrams) if trigrams else 1.0


def sanity_generations(model, tokenizer, prompts: list, guard: GuardParams) -> list[dict]:
    """Greedy answers to held-out prompts, each judged non-degenerate or not."""
    import torch

    results = []
    model.eval()
    for prompt in prompts:
        text = render(tokenizer, prompt)
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=adds_special_tokens(prompt)).to(model.device)
        with torch.no_grad():
            output = model.generate(
                **inputs,
                max_new_tokens=guard.sanity_max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        new_tokens = output[0, inputs["input_ids"].shape[1] :].tolist()
        text = tokenizer.decode(new_tokens, skip_special_tokens=True)
        ratio = distinct_trigram_ratio(new_tokens)
        results.append(
            {
                "response": text,
                "distinct_trigrams": ratio,
                "passed": bool(text.strip()) and ratio >= guard.min_distinct_trigrams,
            }
        )
    return results


def guard_verdict(guard: GuardParams, drift: float, pass_rate: float) -> list[str]:
    reasons = []
    if drift < -guard.max_chosen_logp_drop:
        reasons.append(
            f"held-out chosen log-prob fell by {-drift:.2f} nats (dpo.guard.max_chosen_logp_drop: "
            f"{guard.max_chosen_logp_drop})"
        )
    if pass_rate < guard.min_sanity_pass_rate:
        reasons.append(
            f"only {pass_rate:.0%} of sanity generations passed (dpo.guard.min_sanity_pass_rate: "
            f"{guard.min_sanity_pass_rate:.0%})"
        )
    return reasons


def reference_accuracy(heldout) -> float:
    """Held-out preference accuracy of the reference itself (chosen strictly more likely)."""
    pairs = zip(heldout["ref_chosen_logps"], heldout["ref_rejected_logps"], strict=True)
    return statistics.fmean(float(chosen > rejected) for chosen, rejected in pairs)


def dpo_heldout(params: Params, heldout, candidate, tokenizer, scratch: Path) -> dict:
    """TRL's DPO evaluation of the candidate on the held-out pairs (with their reference log-probs)."""
    config = dpo_sequence_config(
        params,
        scratch,
        precompute_ref_log_probs=True,
        per_device_eval_batch_size=params.reference.batch_size,
        **dpo_loss_arguments(params),
    )
    trainer = stored_reference_trainer_class()(
        model=candidate,
        ref_model=None,
        args=config,
        train_dataset=heldout,
        eval_dataset=heldout,
        processing_class=tokenizer,
    )
    evaluation = trainer.evaluate()
    return {
        **evaluation,
        "drift": evaluation["eval_logps/chosen"] - statistics.fmean(heldout["ref_chosen_logps"]),
        "drift_against": "reference (sum per sequence)",
        "reference_accuracy": reference_accuracy(heldout),
        "start_margin": None,
    }


def reference_free_heldout(params: Params, objective: str, candidate, tokenizer, start: Path, eval_pairs: Path,
                           scratch: Path) -> dict:  # fmt: skip
    """The reference-free trainer's evaluation of the candidate and of the policy it started from: with no
    reference, the drift is measured against the starting policy, in the trainer's own units."""
    pairs = scratch / "heldout.jsonl"
    write_records(pairs, pairs_only(eval_pairs))
    heldout = load_splits({"eval": pairs})["eval"]
    tracking = params.tracking.model_copy(update={"report_to": []})
    training = {**training_arguments(params.dpo.train, scratch, None, tracking), "eval_strategy": "no"}

    def evaluate(model) -> dict:
        return reference_free_trainer(
            objective, params, training, model=model, train_dataset=heldout, eval_dataset=heldout,
            processing_class=tokenizer, peft_config=None,
        ).evaluate()  # fmt: skip

    before, evaluation = evaluate(load_model(str(start), params.model)), evaluate(candidate)
    return {
        **evaluation,
        "drift": evaluation["eval_logps/chosen"] - before["eval_logps/chosen"],
        "drift_against": "the starting policy (mean per token)",
        "reference_accuracy": None,
        "start_margin": before["eval_rewards/margins"],
    }


def guard_round(
    params: Params, round_name: str, candidate: Path, sft_policy: Path, previous_policy: Path, eval_pairs: Path,
    metrics: Path,
) -> dict:  # fmt: skip
    """Run the collapse guard on round `round_name`'s candidate and write its verdict.

    Args:
        params: the pipeline's params
        round_name: the round, a key of `dpo.rounds`
        candidate: the round's trained candidate policy (from dpo@<round>)
        sft_policy: the frozen SFT snapshot (the reference when the round's `reference` is `sft`)
        previous_policy: the policy the round started from (its reference when `reference` names it; a
            reference-free round's drift is measured against it)
        eval_pairs: prepared held-out pairs
        metrics: the verdict (held-out DPO metrics, drift, sanity generations, quality)
    """
    spec = params.dpo.rounds[round_name]
    if spec.objective == "dpo":  # the reference's log-probs first, so one model is in memory at a time
        reference = sft_policy if spec.reference == SFT_POLICY else previous_policy
        heldout = reference_logps_datasets(params, reference, {"train": eval_pairs})["train"]
    model, tokenizer = load_model(str(candidate), params.model), load_tokenizer(str(candidate), params.model)
    with tempfile.TemporaryDirectory() as scratch:
        if spec.objective == "dpo":
            result = dpo_heldout(params, heldout, model, tokenizer, Path(scratch))
        else:
            result = reference_free_heldout(params, spec.objective, model, tokenizer, previous_policy, eval_pairs,
                                            Path(scratch))  # fmt: skip
    prompts = [row["prompt"] for row in load_records(eval_pairs)][: params.dpo.guard.sanity_prompts]
    sanity = sanity_generations(model, tokenizer, prompts, params.dpo.guard)
    pass_rate = sum(item["passed"] for item in sanity) / len(sanity)
    reasons = guard_verdict(params.dpo.guard, result["drift"], pass_rate)
    summary = {
        "round": round_name,
        "objective": spec.objective,
        "reference": spec.reference_used,
        "eval_loss": result["eval_loss"],
        "eval_reward_accuracy": result["eval_rewards/accuracies"],
        "eval_reward_margin": result["eval_rewards/margins"],
        "start_eval_reward_margin": result["start_margin"],
        "reference_eval_reward_accuracy": result["reference_accuracy"],
        "chosen_logp_drift": result["drift"],
        "chosen_logp_drift_against": result["drift_against"],
        "sanity_pass_rate": pass_rate,
        "sanity_examples": sanity[:3],
        "quality": "failed-quality" if reasons else "ok",
        "guard_reasons": reasons,
    }
    write_json(metrics, summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "sanity_examples"}, indent=2))
    if reasons:
        shout(round_name, reasons)
        if params.dpo.guard.fail_run:
            raise QualityGateFailed(f"round {round_name} failed the collapse guard (dpo.guard.fail_run: true)")
    return summary


def shout(name: str, reasons: list[str]) -> None:
    bar = "!" * 78
    print(
        f"\n{bar}\nCOLLAPSE GUARD: round {name} is FAILED-QUALITY\n"
        + "\n".join(f"  - {r}" for r in reasons)
        + "\nLower dpo.train.learning_rate, raise dpo.loss.beta, or add an sft term to dpo.loss.types.\n"
        + f"{bar}\n",
        file=sys.stderr,
    )


if __name__ == "__main__":
    stage_main(guard_round)
