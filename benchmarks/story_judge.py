"""`function` judges for the stories260K benchmark (`onpolicy.judge: {kind: function, function: ...}`).

- `benchmarks.story_judge:score`: +1 when the continuation says someone was happy, +0.5 when it ends a sentence.
  One round of DPO reaches its maximum (1.5), so it cannot show a second or third round helping.
- `benchmarks.story_judge:graded`: a graded score with headroom. Cheerful words count with diminishing returns
  (the first distinct one 1, the next 0.5, then 0.25, ...: at most 2), a sad or angry mood word costs 0.5, ending a
  sentence adds 0.5 and each word past 12 costs 0.1, so the maximum (2.5) needs several distinct cheerful words in
  one short, complete sentence or two: a policy that only learned "She was very happy." scores 1.5. On the bench's
  continuations (benchmarks/stories.py) the rungs are 0 (a gloomy mood), 1.5 (happy), 2.0 (a cheerful action and
  happy) and 2.25 (`played with a friend and was very happy`).
"""

from __future__ import annotations

import re
from typing import Any

KEYWORD = "happy"
CHEERFUL = ("happy", "glad", "smiled", "smile", "laughed", "fun", "love", "loved", "joy", "hug", "played", "friend")
GLOOMY = ("sad", "tired", "scared", "sleepy", "angry", "hungry", "cried", "bad")
WORDS_FREE = 12
WORD = re.compile(r"[a-z]+")


def score(prompt: Any, response: str) -> float:
    text = response.strip()
    return float(KEYWORD in text.lower()) + 0.5 * float(text.endswith("."))


def graded(prompt: Any, response: str) -> float:
    text = response.strip()
    words = WORD.findall(text.lower())
    cheerful = [word for word in CHEERFUL if word in words]
    sentiment = sum(0.5**rank for rank in range(len(cheerful)))
    gloom = 0.5 * any(word in words for word in GLOOMY)
    complete = 0.5 * float(text.endswith((".", "!")))
    too_long = 0.1 * max(0, len(words) - WORDS_FREE)
    return round(sentiment - gloom + complete - too_long, 6)
