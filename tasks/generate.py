"""Stage `generate@<round>`: sample responses to the round's prompts from the policy it starts from.

`onpolicy.generate` sets the sampling (temperature, top_p, max_new_tokens, samples per prompt,
batch size, seed). Each finished batch is kept in the round's checkpoint folder under a
fingerprint of the policy, prompts and settings, and every batch is seeded from the seed and its
index: a run killed part-way resumes at the first missing batch under `dvc repro` and writes the
same responses an uninterrupted run would.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tasks.lib.chat import adds_special_tokens, render
from tasks.lib.distributed import barrier, ensure_process_group, is_main, rank, world_size
from tasks.lib.errors import DataError
from tasks.lib.files import atomic_path, load_records, write_json, write_records
from tasks.lib.generation import open_backend
from tasks.lib.hashing import directory_digest, file_digest
from tasks.lib.schema import Params
from tasks.lib.stage import stage_main
from tasks.lib.stats import length_summary
from tasks.lib.training import claim_checkpoint_dir

BATCH_SEED_STRIDE = 1_000_003


def batch_seed(seed: int, index: int) -> int:
    return seed * BATCH_SEED_STRIDE + index


def sampling_fingerprint(params: Params, policy: Path, prompts: Path) -> dict:
    return {
        "format": 2,  # rows carry `finished` flags since format 2: older checkpoints are not resumed
        "policy": directory_digest(policy),
        "prompts": file_digest(prompts),
        "generate": params.onpolicy.generate.model_dump(mode="json"),
    }


def write_batch(path: Path, batch: list[dict], backend, settings, seed: int) -> None:
    """Sample one batch's responses and write its rows (a finished batch, for resuming)."""
    samples = backend.sample(
        [render(backend.tokenizer, row["prompt"]) for row in batch],
        settings,
        seed,
        add_special_tokens=adds_special_tokens(batch[0]["prompt"]),
    )
    finished = [
        {
            **row,
            "responses": [s.text for s in group],
            "tokens": [s.tokens for s in group],
            "finished": [s.finished for s in group],
        }
        for row, group in zip(batch, samples, strict=True)
    ]
    with atomic_path(path) as scratch:
        write_records(scratch, finished)


def generate_round(params: Params, policy: Path, prompts: Path, out: Path, checkpoints: Path, metrics: Path) -> dict:
    """Sample every prompt's responses (resuming finished batches) and write them with their prompts.

    Args:
        params: the pipeline's params
        policy: policy folder to sample from
        prompts: the round's prompts (from prompts@<round>)
        out: prompts with their sampled responses (JSON lines)
        checkpoints: finished batches, for resuming
        metrics: the stage's metrics (responses, empty ones, new tokens, token lengths, EOS and truncation rates;
            tokens/s is printed, not stored)
    """
    from tqdm import tqdm

    if not prompts.exists():
        raise DataError(f"--prompts {prompts}: no such file")
    settings = params.onpolicy.generate
    rows = load_records(prompts)
    per_call = max(1, settings.batch_size // settings.samples_per_prompt)
    batches = [rows[i : i + per_call] for i in range(0, len(rows), per_call)]
    ensure_process_group()
    resumed = claim_checkpoint_dir(checkpoints, sampling_fingerprint(params, policy, prompts))
    done = {int(path.stem) for path in checkpoints.glob("*.jsonl")} if resumed else set()
    # On several processes each samples every world_size-th batch; seeds are per batch, so the samples are the same.
    skipped = done | {index for index in range(len(batches)) if index % world_size() != rank()}
    backend = None
    started = time.perf_counter()
    try:
        for index, batch in enumerate(tqdm(batches, desc="generate", unit="batch", file=sys.stderr, mininterval=5)):
            if index in skipped:
                continue
            if backend is None:
                backend = open_backend(settings, policy, params.model)
            write_batch(checkpoints / f"{index:06d}.jsonl", batch, backend, settings, batch_seed(settings.seed, index))
    finally:
        if backend is not None:
            backend.close()
    seconds = time.perf_counter() - started
    barrier()
    if not is_main():
        return {}  # rank 0 writes the outputs
    generated = [row for index in range(len(batches)) for row in load_records(checkpoints / f"{index:06d}.jsonl")]
    with atomic_path(out) as scratch:
        write_records(scratch, generated)
    new_tokens = sum(sum(row["tokens"]) for row in generated)
    responses = [text for row in generated for text in row["responses"]]
    finished = [flag for row in generated for flag in row["finished"]]
    lengths = length_summary([count for row in generated for count in row["tokens"]])
    summary = {
        "policy": str(policy),
        "backend": settings.backend,
        "sampling": settings.model_dump(mode="json"),
        "prompts": len(generated),
        "responses": len(responses),
        "empty_responses": sum(1 for text in responses if not text),
        "mean_response_chars": round(sum(map(len, responses)) / len(responses), 2) if responses else 0.0,
        "new_tokens": new_tokens,
        "response_tokens_mean": lengths["mean"],
        "response_tokens_p95": lengths["p95"],
        "eos_rate": round(sum(finished) / len(finished), 4) if finished else None,
        "truncated_rate": round(1 - sum(finished) / len(finished), 4) if finished else None,
        "batches": len(batches),
    }
    write_json(metrics, summary)
    # Timing and resumption are facts of this run, not of its result: printed and returned, not in the metrics.
    run = {
        "resumed_batches": len(done & set(range(len(batches)))),
        "seconds": round(seconds, 3),
        "tokens_per_second": round(new_tokens / seconds, 1) if seconds > 0 and backend is not None else None,
    }
    print(
        f"generate: {summary['responses']} responses to {summary['prompts']} prompts, {summary['new_tokens']} tokens"
        f" in {run['seconds']:.1f} s ({run['tokens_per_second']} tokens/s), {run['resumed_batches']} batches resumed"
    )
    return {**summary, **run}


if __name__ == "__main__":
    stage_main(generate_round)
