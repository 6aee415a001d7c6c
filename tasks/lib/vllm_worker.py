"""The vLLM sampler, run by `tasks.lib.generation.VllmBackend` inside vLLM's own environment (`make vllm`).

vLLM pins its own torch and transformers, so it cannot share the project's environment; the `generate` stage
starts this file with that environment's Python and talks to it over its standard streams, one JSON line per
request. It imports nothing of the project: prompts arrive as token ids (tokenised by the project's tokenizer,
so both backends see the same ids) and completions leave as token ids, which the stage decodes itself.

Request:  {"prompts": [[ids], ...], "seeds": [..], "n": 4, "temperature": 1.0, "top_p": 1.0, "max_tokens": 32,
           "stop_token_ids": [..], "logprobs": false}
Response: {"outputs": [[{"token_ids": [..], "finish_reason": "stop" | "length", "logprobs": [..] | null}, ..], ..]}
The first line the worker writes is {"ready": {"vllm": version, "seconds": load time}}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _sampling_params(request: dict, seed: int):
    from vllm import SamplingParams

    greedy = request["temperature"] == 0
    return SamplingParams(
        n=request["n"],
        temperature=request["temperature"],
        top_p=1.0 if greedy else request["top_p"],
        top_k=-1 if greedy else 0,
        max_tokens=request["max_tokens"],
        seed=None if greedy else seed,
        stop_token_ids=request["stop_token_ids"],
        logprobs=0 if request.get("logprobs") else None,
        detokenize=False,
    )


def _completion(output, want_logprobs: bool) -> dict:
    logprobs = None
    if want_logprobs:
        # With `logprobs=0` each position holds the sampled token's own log-prob.
        logprobs = [position[token].logprob for token, position in zip(output.token_ids, output.logprobs, strict=True)]
    return {"token_ids": list(output.token_ids), "finish_reason": output.finish_reason, "logprobs": logprobs}


def serve(llm, requests, replies) -> None:
    from vllm.inputs import TokensPrompt

    for line in requests:
        request = json.loads(line)
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in request["prompts"]]
        sampling = [_sampling_params(request, seed) for seed in request["seeds"]]
        results = llm.generate(prompts, sampling, use_tqdm=False)
        want = bool(request.get("logprobs"))
        reply = {"outputs": [[_completion(output, want) for output in result.outputs] for result in results]}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", required=True, help="policy folder (merged weights)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--memory-fraction", type=float, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    # Replies travel on the original stdout; everything vLLM (and its engine process) prints goes to stderr.
    replies = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    started = time.perf_counter()
    import vllm

    llm = vllm.LLM(
        model=args.model,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        gpu_memory_utilization=args.memory_fraction,
        enforce_eager=True,  # no graph capture: seconds saved per round on small models, required on some CPUs
        seed=args.seed,
        skip_tokenizer_init=True,  # the stage tokenises and decodes with the project's tokenizer
    )
    ready = {"vllm": vllm.__version__, "seconds": round(time.perf_counter() - started, 1)}
    replies.write(json.dumps({"ready": ready}) + "\n")
    replies.flush()
    serve(llm, sys.stdin, replies)


if __name__ == "__main__":  # vLLM starts its engine in a new process, which re-imports this file
    main()
