"""How a prompt and a response become the text a model sees, in either data format.

String rows are concatenated; message-list rows go through the tokenizer's chat template. Every
stage that builds model input (generate, judge, dpo, evaluate, data reports) renders through here.
"""

from __future__ import annotations

from typing import Any


def render(tokenizer, prompt: Any, response: Any = None) -> str:
    """Text the model sees for a prompt (and optional response), in either format."""
    if isinstance(prompt, list):
        messages = prompt + (response or [])
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=response is None)
    return prompt + (response or "")


def last_content(value: Any) -> str:
    """The text of a string field, or of the last message of a message-list field."""
    return value if isinstance(value, str) else value[-1]["content"]


def as_response(prompt: Any, text: str) -> Any:
    """A response text in the prompt's format: an assistant message list for a message-list prompt."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text
