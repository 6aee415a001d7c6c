"""Seeded generator of the built-in task's data (committed under data/builtin/).

The task: single-digit addition asked in several phrasings. An answer can be
*correct* ("The answer is 7.") and, independently, *polite* (it ends with
"Happy to help!"). SFT data is polite only half the time, and it is not always
right: like demonstrations from a careless annotator, 30 of the 55 sums
(a + b in either order) have one wrong total (off by one) that about half of
their SFT rows give. So the SFT model answers in a mixed style and gets those
sums wrong about as often as right; only the rule verifier
(``tasks.lib.builtin_task``), which scores both properties of each sampled
answer, can tell the rounds which of its answers are the right ones. A sum that
SFT never shows stays wrong (measured, seed 0: with 22 sums hidden from SFT,
greedy correct 0.0 on their 77 held-out questions at SFT and after each of
three rounds: the policy never samples them right), so the noise is
what leaves the verifier something to find. Preference pairs always choose the
correct polite answer and reject an answer that breaks exactly one of the two
properties. ``prompts.jsonl`` is the pool the on-policy rounds sample their
questions from (the SFT questions, so it holds no held-out fact x phrasing).

Held-out facts x phrasings never appear in SFT or DPO training data. There are 800 of them (100 facts x 8
phrasings): 200 are held out, so one held-out question is 0.005 of an accuracy; SFT takes 320 of the other 600
and the prompt pool is all 600, so three on-policy rounds of 160 prompts draw fresh questions each round.

    python data/generate.py --out data/builtin --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

PHRASINGS = (
    "What is {a} plus {b}?",
    "Add {a} and {b}.",
    "Compute {a} + {b}.",
    "What do you get when you add {a} to {b}?",
    "What is {a} + {b}?",
    "Please add {a} and {b}.",
    "Compute {a} plus {b}.",
    "Can you add {a} to {b}?",
)
POLITE_SUFFIX = " Happy to help!"
ROUNDS = ("r1", "r2", "r3", "r4")


def answer(total: int, polite: bool) -> str:
    return f"The answer is {total}." + (POLITE_SUFFIX if polite else "")


def wrong_total(total: int, rng: random.Random) -> int:
    delta = rng.choice((-2, -1, 1, 2))
    wrong = max(0, total + delta)
    # 0 - 1 clamps back to 0, which is the right answer: step up instead, so no pair is degenerate.
    return wrong if wrong != total else total + abs(delta)


def user(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def preference_pair(a: int, b: int, phrasing: str, rng: random.Random) -> dict:
    total = a + b
    breaks_style = rng.random() < 0.5
    rejected = answer(total, False) if breaks_style else answer(wrong_total(total, rng), True)
    return {
        "prompt": user(phrasing.format(a=a, b=b)),
        "chosen": assistant(answer(total, True)),
        "rejected": assistant(rejected),
    }


def fact(a: int, b: int) -> tuple[int, int]:
    """A sum in either order: SFT answering 3 + 5 teaches 5 + 3 (measured), so noise is per unordered pair."""
    return min(a, b), max(a, b)


def sft_misconceptions(count: int, rng: random.Random) -> dict[tuple[int, int], int]:
    """`count` sums, each with the one wrong total its noisy SFT rows give (off by one, never negative)."""
    facts = sorted({fact(a, b) for a in range(10) for b in range(10)})
    return {(a, b): a + b + 1 if a + b == 0 else a + b + rng.choice((-1, 1)) for a, b in rng.sample(facts, count)}


def generate(
    out_dir: Path, seed: int, heldout: int, sft_rows: int, pairs_per_round: int, noisy_facts: int, noise: float
) -> None:
    rng = random.Random(seed)
    combos = [(a, b, p) for a in range(10) for b in range(10) for p in PHRASINGS]
    rng.shuffle(combos)
    heldout_combos, train_combos = combos[:heldout], combos[heldout:]
    misconceptions = sft_misconceptions(noisy_facts, random.Random(f"{seed}-misconceptions"))
    noise_rng = random.Random(f"{seed}-noise")

    def sft_total(a: int, b: int) -> int:
        wrong = misconceptions.get(fact(a, b))
        return wrong if wrong is not None and noise_rng.random() < noise else a + b

    sft = [
        {"messages": user(p.format(a=a, b=b)) + assistant(answer(sft_total(a, b), rng.random() < 0.5))}
        for a, b, p in train_combos[:sft_rows]
    ]
    eval_pairs = [preference_pair(a, b, p, rng) for a, b, p in heldout_combos]
    files = {"sft.jsonl": sft, "eval_pairs.jsonl": eval_pairs}
    for name in ROUNDS:
        round_combos = rng.sample(train_combos, pairs_per_round)
        files[f"pairs_{name}.jsonl"] = [preference_pair(a, b, p, rng) for a, b, p in round_combos]
    # The on-policy rounds' prompt pool: the training questions only, never a held-out one.
    files["prompts.jsonl"] = [{"prompt": user(p.format(a=a, b=b))} for a, b, p in train_combos]

    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        with open(out_dir / name, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"{out_dir / name}: {len(rows)} rows")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "builtin")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heldout", type=int, default=200, help="fact x phrasing combinations kept out of training")
    parser.add_argument("--sft-rows", type=int, default=320, help="SFT rows, from the combinations not held out")
    parser.add_argument("--pairs-per-round", type=int, default=200)
    parser.add_argument("--noisy-facts", type=int, default=30, help="of the 55 sums, how many SFT sometimes gets wrong")
    parser.add_argument("--noise", type=float, default=0.5, help="share of a noisy sum's SFT answers that are wrong")
    args = parser.parse_args()
    generate(args.out, args.seed, args.heldout, args.sft_rows, args.pairs_per_round, args.noisy_facts, args.noise)


if __name__ == "__main__":
    main()
