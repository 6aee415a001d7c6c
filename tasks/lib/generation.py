"""Generation backends: how the on-policy rounds sample responses from a policy.

A backend turns rendered prompts into sampled completions. The `generate` stage only talks to
`GenerationBackend`, so a faster engine (vLLM on a GPU) is one more class in `BACKENDS` and a
value of `onpolicy.generate.backend`; no stage changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tasks.lib.policies import load_model, load_tokenizer
from tasks.lib.schema import GenerateParams, ModelParams


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
        self.stop_ids = self._stop_ids()

    def _stop_ids(self) -> list[int]:
        configured = self.model.generation_config.eos_token_id
        ids = configured if isinstance(configured, list) else [configured] if configured is not None else []
        return sorted({*ids, self.tokenizer.eos_token_id} - {None})

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
        completions = [self._completion(tokens) for tokens in new_tokens]
        per_prompt = settings.samples_per_prompt
        return [completions[i : i + per_prompt] for i in range(0, len(completions), per_prompt)]

    def _completion(self, tokens: list[int]) -> Completion:
        stop = next((i for i, token in enumerate(tokens) if token in self.stop_ids), None)
        kept = tokens if stop is None else tokens[: stop + 1]
        text = self.tokenizer.decode(kept, skip_special_tokens=True).strip()
        return Completion(text=text, tokens=len(kept), finished=stop is not None, token_ids=tuple(kept))


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


BACKENDS: dict[str, type] = {"transformers": TransformersBackend}


def open_backend(name: str, policy: Path, model: ModelParams) -> GenerationBackend:
    return BACKENDS[name](policy, model)
