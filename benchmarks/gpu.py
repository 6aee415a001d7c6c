"""Benchmark for a GPU machine: the project's own stages at a real model size, bf16 + sdpa.

A random-init Qwen3-0.6B shape (28 layers, hidden 1024, GQA 16/8 heads of 128, Qwen3's vocabulary from its real
tokenizer; random weights are fine for speed and memory) is the base. The stages run in this process through the
same `stage_main` entry as their command lines, on the built-in task's data rendered with Qwen3's template:
`base`, `prepare`, `sft` (LoRA on every projection), `reference_logps` and one DPO round (LoRA), then the same round
as 4-bit QLoRA when bitsandbytes imports, then the transformers backend's sampling. For each: wall seconds, tokens
processed, tokens/s, MFU and peak GPU memory.

MFU = model FLOPs / seconds / the chip's dense bf16 peak. Model FLOPs per token: LoRA training 4N (forward 2N, the
backward's input gradients 2N; frozen weights need no weight gradients, the adapters' are negligible), a forward
pass 2N; N counts every parameter once (the tied embedding as the output matmul); attention's own FLOPs (a few % at
512 tokens) are left out, so MFU is slightly under-stated. Tokens are the real (unpadded) tokens of the rows the
steps consumed. Timing includes the trainer's own overhead (data collation, logging), as a user's stage would.

    python benchmarks/gpu.py --tokenizer ../shared/real/tokenizers/qwen3 --out /tmp/gpu-bench   # make bench-gpu
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
import traceback
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}
"""Dense bf16 tensor-core peaks from NVIDIA's data sheets (SXM parts), by name fragment."""
STEPS = 30
BATCH = 8
MAX_LENGTH = 512


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def qwen3_0_6b(tokenizer_folder: Path, out: Path, smoke: bool) -> int:
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=151936, hidden_size=64 if smoke else 1024, intermediate_size=128 if smoke else 3072,
        num_hidden_layers=2 if smoke else 28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=40960,
        tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    count = sum(parameter.numel() for parameter in model.parameters())
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return count


def params_for(work: Path, base: Path, steps: int) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": projections}
    train = {"max_steps": steps, "batch_size": BATCH, "gradient_accumulation": 1, "warmup_ratio": 0.0,
             "logging_steps": 10, "save_steps": 10_000, "bf16": True}  # fmt: skip
    params["model"].update(base=str(base), dtype="bfloat16", attn_implementation="sdpa")
    params["data"].update(sft="data/builtin/sft.jsonl", eval_pairs="data/builtin/eval_pairs.jsonl")
    params["sft"].update(method="lora", lora=lora, max_length=MAX_LENGTH)
    params["sft"]["train"].update(train, learning_rate=1e-4)
    params["dpo"].update(method="lora", lora=lora)
    params["dpo"]["sequence"]["max_length"] = MAX_LENGTH
    params["dpo"]["train"].update(train, learning_rate=5e-6)
    params["dpo"]["rounds"] = {"r1": {"previous": "sft", "reference": "sft"}}
    params["dpo"]["guard"]["sanity_prompts"] = 8
    params["tracking"]["report_to"] = []
    path = work / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def timed_stage(work_function, argv: list[str]) -> tuple[float, float]:
    """Run a stage in this process as its command line would; (seconds, peak GPU GiB)."""

    from tasks.lib.stage import stage_main

    synchronize()
    reset_peak()
    started = time.perf_counter()
    stage_main(work_function, argv)
    synchronize()
    return time.perf_counter() - started, peak_gib()


