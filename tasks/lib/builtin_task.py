"""The rule verifier of the built-in task (see data/generate.py): is an answer correct, is it polite?"""

from __future__ import annotations

import re
from dataclasses import dataclass

QUESTION = re.compile(r"(?:What is|Add|Compute|add)\s+(\d+)\s*(?:plus|and|\+|to)\s+(\d+)")
ANSWER = re.compile(r"The answer is (-?\d+)\.")
POLITE_SUFFIX = "Happy to help!"


@dataclass(frozen=True)
class Verdict:
    correct: bool
    polite: bool


def verify(question: str, response: str) -> Verdict | None:
    """Score a response to a built-in task question; None if the question is not one of ours."""
    asked = QUESTION.search(question)
    if asked is None:
        return None
    answered = ANSWER.search(response)
    correct = answered is not None and int(answered.group(1)) == int(asked.group(1)) + int(asked.group(2))
    return Verdict(correct=correct, polite=response.rstrip().endswith(POLITE_SUFFIX))
