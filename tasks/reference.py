"""Stage `reference`: the frozen reference policy, a standalone snapshot of the SFT policy.

A LoRA SFT adapter is merged into the base; a full fine-tune is re-saved as is. The snapshot's
content hash is recorded, so every DPO round and the exported model can name the exact reference.
"""

from __future__ import annotations

from pathlib import Path

from tasks.lib.files import atomic_path, write_json
from tasks.lib.hashing import directory_digest
from tasks.lib.policies import merge_adapter, resolve_base, save_policy, scrub_saved_configs
from tasks.lib.schema import Params
from tasks.lib.stage import stage_main
from tasks.lib.timing import phase


def snapshot_sft(params: Params, base: Path, sft: Path, out: Path, metrics: Path) -> dict:
    """Write the frozen reference: the SFT policy as a standalone model folder, with its content hash.

    Args:
        params: the pipeline's params
        base: the base folder (a LoRA SFT adapter is merged into it)
        sft: the SFT stage's policy (full weights or an adapter)
        out: the frozen reference snapshot
        metrics: the stage's metrics (snapshot sha256, parameter count)
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with phase("load"):
        tokenizer = AutoTokenizer.from_pretrained(sft)
        if (sft / "adapter_config.json").exists():
            name_or_path, _ = resolve_base(base)
            model = merge_adapter(name_or_path, sft, params.merge.dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(sft, dtype=getattr(torch, params.merge.dtype))
    with atomic_path(out) as scratch:
        save_policy(model, tokenizer, scratch)
        scrub_saved_configs(scratch)
    summary = {"sha256": directory_digest(out), "parameters": sum(p.numel() for p in model.parameters())}
    write_json(metrics, summary)
    print(f"reference snapshot {out}: sha256 {summary['sha256'][:12]}, {summary['parameters']:,} parameters")
    return summary


if __name__ == "__main__":
    stage_main(snapshot_sft)
