"""Win rate, bootstrap interval and length-controlled win rate on hand-made outcomes with known answers."""

from __future__ import annotations

import pytest

from tasks.lib.stats import (
    bootstrap_interval,
    head_to_head,
    length_controlled_win_rate,
    length_summary,
    outcomes,
    win_rate,
)


def test_outcomes_count_ties_half():
    assert outcomes([2, 1, 1, 0], [1, 1, 2, 0]) == [1.0, 0.5, 0.0, 0.5]
    assert win_rate(outcomes([2, 1, 1, 0], [1, 1, 2, 0])) == 0.5
    assert win_rate([1.0, 1.0, 1.0, 0.0]) == 0.75


def test_bootstrap_interval_contains_the_rate_and_narrows_with_more_prompts():
    few = [1.0] * 6 + [0.0] * 4
    many = few * 20
    low_few, high_few = bootstrap_interval(few)
    low_many, high_many = bootstrap_interval(many)
    assert low_few < 0.6 < high_few
    assert low_many < 0.6 < high_many
    assert high_many - low_many < (high_few - low_few) / 2
    # The normal approximation of a proportion's 95 % interval on 200 prompts: 0.6 +- 1.96 * sqrt(.24 / 200).
    assert low_many == pytest.approx(0.6 - 0.068, abs=0.015)
    assert high_many == pytest.approx(0.6 + 0.068, abs=0.015)
    assert bootstrap_interval(many, seed=3) != bootstrap_interval(many, seed=4)
    assert bootstrap_interval(many, seed=3) == bootstrap_interval(many, seed=3)


def test_bootstrap_interval_of_a_unanimous_result_is_a_point():
    assert bootstrap_interval([1.0] * 8) == (1.0, 1.0)


def test_length_controlled_win_rate_is_the_win_rate_when_lengths_are_equal():
    results = [1.0, 1.0, 0.0, 0.5, 1.0, 0.0, 1.0, 1.0]
    assert length_controlled_win_rate(results, [5] * 8, [5] * 8) == pytest.approx(win_rate(results), abs=1e-4)


def test_length_controlled_win_rate_removes_a_win_that_only_length_explains():
    # Six prompts where the first model answered longer and won 3 in 4, two where it answered shorter and won 1 in 4:
    # raw 0.625, but at equal length the models are even (sigmoid(theta) = 0.5 for this saturated fit).
    results = [0.75] * 6 + [0.25] * 2
    longer = [12] * 6 + [4] * 2
    shorter = [4] * 6 + [12] * 2
    assert win_rate(results) == 0.625
    assert length_controlled_win_rate(results, longer, shorter) == pytest.approx(0.5, abs=1e-3)


def test_length_controlled_win_rate_keeps_a_win_independent_of_length():
    # The first model wins 3 in 4 whether it answered longer or shorter: length explains nothing.
    results = [1.0, 1.0, 1.0, 0.0] * 4
    first = [10, 10, 10, 10, 4, 4, 4, 4] * 2
    second = [4, 4, 4, 4, 10, 10, 10, 10] * 2
    assert length_controlled_win_rate(results, first, second) == pytest.approx(0.75, abs=1e-3)


def test_head_to_head_reports_every_figure():
    result = head_to_head([1, 1, 0, 1], [0, 1, 1, 0], [3, 3, 3, 3], [3, 3, 3, 3])
    assert result["win_rate"] == 0.625
    assert result["prompts"] == 4
    assert result["ci_low"] <= 0.625 <= result["ci_high"]
    assert result["lc_win_rate"] == pytest.approx(0.625, abs=1e-4)


def test_no_prompts_is_an_error():
    with pytest.raises(ValueError, match="no prompts"):
        head_to_head([], [], [], [])


def test_length_summary():
    assert length_summary(list(range(1, 101))) == {"mean": 50.5, "p95": 95.05}
    assert length_summary([]) == {"mean": None, "p95": None}
