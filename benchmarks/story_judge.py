"""A `function` judge for the stories260K benchmark: a simple story-quality and keyword rule.

`onpolicy.judge: {kind: function, function: benchmarks.story_judge:score}`. A continuation of a story opening
scores 1 when it says someone was happy, plus 0.5 when it ends a sentence (a full stop, not cut mid-word).
"""

from __future__ import annotations

from typing import Any

KEYWORD = "happy"


def score(prompt: Any, response: str) -> float:
    text = response.strip()
    return float(KEYWORD in text.lower()) + 0.5 * float(text.endswith("."))