def row_tokens(path: Path, tokenizer, pairs: bool) -> float:
    """Mean real tokens per training row as the trainer sees it (pairs: chosen and rejected sequences)."""
    from tasks.lib.chat import render
    from tasks.lib.files import load_records

    totals = []
    for row in load_records(path):
        if pairs:
            texts = [render(tokenizer, row["prompt"]) + row[side] if isinstance(row[side], str)
                     else tokenizer.apply_chat_template(row["prompt"] + row[side], tokenize=False)
                     for side in ("chosen", "rejected")]  # fmt: skip
        elif "messages" in row:
            texts = [tokenizer.apply_chat_template(row["messages"], tokenize=False)]
        else:
            texts = [render(tokenizer, row["prompt"]) + (row["completion"] if isinstance(row["completion"], str)
                     else row["completion"][0]["content"])]  # fmt: skip
        totals.append(
            sum(min(len(tokenizer(text, add_special_tokens=False)["input_ids"]), MAX_LENGTH) for text in texts)
        )
    return sum(totals) / len(totals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", type=Path, required=True, help="folder of Qwen3's tokenizer")
    parser.add_argument("--out", type=Path, required=True, help="scratch folder; results.json is written there")
    parser.add_argument("--smoke", action="store_true", help="a 2-layer model and 2 steps: check the script anywhere")
    args = parser.parse_args()
    steps = 2 if args.smoke else STEPS

    import torch
    import transformers

    from tasks.base import build_base
    from tasks.dpo import train_round
    from tasks.lib.chat import render
    from tasks.lib.files import load_records
    from tasks.lib.generation import TransformersBackend
    from tasks.lib.params import load_params
    from tasks.prepare import prepare
    from tasks.reference import snapshot_sft
    from tasks.reference_logps import round_reference_logps
    from tasks.sft import train_sft

    with contextlib.suppress(ImportError):
        # Imported before the first stage: a stage that does not quantize marks it absent for the whole process
        # (tasks.lib.policies.skip_bitsandbytes_unless_quantized), and the QLoRA round runs in this same process.
        import bitsandbytes  # noqa: F401

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = next((value for name, value in BF16_PEAK_TFLOPS.items() if name in device), None)
    work = args.out
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    results: dict = {"device": device, "torch": torch.__version__, "transformers": transformers.__version__,
                     "peak_bf16_tflops": peak, "stages": {}, "failures": {}}  # fmt: skip
    qwen = work / "qwen3-0.6b"
    parameters = qwen3_0_6b(args.tokenizer, qwen, args.smoke)
    results["parameters"] = parameters
    params_path = params_for(work, qwen, steps)
    params = load_params(params_path)
    p = ["--params", str(params_path)]
    d = work / "data"

    def record(name: str, seconds: float, memory: float, tokens: float | None, flops_per_token: float | None):
        entry = {"seconds": round(seconds, 2), "peak_gib": round(memory, 2)}
        if tokens:
            entry |= {"tokens": int(tokens), "tokens_per_s": round(tokens / seconds, 1)}
            if flops_per_token and peak:
                entry["mfu"] = round(tokens * flops_per_token * parameters / seconds / (peak * 1e12), 4)
        results["stages"][name] = entry
        print(name, json.dumps(entry), flush=True)

    def attempt(name: str, run) -> None:
        try:
            run()
        except BaseException as error:  # noqa: BLE001  (SystemExit from a stage too: report it and go on)
            results["failures"][name] = f"{type(error).__name__}: {error}"[-2000:]
            traceback.print_exc()

    def stage(name: str, work_function, argv: list[str], tokens: float | None = None) -> None:
        """A stage with its arguments; `tokens`: real tokens it trained on (4N FLOPs each, LoRA)."""
        attempt(name, lambda: record(name, *timed_stage(work_function, argv), tokens, 4))

    def dpo_arguments(params_file: Path, out: str) -> list[str]:
        return [
            "--params", str(params_file), "--round", "r1", "--policy", str(d / "policy_sft"),
            "--reference-logps", str(d / "reference_logps"), "--out", str(d / out),
            "--checkpoints", str(d / f"ck_{out}"), "--logs", str(d / f"logs_{out}"),
            "--plots", str(d / f"{out}_plots.json"), "--metrics", str(d / f"{out}.json"),
        ]  # fmt: skip

    pairs_file = ROOT / "data/builtin/pairs_r1.jsonl"
    stage("base", build_base, [*p, "--corpus", "data/builtin/sft.jsonl", "--out", str(d / "base")])
    stage("prepare", prepare, [
        *p, "--sft", "data/builtin/sft.jsonl", "--eval-pairs", "data/builtin/eval_pairs.jsonl",
        "--base", str(d / "base"), "--sft-train", str(d / "sft_train.jsonl"),
        "--sft-heldout", str(d / "sft_heldout.jsonl"), "--eval-pairs-out", str(d / "eval_pairs.jsonl"),
        "--report", str(d / "data.json"),
    ])  # fmt: skip
    tokenizer = transformers.AutoTokenizer.from_pretrained(qwen)
    trained_rows = steps * BATCH
    sft_tokens = trained_rows * row_tokens(d / "sft_train.jsonl", tokenizer, pairs=False)
    dpo_tokens = trained_rows * row_tokens(pairs_file, tokenizer, pairs=True)
    stage("sft (LoRA)", train_sft, [
        *p, "--base", str(d / "base"), "--train", str(d / "sft_train.jsonl"),
        "--heldout", str(d / "sft_heldout.jsonl"), "--out", str(d / "sft"), "--checkpoints", str(d / "ck_sft"),
        "--logs", str(d / "logs_sft"), "--plots", str(d / "sft_plots.json"), "--metrics", str(d / "sft.json"),
    ], sft_tokens)  # fmt: skip
    stage("reference (merge the SFT adapter)", snapshot_sft, [
        *p, "--base", str(d / "base"), "--sft", str(d / "sft"), "--out", str(d / "policy_sft"),
        "--metrics", str(d / "reference.json"),
    ])  # fmt: skip
    stage("reference_logps", round_reference_logps, [
        *p, "--round", "r1", "--sft-policy", str(d / "policy_sft"), "--previous-policy", str(d / "policy_sft"),
        "--pairs", str(pairs_file), "--out", str(d / "reference_logps"),
    ])  # fmt: skip
    stage("dpo r1 (LoRA)", train_round, dpo_arguments(params_path, "dpo"), dpo_tokens)
    quantized = yaml.safe_load(params_path.read_text())
    quantized["model"]["quantization"] = "4bit"
    qlora_path = work / "params_qlora.yaml"
    qlora_path.write_text(yaml.safe_dump(quantized, sort_keys=False))
    stage("dpo r1 (4-bit QLoRA)", train_round, dpo_arguments(qlora_path, "dpo_qlora"), dpo_tokens)

    def sample() -> None:
        sizes = {"max_new_tokens": 8, "batch_size": 64} if args.smoke else {"max_new_tokens": 128, "batch_size": 512}
        settings = params.onpolicy.generate.model_copy(update=sizes)
        backend = TransformersBackend(d / "policy_sft", params.model)
        rows = load_records(ROOT / "data/builtin/prompts.jsonl")[: 16 if args.smoke else 256]
        prompts = [render(backend.tokenizer, row["prompt"]) for row in rows]
        per_call = settings.batch_size // settings.samples_per_prompt
        backend.sample(prompts[:per_call], settings, seed=0)  # warm-up
        synchronize()
        reset_peak()
        tokens, started = 0, time.perf_counter()
        for index in range(0, len(prompts), per_call):
            for group in backend.sample(prompts[index : index + per_call], settings, seed=index):
                tokens += sum(completion.tokens for completion in group)
        synchronize()
        record("sampling (transformers generate)", time.perf_counter() - started, peak_gib(), tokens, 2)

    attempt("sampling", sample)
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
