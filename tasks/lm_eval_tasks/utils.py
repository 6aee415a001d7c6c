"""`!function` hooks of the sft-dpo lm-eval tasks."""

from tasks.lib.builtin_task import verify


def score_generation(doc: dict, results: list[str]) -> dict:
    response = results[0].strip()
    verdict = verify(doc["question"], response)
    exact = float(response == doc["chosen"].strip())
    if verdict is None:  # not a built-in task prompt: exact match is all we can check
        return {"exact_match": exact, "correct": exact, "polite": exact}
    return {"exact_match": exact, "correct": float(verdict.correct), "polite": float(verdict.polite)}


def token_loglikelihood(doc: dict, results: list) -> dict:
    """(log-likelihood of the document's scored text, its token count), aggregated by `per_token_nll`.

    Works for `loglikelihood` results (`(ll, is_greedy)`) and `loglikelihood_rolling` ones (`ll`); the token count
    was measured with the evaluated model's own tokenizer, split as lm-eval splits it (tasks/evaluate.py).
    """
    result = results[0]
    loglikelihood = result[0] if isinstance(result, (tuple, list)) else result
    return {"nll": (float(loglikelihood), int(doc["tokens"]))}


def per_token_nll(items: list[tuple[float, int]]) -> float:
    """Mean negative log-likelihood per token (nats) over all documents' tokens."""
    return -sum(loglikelihood for loglikelihood, _ in items) / max(1, sum(tokens for _, tokens in items))
