"""Benchmark: the whole pipeline on the real Qwen3 tokenizer and chat template, with a random-init tiny Qwen3 model.

A test-sized `Qwen3ForCausalLM` (1 layer, hidden 32, Qwen3's 151,669-token vocabulary, 4.9M parameters, random
weights) is saved with the shared Qwen3 tokenizer (official template: hybrid thinking, no generation markers) as
a local model folder, and `model.base` points at it. One on-policy round on the built-in task (16 prompts,
2 samples each) plus 16 of the shipped offline pairs dropped in as human pairs: a random model's samples all tie
under the rule judge, and the pairs stage refuses a round with no pairs. Prints how SFT masked the loss, the
stages' outcome and the eval table; it checks that the template path works end to end, not that the model learns.

    .venv/bin/python benchmarks/qwen3_template.py [--real ../shared/real]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from onpolicy import clone, reproduce  # noqa: E402  (the other benchmark's clean-clone helpers)

ROOT = Path(__file__).resolve().parents[1]


def tiny_qwen3(tokenizer_folder: Path, out: Path) -> int:
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen3ForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sum(parameter.numel() for parameter in model.parameters())


def configure(project: Path, base: Path) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["model"]["base"] = str(base)
    params["sft"]["train"]["epochs"] = 1
    params["onpolicy"]["prompts"]["per_round"] = 16
    params["onpolicy"]["generate"].update(samples_per_prompt=2, max_new_tokens=8)
    params["dpo"]["rounds"] = {"r1": params["dpo"]["rounds"]["r1"]}
    params["eval"].update(limit=8, max_new_tokens=8, kl_samples=2)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    offline = (project / "data/builtin/pairs_r1.jsonl").read_text().splitlines()[:16]
    (project / "data/incoming/r1.jsonl").write_text("\n".join(offline) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = Path(os.environ.get("SFT_DPO_REAL_ARTIFACTS", ROOT.parent / "shared" / "real"))
    parser.add_argument("--real", type=Path, default=default)
    args = parser.parse_args()
    tokenizer = args.real / "tokenizers" / "qwen3"
    if not tokenizer.is_dir():
        sys.exit(f"no Qwen3 tokenizer under {args.real} (set SFT_DPO_REAL_ARTIFACTS)")
    with tempfile.TemporaryDirectory(prefix="sftdpo-bench-qwen3-") as scratch:
        scratch = Path(scratch)
        parameters = tiny_qwen3(tokenizer, scratch / "tiny-qwen3")
        project = clone(scratch / "project", scratch / "cache")
        configure(project, scratch / "tiny-qwen3")
        seconds = reproduce(project)
        sft = json.loads((project / "metrics/sft.json").read_text())
        scores = json.loads((project / "metrics/eval.json").read_text())
        data = json.loads((project / "metrics/data.json").read_text())
    print(f"random-init Qwen3ForCausalLM, {parameters:,} parameters, Qwen3 tokenizer; dvc repro {seconds:.0f} s")
    print(f"SFT loss mask: {sft['loss_mask']}; loss {sft['train_loss_first']:.3f} -> {sft['train_loss_last']:.3f}")
    print(f"data: sft {data['sft']['kept']} rows, tokens mean {data['sft']['tokens_mean']} (Qwen3 template)")
    for name, row in scores.items():
        print(f"{name}: " + ", ".join(f"{key} {value:.4g}" for key, value in sorted(row.items())))


if __name__ == "__main__":
    main()
