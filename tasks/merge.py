"""Stage `merge`: the last promoted round's policy as a standalone Hugging Face model folder.

The final round's policy folder is what the promotion gate kept: the last round it promoted
(or the SFT snapshot if it promoted none). When that round trained a LoRA adapter, the adapter
is merged into the round's starting policy here (and the merged logits are checked against the
unmerged adapter model). The folder
holds safetensors weights, the tokenizer, a generation config and a model card with lineage
(base, data hashes, params); `AutoModelForCausalLM.from_pretrained` loads it with no project
code, and no absolute path of the build machine is left in it.
"""

from __future__ import annotations

from pathlib import Path

from tasks.lib.files import atomic_path, read_json, write_json
from tasks.lib.hashing import directory_digest, source_digest
from tasks.lib.policies import PROMOTION_FILE, adapter_of, merge_adapter, scrub_saved_configs, trained_round
from tasks.lib.records import hub_source
from tasks.lib.schema import Params
from tasks.lib.stage import stage_main
from tasks.lib.timing import phase

LOGIT_TOLERANCE = 1e-4


def max_logit_difference(merged, base: Path, adapter: Path, tokenizer, texts: list[str]) -> float:
    """Largest |logit| difference between the merged model and base + unmerged adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=merged.dtype), adapter)
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = unmerged(**batch).logits
        actual = merged(**batch).logits
    mask = batch["attention_mask"].bool()
    return (expected - actual).abs()[mask].max().item()


def hub_lines(lineage: dict) -> str:
    """Model-card lines naming the hub datasets the data was fetched from, pinned revision and revision loaded."""
    return "".join(
        f"- `{path}`: hub dataset `{source['id']}` split `{source['split']}`"
        + (f" subset `{source['subset']}`" if source["subset"] else "")
        + f", revision `{source['loaded_revision'] or source['revision'] or 'default branch'}`\n"
        for path, source in lineage.get("hub_datasets", {}).items()
    )


def model_card(params: Params, lineage: dict) -> str:
    rounds = "\n".join(
        f"| {name} | {row['previous']} | {row['reference']} | {_decision(row)} |"
        for name, row in lineage["rounds"].items()
    )
    loss = params.dpo.loss
    sampling = params.onpolicy.generate
    judge, pairs, prompts = params.onpolicy.judge, params.onpolicy.pairs, params.onpolicy.prompts
    data_sha = {name: digest[:12] for name, digest in lineage["data"].items()}
    return f"""---
library_name: transformers
tags: [dpo, sft-dpo]
---
# sft-dpo model

Aligned with iterative Direct Preference Optimization by the sft-dpo pipeline: SFT, a frozen
reference snapshot of the SFT policy, then {len(params.dpo.rounds)} on-policy DPO round(s) (sample from the
current policy, judge, pair, train, gate); this is the policy of round **{lineage["source"]}**, the last one the
promotion gate accepted, merged into a standalone model.

- base: `{params.model.base}`
- SFT: {params.sft.method}, data `{params.data.sft}` (sha256 `{data_sha[params.data.sft]}`)
{hub_lines(lineage)}- reference snapshot sha256: `{lineage["reference_sha256"][:12]}`
- prompts: `{prompts.pool}` (sha256 `{data_sha[prompts.pool]}`), {prompts.per_round} per round
- sampling: {sampling.samples_per_prompt} per prompt, temperature {sampling.temperature}, top_p {sampling.top_p};
  judge `{judge.kind}`; pairs `{pairs.strategy}` (min gap {pairs.min_gap})
- DPO: {params.dpo.method}, loss {loss.types} weights {loss.weights}, beta {loss.beta},
  label smoothing {loss.label_smoothing}, learning rate {params.dpo.train.learning_rate},
  epochs {params.dpo.train.epochs}

| round | starts from | reference | promoted |
| --- | --- | --- | --- |
{rounds}

Load it with `AutoModelForCausalLM.from_pretrained(<this folder>)`; no project code is needed.
"""


def _decision(row: dict) -> str:
    return "yes" if row["promoted"] else "no: " + "; ".join(row["reasons"])


def round_decisions(params: Params, policies: Path) -> dict[str, dict]:
    decisions = {}
    for name, spec in params.dpo.rounds.items():
        promotion = read_json(policies / name / PROMOTION_FILE)
        decisions[name] = {
            "previous": spec.previous,
            "reference": spec.reference_used,
            "promoted": promotion["promoted"],
            "reasons": promotion["reasons"],
        }
    return decisions


def export_final(params: Params, policies: Path, reference_metrics: Path, out: Path, metrics: Path) -> dict:
    """Export the last promoted round's policy as a standalone model folder with a model card.

    Args:
        params: the pipeline's params
        policies: folder of the sft snapshot and the rounds' policies
        reference_metrics: the reference stage's metrics (the snapshot's sha256)
        out: the standalone merged model
        metrics: the stage's metrics
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    policy = policies / params.dpo.final_round
    source = trained_round(policy)
    with phase("load"):
        tokenizer = AutoTokenizer.from_pretrained(policy)
    adapter = adapter_of(policy)
    summary: dict = {"round": source, "merged_adapter": adapter is not None}
    if adapter is not None:
        start = policies / params.dpo.rounds[source].previous
        model = merge_adapter(start, adapter, params.merge.dtype)
        texts = [tokenizer.eos_token.join(["merge check", "a b c"]), "The answer is"]
        summary["max_logit_difference"] = max_logit_difference(model, start, adapter, tokenizer, texts)
        if summary["max_logit_difference"] > LOGIT_TOLERANCE:
            raise RuntimeError(f"merged logits differ from the adapter model's by {summary['max_logit_difference']}")
    else:
        import torch

        with phase("load"):
            model = AutoModelForCausalLM.from_pretrained(policy, dtype=getattr(torch, params.merge.dtype))
    data_files = [params.data.sft, params.data.eval_pairs, params.onpolicy.prompts.pool]
    hubs = {name: hub_source(name) for name in data_files}
    lineage = {
        "base": params.model.base,
        "source": source,
        "reference_sha256": read_json(reference_metrics)["sha256"],
        "data": {name: source_digest(name) for name in data_files},
        "hub_datasets": {name: source for name, source in hubs.items() if source is not None},
        "rounds": round_decisions(params, policies),
        "params": params.model_dump(mode="json"),
    }
    with atomic_path(out) as scratch, phase("save"):
        model.save_pretrained(scratch, max_shard_size=params.merge.max_shard_size)
        tokenizer.save_pretrained(scratch)
        (scratch / "README.md").write_text(model_card(params, lineage), encoding="utf-8")
        write_json(scratch / "lineage.json", lineage)
        scrub_saved_configs(scratch)
    summary["sha256"] = directory_digest(out)
    write_json(metrics, summary)
    print(f"merge: {summary['round']} -> {out} (sha256 {summary['sha256'][:12]})")
    return summary


if __name__ == "__main__":
    stage_main(export_final)
