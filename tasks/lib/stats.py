"""Statistics the eval stages and the dashboard report: length summaries and head-to-head win rates.

- `length_summary`: mean and 95th percentile of response lengths (tokens).

Head-to-head, two models' answers to the same prompts, judged by the run's judge:

- `outcomes`: per prompt, 1 when the first model's answer scored higher, 0.5 on a tie, 0 otherwise.
- `win_rate`: their mean (ties count half).
- `bootstrap_interval`: a percentile bootstrap interval of that mean over prompts (scipy's `bootstrap`).
- `length_controlled_win_rate`: the win rate with the effect of the length difference regressed out, as
  length-controlled AlpacaEval does: a logistic model `P(win) = sigmoid(theta + phi * tanh(d / std(d)))`
  over the per-prompt length differences `d`, fitted to the outcomes (ties as half a win), read at `d = 0`:
  `sigmoid(theta)`. A model that wins only by answering longer gets ~0.5; one that wins at equal length keeps
  its win rate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

RESAMPLES = 2000
"""Bootstrap resamples: the interval's ends move by < 0.005 between seeds at this count on 40+ prompts."""


def length_summary(lengths: Sequence[int]) -> dict[str, float | None]:
    """Mean and 95th percentile (linear interpolation) of lengths; None for both when there are none."""
    import numpy as np

    if not lengths:
        return {"mean": None, "p95": None}
    values = np.asarray(lengths, dtype=float)
    return {"mean": round(float(values.mean()), 2), "p95": round(float(np.percentile(values, 95)), 2)}


def outcomes(first: Sequence[float], second: Sequence[float]) -> list[float]:
    """Per prompt: 1 if `first` scored higher, 0.5 on a tie, 0 if lower."""
    return [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(first, second, strict=True)]


def win_rate(results: Sequence[float]) -> float:
    if not results:
        raise ValueError("win rate of no prompts")
    return math.fsum(results) / len(results)


def bootstrap_interval(
    results: Sequence[float], level: float = 0.95, resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the win rate (resampling prompts), reproducible under `seed`."""
    import numpy as np
    from scipy.stats import bootstrap

    values = np.asarray(results, dtype=float)
    if values.size == 0:
        raise ValueError("bootstrap interval of no prompts")
    if np.all(values == values[0]):  # every resample has the same mean; scipy refuses a degenerate sample
        return float(values[0]), float(values[0])
    interval = bootstrap(
        (values,),
        np.mean,
        confidence_level=level,
        n_resamples=resamples,
        method="percentile",
        rng=np.random.default_rng(seed),
    ).confidence_interval
    return float(interval.low), float(interval.high)


def length_controlled_win_rate(results: Sequence[float], first_lengths: Sequence[int], second_lengths: Sequence[int]):
    """The win rate at equal length: `sigmoid(theta)` of the logistic fit described in the module docstring."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    wins = np.asarray(results, dtype=float)
    if wins.size == 0:
        raise ValueError("length-controlled win rate of no prompts")
    if np.all(wins == wins[0]):  # nothing for the length to explain
        return float(wins[0])
    difference = np.asarray(first_lengths, dtype=float) - np.asarray(second_lengths, dtype=float)
    spread = difference.std()
    feature = np.tanh(difference / spread) if spread > 0 else np.zeros_like(difference)
    # A tie is half a win: each prompt enters once as a win and once as a loss, weighted by its outcome.
    features = np.concatenate([feature, feature]).reshape(-1, 1)
    labels = np.concatenate([np.ones_like(wins), np.zeros_like(wins)])
    weights = np.concatenate([wins, 1.0 - wins])
    # Nearly unpenalised (lbfgs leaves the intercept unpenalised): a tiny penalty keeps phi finite when the
    # length separates the outcomes perfectly.
    model = LogisticRegression(C=1e4, solver="lbfgs", max_iter=1000)
    model.fit(features, labels, sample_weight=weights)
    return float(1.0 / (1.0 + math.exp(-model.intercept_[0])))


def head_to_head(
    first_scores: Sequence[float],
    second_scores: Sequence[float],
    first_lengths: Sequence[int],
    second_lengths: Sequence[int],
    seed: int = 0,
) -> dict[str, float | int]:
    """Win rate, its 95 % bootstrap interval, the length-controlled win rate and the number of prompts."""
    results = outcomes(first_scores, second_scores)
    low, high = bootstrap_interval(results, seed=seed)
    return {
        "win_rate": win_rate(results),
        "ci_low": low,
        "ci_high": high,
        "lc_win_rate": length_controlled_win_rate(results, first_lengths, second_lengths),
        "prompts": len(results),
    }
