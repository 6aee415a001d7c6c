"""Generation backends: how the on-policy rounds sample responses from a policy.

A backend turns rendered prompts into sampled completions. The `generate` stage only talks to
`GenerationBackend`: `transformers` (batched `generate` in the stage's process) or `vllm` (vLLM's engine in its own
environment, `tasks/lib/vllm_worker.py`). Both tokenise prompts and decode completions with the project's tokenizer
and stop at the same token ids, so the records they write differ only in which tokens were drawn.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tasks.lib.errors import SettingError
from tasks.lib.policies import load_model, load_tokenizer
from tasks.lib.schema import GenerateParams, ModelParams, VllmParams


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: int
    """Generated tokens up to and including the end of turn (padding excluded)."""
    finished: bool
    """Whether the response ended with a stop token (False: cut at `max_new_tokens`)."""
    token_ids: tuple[int, ...] = ()
    """The generated token ids (up to and including the stop token), for scoring them exactly."""


class GenerationBackend(Protocol):
    name: str
    tokenizer: object

    def close(self) -> None:
        """Stop what the backend started (vLLM's worker process)."""
        ...

    def sample(
        self, prompts: list[str], settings: GenerateParams, seed: int, add_special_tokens: bool = False
    ) -> list[list[Completion]]:
        """`settings.samples_per_prompt` completions for each rendered prompt, reproducible under `seed`.

        `add_special_tokens`: tokenise with the tokenizer's special tokens (string rows; `chat.adds_special_tokens`).
        """
        ...


class TransformersBackend:
    """`model.generate` on batches of prompts padded on the left, several samples per prompt."""

    name = "transformers"

    def __init__(self, policy: Path, model: ModelParams, loaded=None):
        """`loaded`: the policy's model already in memory (the eval stage's), instead of loading a second copy."""
        self.tokenizer = load_tokenizer(str(policy), model)
        # Decoder-only models continue from the last position: pad on the left so it is a real token.
        self.tokenizer.padding_side = "left"
        self.model = loaded if loaded is not None else load_model(str(policy), model)
        self.model.eval()
        if self.model.device.type == "cpu":
            import torch

            if torch.cuda.is_available():
                self.model.to("cuda")
        self.stop_ids = stop_ids_of(self.model.generation_config, self.tokenizer)

    def close(self) -> None:
        """Nothing to stop: the model lives in this process."""

    def sample(
        self, prompts: list[str], settings: GenerateParams, seed: int, add_special_tokens: bool = False
    ) -> list[list[Completion]]:
        import torch

        torch.manual_seed(seed)
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens).to(
            self.model.device
        )
        with torch.no_grad():
            output = self.model.generate(
                **batch,
                do_sample=True,
                temperature=settings.temperature,
                top_p=settings.top_p,
                top_k=0,
                max_new_tokens=settings.max_new_tokens,
                num_return_sequences=settings.samples_per_prompt,
                eos_token_id=self.stop_ids,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        new_tokens = output[:, batch["input_ids"].shape[1] :].tolist()
        completions = [completion_from_tokens(self.tokenizer, self.stop_ids, tokens) for tokens in new_tokens]
        per_prompt = settings.samples_per_prompt
        return [completions[i : i + per_prompt] for i in range(0, len(completions), per_prompt)]


def stop_ids_of(generation_config, tokenizer) -> list[int]:
    """The token ids that end a response: the generation config's `eos_token_id`(s) and the tokenizer's."""
    configured = generation_config.eos_token_id
    ids = configured if isinstance(configured, list) else [configured] if configured is not None else []
    return sorted({*ids, tokenizer.eos_token_id} - {None})


def completion_from_tokens(tokenizer, stop_ids: list[int], tokens: list[int]) -> Completion:
    """A sampled sequence up to and including its first stop token, decoded as every backend decodes it."""
    stop = next((i for i, token in enumerate(tokens) if token in stop_ids), None)
    kept = tokens if stop is None else tokens[: stop + 1]
    text = tokenizer.decode(kept, skip_special_tokens=True).strip()
    return Completion(text=text, tokens=len(kept), finished=stop is not None, token_ids=tuple(kept))


VLLM_WORKER = Path(__file__).with_name("vllm_worker.py")
PER_PROMPT_SEED_STRIDE = 100_003
"""A prompt's vLLM seed is the batch seed x this + its place in the batch: its samples do not depend on the batch
it shares the engine with (vLLM seeds each request's own generator)."""


def vllm_python(settings: VllmParams) -> Path:
    """vLLM's interpreter: the configured one, else `.venv-vllm` beside the environment running this stage."""
    return Path(settings.python) if settings.python else Path(sys.prefix).parent / ".venv-vllm" / "bin" / "python"


def vllm_problem(settings: VllmParams) -> str | None:
    """Why the `vllm` backend cannot start here (one line saying what to run), or None."""
    python = vllm_python(settings)
    if not python.is_file():
        return (
            f"onpolicy.generate.backend: vllm, but there is no vLLM environment at {python} "
            "(onpolicy.generate.vllm.python): run `make vllm` to build it"
        )
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    if subprocess.run([str(python), "-c", probe], capture_output=True).returncode != 0:
        return f"onpolicy.generate.backend: vllm, but {python} cannot import vllm: run `make vllm` to (re)build it"
    return None


class VllmBackend:
    """vLLM's engine on the policy's merged weights, in vLLM's own environment; one worker process per stage.

    Every policy folder holds merged weights (the adapter beside them is kept for lineage), so vLLM loads the
    policy as a plain model: no LoRA kernels in the sampling loop, and the same weights the transformers backend
    and lm-eval read.
    """

    name = "vllm"

    def __init__(self, policy: Path, model: ModelParams, settings: GenerateParams):
        from transformers import GenerationConfig

        problem = vllm_problem(settings.vllm)
        if problem:
            raise SettingError(problem)
        self.tokenizer = load_tokenizer(str(policy), model)
        self.stop_ids = stop_ids_of(GenerationConfig.from_pretrained(str(policy)), self.tokenizer)
        command = [
            str(vllm_python(settings.vllm)), str(VLLM_WORKER), "--model", str(policy), "--dtype", model.dtype,
            "--memory-fraction", str(settings.vllm.memory_fraction), "--seed", str(settings.seed),
        ]  # fmt: skip
        # stderr: the stage's own, so vLLM's log lands in the stage's log
        self.worker = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ready = self._reply()["ready"]
        print(f"vllm {self.ready['vllm']}: {policy} loaded in {self.ready['seconds']} s", file=sys.stderr)

    def _reply(self) -> dict:
        line = self.worker.stdout.readline()
        if not line:
            status = self.worker.wait()
            raise RuntimeError(f"the vLLM worker exited with status {status} (its log is above)")
        return json.loads(line)

    def generate_ids(
        self, prompt_ids: list[list[int]], seeds: list[int], n: int, temperature: float, top_p: float,
        max_tokens: int, logprobs: bool = False,
    ) -> list[list[dict]]:  # fmt: skip
        """The worker's raw outputs: per prompt, `n` dicts of token ids, finish reason and (optionally) log-probs."""
        request = {
            "prompts": prompt_ids, "seeds": seeds, "n": n, "temperature": temperature, "top_p": top_p,
            "max_tokens": max_tokens, "stop_token_ids": self.stop_ids, "logprobs": logprobs,
        }  # fmt: skip
        self.worker.stdin.write(json.dumps(request) + "\n")
        self.worker.stdin.flush()
        return self._reply()["outputs"]

    def sample(
        self, prompts: list[str], settings: GenerateParams, seed: int, add_special_tokens: bool = False
    ) -> list[list[Completion]]:
        prompt_ids = [self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"] for text in prompts]
        seeds = [seed * PER_PROMPT_SEED_STRIDE + index for index in range(len(prompts))]
        outputs = self.generate_ids(
            prompt_ids, seeds, settings.samples_per_prompt, settings.temperature, settings.top_p,
            settings.max_new_tokens,
        )  # fmt: skip
        return [
            [completion_from_tokens(self.tokenizer, self.stop_ids, output["token_ids"]) for output in group]
            for group in outputs
        ]

    def close(self) -> None:
        if self.worker.poll() is None:
            self.worker.stdin.close()  # the worker's loop ends at end of input
            try:
                self.worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.worker.kill()
                self.worker.wait()


def completion_logps(model, prompt_ids: list[list[int]], completions: list[list[int]], batch_size: int) -> list[float]:
    """Sum of log p(token | everything before it) over each completion's tokens, given its prompt's tokens.

    Scored on the token ids that were sampled, not on re-tokenised text: decoding and encoding again can
    change the tokens (and a chat template adds text after the end of turn), which biases a log-ratio.
    """
    import torch

    logps: list[float] = []
    for start in range(0, len(completions), batch_size):
        chunk = list(zip(prompt_ids[start : start + batch_size], completions[start : start + batch_size], strict=True))
        width = max(len(prompt) + len(completion) for prompt, completion in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        attention = torch.zeros_like(ids)
        for row, (prompt, completion) in enumerate(chunk):  # padded on the right: positions need no shifting
            ids[row, : len(prompt) + len(completion)] = torch.tensor(prompt + completion)
            attention[row, : len(prompt) + len(completion)] = 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(model.device), attention_mask=attention.to(model.device)).logits
        log_softmax = logits.float().log_softmax(-1).cpu()
        for row, (prompt, completion) in enumerate(chunk):
            positions = torch.arange(len(prompt) - 1, len(prompt) + len(completion) - 1)
            logps.append(log_softmax[row, positions, torch.tensor(completion)].sum().item())
    return logps


def open_backend(settings: GenerateParams, policy: Path, model: ModelParams) -> GenerationBackend:
    """The backend `settings.backend` names, on `policy`; call its `close()` when done."""
    if settings.backend == "vllm":
        return VllmBackend(policy, model, settings)
    return TransformersBackend(policy, model)
