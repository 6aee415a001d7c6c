"""Benchmark: generation throughput of the batched sampler against one prompt at a time.

Same policy, same prompts, same sampling settings (params.yaml `onpolicy.generate`): the
`transformers` backend of the generate stage with `batch_size` sequences per call, then with one
prompt (one sequence) per call. Prints generated tokens per second of each.

    .venv/bin/python benchmarks/generation.py --policy models/policies/sft [--prompts 64]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tasks.lib.chat import render
from tasks.lib.files import load_records
from tasks.lib.generation import open_backend
from tasks.lib.params import load_params

ROOT = Path(__file__).resolve().parents[1]


def throughput(backend, texts: list[str], settings, per_call: int) -> tuple[int, float]:
    tokens, started = 0, time.perf_counter()
    for index in range(0, len(texts), per_call):
        for group in backend.sample(texts[index : index + per_call], settings, seed=index):
            tokens += sum(completion.tokens for completion in group)
    return tokens, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument(
        "--policy",
        type=Path,
        default=ROOT / "models" / "policies" / "sft",
        help="a policy folder (make demo builds models/policies/sft)",
    )
    parser.add_argument("--prompts", type=int, default=64, help="prompts from the pool to answer")
    args = parser.parse_args()

    import torch

    params = load_params(args.params)
    settings = params.onpolicy.generate
    backend = open_backend(settings.backend, args.policy, params.model)
    pool = load_records(ROOT / params.onpolicy.prompts.pool)[: args.prompts]
    texts = [render(backend.tokenizer, row["prompt"]) for row in pool]
    backend.sample(texts[:2], settings, seed=0)  # warm-up
    one_at_a_time = settings.model_copy(update={"samples_per_prompt": 1})
    repeated = [text for text in texts for _ in range(settings.samples_per_prompt)]
    batched_tokens, batched_seconds = throughput(
        backend, texts, settings, max(1, settings.batch_size // settings.samples_per_prompt)
    )
    single_tokens, single_seconds = throughput(backend, repeated, one_at_a_time, 1)
    print(
        f"policy {args.policy}, {len(texts)} prompts x {settings.samples_per_prompt} samples, "
        f"max_new_tokens {settings.max_new_tokens}, torch threads {torch.get_num_threads()}, "
        f"device {backend.model.device}"
    )
    print("| sampler | sequences per call | tokens | seconds | tokens/s |")
    print("| --- | --- | --- | --- | --- |")
    print(
        f"| batched (left-padded) | {settings.batch_size} | {batched_tokens} | {batched_seconds:.2f} | "
        f"{batched_tokens / batched_seconds:.0f} |"
    )
    print(
        f"| one prompt at a time | 1 | {single_tokens} | {single_seconds:.2f} | {single_tokens / single_seconds:.0f} |"
    )
    print(f"speed-up: {batched_tokens / batched_seconds / (single_tokens / single_seconds):.1f}x")


if __name__ == "__main__":
    main()
