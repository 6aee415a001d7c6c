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


def refuse_questions_the_rule_judge_cannot_score(judge_kind: str, result, what: str) -> None:
    """With `onpolicy.judge.kind: rule`, fail at the first of `result`'s prompts (a `records.ReadResult`) that is
    not a built-in task question, naming its file and line: the stage that reads the prompts knows, long before a
    judge would fail."""
    from tasks.lib.chat import last_content
    from tasks.lib.errors import DataError

    if judge_kind != "rule":
        return
    for row, number in zip(result.rows, result.row_lines, strict=True):
        question = last_content(row["prompt"])
        if QUESTION.search(question) is None:
            raise DataError(
                f"{result.where(number)}: {question[:80]!r} is not a built-in task question, and "
                f"onpolicy.judge.kind: rule scores only data/generate.py's questions ({what}); "
                "set onpolicy.judge.kind to reward_model or function"
            )
