"""Stage `reference`: the frozen reference policy, a standalone snapshot of the SFT policy.

A LoRA SFT adapter is merged into the base; a full fine-tune is re-saved as is. The snapshot's
content hash is recorded, so every DPO round and the exported model can name the exact reference.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tasks.common import atomic_path, resolve_base, save_policy, stage_params, write_json
from tasks.config import Params
from tasks.merge import directory_digest, merge_adapter, scrub_local_paths


def snapshot_sft(params: Params, base: Path, sft: Path, out: Path, metrics: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(sft)
    if (sft / "adapter_config.json").exists():
        name_or_path, _ = resolve_base(base)
        model = merge_adapter(name_or_path, sft, params.merge.dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(sft, dtype=getattr(torch, params.merge.dtype))
    with atomic_path(out) as scratch:
        save_policy(model, tokenizer, scratch)
        scrub_local_paths(scratch)
    summary = {"sha256": directory_digest(out), "parameters": sum(p.numel() for p in model.parameters())}
    write_json(metrics, summary)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--sft", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args()
    params = stage_params(args.params)
    summary = snapshot_sft(params, args.base, args.sft, args.out, args.metrics)
    print(f"reference snapshot {args.out}: sha256 {summary['sha256'][:12]}, {summary['parameters']:,} parameters")


if __name__ == "__main__":
    main()
