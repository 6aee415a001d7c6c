"""Judges: how an on-policy round scores sampled responses (`score(prompts, responses) -> scores`, higher is better).

- `rule`: the built-in task's verifier (`tasks.lib.builtin_task.verify`): `correct_weight` for a correct
  answer plus `polite_weight` for the polite closing.
- `reward_model`: any `AutoModelForSequenceClassification` (hub id or folder); the score is its
  first logit on the conversation rendered with the policy's chat template or the model's own.
- `function`: a user's `package.module:function(prompt, response) -> float`.
Each judge carries its identity (kind, and content hashes of its code or weights) for the lineage.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from tasks.lib import builtin_task
from tasks.lib.chat import as_response, last_content, render
from tasks.lib.errors import DataError, SettingError
from tasks.lib.hashing import directory_digest
from tasks.lib.policies import has_cuda, load_tokenizer
from tasks.lib.schema import JudgeParams, Params
from tasks.lib.timing import phase


class Judge(Protocol):
    identity: dict[str, Any]

    def score(self, prompts: list[Any], responses: list[str]) -> list[float]: ...


def _source_digest(obj) -> str:
    return hashlib.sha256(Path(inspect.getsourcefile(obj)).read_bytes()).hexdigest()


class RuleJudge:
    """The built-in task's verifier as a judge: correctness first, style second."""

    def __init__(self, settings: JudgeParams):
        self.correct_weight, self.polite_weight = settings.correct_weight, settings.polite_weight
        self.identity = {
            "kind": "rule",
            "verifier": "tasks.lib.builtin_task:verify",
            "weights": {"correct": self.correct_weight, "polite": self.polite_weight},
            "source_sha256": _source_digest(builtin_task),
        }
        self.verify = builtin_task.verify

    def verdicts(self, prompts: list[Any], responses: list[str]) -> list:
        verdicts = [
            self.verify(last_content(prompt), response) for prompt, response in zip(prompts, responses, strict=True)
        ]
        unknown = next((i for i, verdict in enumerate(verdicts) if verdict is None), None)
        if unknown is not None:
            raise DataError(
                f"rule judge: {last_content(prompts[unknown])!r} is not a built-in task question "
                "(onpolicy.judge.kind: rule only knows data/generate.py's questions; use reward_model or function)"
            )
        return verdicts

    def score(self, prompts: list[Any], responses: list[str]) -> list[float]:
        return [
            self.correct_weight * v.correct + self.polite_weight * v.polite for v in self.verdicts(prompts, responses)
        ]


class RewardModelJudge:
    """A sequence-classification reward model; its first logit on the whole conversation is the score."""

    def __init__(self, settings: JudgeParams, params: Params, policy: Path):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.settings = settings
        kwargs = {"revision": settings.reward_model_revision, "trust_remote_code": params.model.trust_remote_code}
        with phase("load"):
            self.tokenizer = AutoTokenizer.from_pretrained(settings.reward_model, **kwargs)
            self.model = AutoModelForSequenceClassification.from_pretrained(settings.reward_model, **kwargs)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # The score is read at the last token that is not padding: the model must know the pad the tokenizer uses.
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to("cuda" if has_cuda() else "cpu").eval()
        self.template = (
            load_tokenizer(str(policy), params.model) if settings.chat_template == "policy" else self.tokenizer
        )
        local = Path(settings.reward_model)
        self.identity = {
            "kind": "reward_model",
            "model": settings.reward_model,
            "revision": settings.reward_model_revision,
            "chat_template": settings.chat_template,
            "sha256": directory_digest(local) if local.is_dir() else None,
        }

    def score(self, prompts: list[Any], responses: list[str]) -> list[float]:
        import torch

        texts = [
            render(self.template, prompt, as_response(prompt, response))
            for prompt, response in zip(prompts, responses, strict=True)
        ]
        scores: list[float] = []
        size = self.settings.batch_size
        for start in range(0, len(texts), size):
            batch = self.tokenizer(
                texts[start : start + size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                add_special_tokens=False,
            ).to(self.model.device)
            with torch.no_grad():
                scores.extend(self.model(**batch).logits[:, 0].float().tolist())
        return scores


class FunctionJudge:
    """A user's scoring function, imported from `package.module:function`."""

    def __init__(self, settings: JudgeParams):
        module_name, _, function_name = settings.function.partition(":")
        try:
            module = importlib.import_module(module_name)
            self.function: Callable[[Any, str], float] = getattr(module, function_name)
        except (ImportError, AttributeError) as error:
            raise SettingError(f"onpolicy.judge.function: cannot import {settings.function!r}: {error}") from None
        self.identity = {"kind": "function", "function": settings.function, "source_sha256": _source_digest(module)}

    def score(self, prompts: list[Any], responses: list[str]) -> list[float]:
        scores = [self.function(prompt, response) for prompt, response in zip(prompts, responses, strict=True)]
        bad = next((s for s in scores if not isinstance(s, (int, float)) or isinstance(s, bool)), None)
        if bad is not None:
            raise DataError(f"onpolicy.judge.function {self.identity['function']} returned {bad!r}, not a number")
        return [float(s) for s in scores]


def open_judge(params: Params, policy: Path) -> Judge:
    settings = params.onpolicy.judge
    if settings.kind == "rule":
        return RuleJudge(settings)
    if settings.kind == "reward_model":
        return RewardModelJudge(settings, params, policy)
    return FunctionJudge(settings)
