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


class GenerationBackend(Protocol):
    name: str

    def sample(self, prompts: list[str], settings: GenerateParams, seed: int) -> list[list[Completion]]:
        """`settings.samples_per_prompt` completions for each rendered prompt, reproducible under `seed`."""
        ...


class TransformersBackend:
    """`model.generate` on batches of prompts padded on the left, several samples per prompt."""

    name = "transformers"

    def __init__(self, policy: Path, model: ModelParams):
        self.tokenizer = load_tokenizer(str(policy), model)
        # Decoder-only models continue from the last position: pad on the left so it is a real token.
        self.tokenizer.padding_side = "left"
        self.model = load_model(str(policy), model)
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

    def sample(self, prompts: list[str], settings: GenerateParams, seed: int) -> list[list[Completion]]:
        import torch

        torch.manual_seed(seed)
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(
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
        return Completion(text=self.tokenizer.decode(kept, skip_special_tokens=True).strip(), tokens=len(kept))


BACKENDS: dict[str, type] = {"transformers": TransformersBackend}


def open_backend(name: str, policy: Path, model: ModelParams) -> GenerationBackend:
    return BACKENDS[name](policy, model)
