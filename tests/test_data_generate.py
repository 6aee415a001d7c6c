"""data/generate.py: the committed built-in data is its output, and its noisy SFT sums are what it says."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from tasks.lib.builtin_task import ANSWER, QUESTION

ROOT = Path(__file__).resolve().parents[1]


def load_generator():
    spec = importlib.util.spec_from_file_location("builtin_data_generator", ROOT / "data" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sft_answers(path: Path) -> dict[tuple[int, int], list[int]]:
    """{sum as (smaller, larger): the totals its SFT rows answer}."""
    answers = defaultdict(list)
    for line in path.read_text().splitlines():
        user, assistant = json.loads(line)["messages"]
        a, b = map(int, QUESTION.search(user["content"]).groups())
        answers[min(a, b), max(a, b)].append(int(ANSWER.search(assistant["content"]).group(1)))
    return answers


def test_the_committed_builtin_data_is_the_generators_output(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "data" / "generate.py"), "--out", str(tmp_path)], check=True)
    committed = sorted(path.name for path in (ROOT / "data" / "builtin").glob("*.jsonl"))
    assert committed == sorted(path.name for path in tmp_path.glob("*.jsonl"))
    for name in committed:
        assert (tmp_path / name).read_bytes() == (ROOT / "data" / "builtin" / name).read_bytes(), name


def test_noisy_sums_give_their_one_misconception_and_the_others_are_always_right(tmp_path):
    generator = load_generator()
    generator.generate(tmp_path, seed=3, heldout=200, sft_rows=320, pairs_per_round=8, noisy_facts=20, noise=0.5)
    misconceptions = generator.sft_misconceptions(20, generator.random.Random("3-misconceptions"))
    wrong = right_on_noisy = 0
    for fact, totals in sft_answers(tmp_path / "sft.jsonl").items():
        if fact not in misconceptions:
            assert set(totals) == {sum(fact)}, fact
            continue
        assert set(totals) <= {sum(fact), misconceptions[fact]}, fact
        assert abs(misconceptions[fact] - sum(fact)) == 1 and misconceptions[fact] >= 0
        wrong += sum(total != sum(fact) for total in totals)
        right_on_noisy += sum(total == sum(fact) for total in totals)
    assert 0.35 < wrong / (wrong + right_on_noisy) < 0.65, "about half of a noisy sum's SFT answers are wrong"
    for line in (tmp_path / "eval_pairs.jsonl").read_text().splitlines():
        pair = json.loads(line)
        a, b = map(int, QUESTION.search(pair["prompt"][0]["content"]).groups())
        assert ANSWER.search(pair["chosen"][0]["content"]).group(1) == str(a + b), "held-out preferences stay right"


def test_no_noise_means_every_sft_answer_is_right(tmp_path):
    load_generator().generate(tmp_path, seed=3, heldout=200, sft_rows=320, pairs_per_round=8, noisy_facts=0, noise=0.5)
    for fact, totals in sft_answers(tmp_path / "sft.jsonl").items():
        assert set(totals) == {sum(fact)}
