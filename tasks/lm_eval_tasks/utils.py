"""`!function` hooks of the sft-dpo lm-eval tasks."""

from tasks.lib.builtin_task import verify


def score_generation(doc: dict, results: list[str]) -> dict:
    response = results[0].strip()
    verdict = verify(doc["question"], response)
    exact = float(response == doc["chosen"].strip())
    if verdict is None:  # not a built-in task prompt: exact match is all we can check
        return {"exact_match": exact, "correct": exact, "polite": exact}
    return {"exact_match": exact, "correct": float(verdict.correct), "polite": float(verdict.polite)}
