"""Benchmark: on-policy sampling with the `transformers` backend against the `vllm` backend.

Same prompts (the pool's first `--prompts`), same settings (params.yaml `onpolicy.generate`: samples per prompt,
temperature, top_p, max_new_tokens, batch size), same policy folder, each backend in a fresh process so its
memory is its own. Two policies: the demo's SFT policy (`models/policies/sft`, `make demo` builds it) and a
random-init Qwen3 of a real shape (`--qwen3-layers`, hidden 512, Qwen3's 151,669-token vocabulary from the shared
tokenizer), whose answers run to max_new_tokens (random weights rarely emit EOS), so it measures decoding at length.
Prints, per policy and backend: load seconds, generated tokens, sampling seconds (a round's wall), tokens/s and the
peak resident memory of every process the backend ran (vLLM: its worker and engine processes).

    .venv/bin/python benchmarks/generation.py [--prompts 64] [--backends transformers,vllm] [--batching]

`--batching` instead compares the transformers backend's batched sampler with one prompt at a time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.lib.chat import render  # noqa: E402
from tasks.lib.files import load_records  # noqa: E402
from tasks.lib.generation import open_backend  # noqa: E402
from tasks.lib.params import load_params  # noqa: E402


def random_qwen3(tokenizer_folder: Path, out: Path, layers: int) -> int:
    """A random-init Qwen3ForCausalLM (hidden 512, GQA 8/4 heads of 64) saved with the shared Qwen3 tokenizer."""
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=512, intermediate_size=1536, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=2048,
        tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )  # fmt: skip
    model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sum(parameter.numel() for parameter in model.parameters())


class PeakMemory:
    """Peak resident memory summed over this process and its descendants, sampled every 0.2 s."""

    def __init__(self):
        import psutil

        self.root, self.peak, self.done = psutil.Process(), 0, threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        import psutil

        while not self.done.wait(0.2):
            total = 0
            for process in [self.root, *self.root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):  # a process that ended between listing and reading
                    total += process.memory_info().rss
            self.peak = max(self.peak, total)

    def stop(self) -> int:
        self.done.set()
        self.thread.join()
        return self.peak


def measure_one(params_path: Path, policy: Path, backend_name: str, prompts: int) -> dict:
    """In this process: load `backend_name` on `policy`, sample the pool's first prompts as a round does."""
    params = load_params(params_path)
    settings = params.onpolicy.generate.model_copy(update={"backend": backend_name})
    memory = PeakMemory()
    started = time.perf_counter()
    backend = open_backend(settings, policy, params.model)
    loaded = time.perf_counter() - started
    try:
        pool = load_records(ROOT / params.onpolicy.prompts.pool)[:prompts]
        texts = [render(backend.tokenizer, row["prompt"]) for row in pool]
        backend.sample(texts[:2], settings, seed=0)  # warm-up: first-call allocations are not a round's cost
        per_call = max(1, settings.batch_size // settings.samples_per_prompt)
        tokens, started = 0, time.perf_counter()
        for index in range(0, len(texts), per_call):
            for group in backend.sample(texts[index : index + per_call], settings, seed=index):
                tokens += sum(completion.tokens for completion in group)
        seconds = time.perf_counter() - started
    finally:
        backend.close()
    return {
        "backend": backend_name, "load_s": round(loaded, 1), "tokens": tokens, "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1), "peak_rss_gib": round(memory.stop() / 2**30, 2),
    }  # fmt: skip


def run_isolated(params_path: Path, policy: Path, backend: str, prompts: int) -> dict:
    command = [sys.executable, __file__, "--one", backend, "--policy", str(policy), "--params", str(params_path)]
    result = subprocess.run([*command, "--prompts", str(prompts)], capture_output=True, text=True)
    if result.returncode != 0:
        return {"backend": backend, "error": (result.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def compare_batching(params_path: Path, policy: Path, prompts: int) -> None:
    """The transformers backend batched (`batch_size` sequences a call) against one sequence a call."""
    import torch

    params = load_params(params_path)
    settings = params.onpolicy.generate.model_copy(update={"backend": "transformers"})
    backend = open_backend(settings, policy, params.model)
    texts = [render(backend.tokenizer, row["prompt"]) for row in load_records(ROOT / params.onpolicy.prompts.pool)]
    texts = texts[:prompts]
    backend.sample(texts[:2], settings, seed=0)

    def throughput(items: list[str], sampling, per_call: int) -> tuple[int, float]:
        tokens, started = 0, time.perf_counter()
        for index in range(0, len(items), per_call):
            for group in backend.sample(items[index : index + per_call], sampling, seed=index):
                tokens += sum(completion.tokens for completion in group)
        return tokens, time.perf_counter() - started

    batched = throughput(texts, settings, max(1, settings.batch_size // settings.samples_per_prompt))
    repeated = [text for text in texts for _ in range(settings.samples_per_prompt)]
    single = throughput(repeated, settings.model_copy(update={"samples_per_prompt": 1}), 1)
    threads = torch.get_num_threads()
    print(f"policy {policy}, {len(texts)} prompts x {settings.samples_per_prompt}, torch threads {threads}")
    print("| sampler | sequences per call | tokens | seconds | tokens/s |\n| --- | --- | --- | --- | --- |")
    for label, per_call, (tokens, seconds) in (
        ("batched (left-padded)", settings.batch_size, batched),
        ("one prompt at a time", 1, single),
    ):
        print(f"| {label} | {per_call} | {tokens} | {seconds:.2f} | {tokens / seconds:.0f} |")
    print(f"speed-up: {batched[0] / batched[1] / (single[0] / single[1]):.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--policy", type=Path, default=ROOT / "models/policies/sft", help="the demo-sized policy")
    parser.add_argument("--prompts", type=int, default=64, help="prompts from the pool to answer")
    parser.add_argument("--backends", default="transformers,vllm")
    parser.add_argument("--qwen3-layers", type=int, default=4, help="layers of the random-init Qwen3 (0: skip it)")
    parser.add_argument(
        "--real", type=Path, default=Path(os.environ.get("SFT_DPO_REAL_ARTIFACTS", ROOT.parent / "shared/real"))
    )
    parser.add_argument("--batching", action="store_true", help="batched vs one prompt at a time (transformers)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.params, args.policy, args.one, args.prompts)))
        return
    if args.batching:
        compare_batching(args.params, args.policy, args.prompts)
        return
    params = load_params(args.params)
    settings = params.onpolicy.generate
    print(
        f"{args.prompts} prompts x {settings.samples_per_prompt} samples, max_new_tokens {settings.max_new_tokens}, "
        f"temperature {settings.temperature}, batch_size {settings.batch_size}, {os.cpu_count()} CPUs, float32"
    )
    print("| policy | backend | load s | tokens | sampling s | tokens/s | peak memory GiB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as scratch:
        policies = [("demo SFT policy", args.policy)]
        if args.qwen3_layers:
            qwen3 = Path(scratch) / "qwen3"
            count = random_qwen3(args.real / "tokenizers/qwen3", qwen3, args.qwen3_layers)
            policies.append((f"random-init Qwen3, {args.qwen3_layers} layers, {count / 1e6:.0f}M parameters", qwen3))
        for label, policy in policies:
            for backend in args.backends.split(","):
                row = run_isolated(args.params, policy, backend, args.prompts)
                if "error" in row:
                    print(f"| {label} | {backend} | failed: {row['error']} | | | | |")
                    continue
                print(
                    f"| {label} | {backend} | {row['load_s']} | {row['tokens']} | {row['seconds']} | "
                    f"{row['tokens_per_s']} | {row['peak_rss_gib']} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
