"""Benchmark: a real pretrained model learns. llama2.c's stories260K (MIT; ../shared/real) through the whole pipeline.

The committed pipeline (`dvc repro`) runs in a clean clone with `model.base` pointing at the shared
`models/stories260K` folder (a real pretrained 260k-parameter Llama with its 512-token SentencePiece tokenizer
and no chat template, so every row is a plain string) and a `function` judge, `benchmarks/story_judge.py:graded`
(cheerful words with diminishing returns, a gloomy word costs, a complete sentence adds, length past 12 words
costs; `story_judge:score` is the older one-keyword judge). Its data are TinyStories-like
openings made here (seeded): SFT continuations pair one of nine actions with one of seven moods ("He smiled and was
very sad."), so a cheerful action and a happy mood together are rare; rounds sample from the policy, judge, pair
and train with DPO. Prints the judge's mean
score of each model's greedy continuations of held-out openings, its win rate against SFT (95 % interval,
length-controlled) and the per-token NLL of the held-out openings (plain story text: forgetting).

    .venv/bin/python benchmarks/stories.py [--real ../shared/real]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from onpolicy import clone, reproduce  # noqa: E402  (the other benchmark's clean-clone helpers)

ROOT = Path(__file__).resolve().parents[1]
NAMES = (
    "Lily", "Tom", "Sue", "Ben", "Mia", "Max", "Anna", "Tim", "Lucy", "Sam", "Zoe", "Jack", "Emma", "Leo", "Rose",
    "Bob",
)  # fmt: skip
GIRLS = frozenset(NAMES[::2])
THINGS = (
    "a red ball", "a big tree", "a little dog", "a shiny star", "a blue boat", "a soft cat", "a tall hill",
    "a green frog", "a yellow kite", "a small bird",
)  # fmt: skip
PLACES = (
    "the park", "the garden", "the beach", "the forest", "the shop", "the lake", "school", "the yard", "the farm",
    "the river",
)  # fmt: skip
SFT_ROWS, HELDOUT, POOL = 300, 200, 600
"""Distinct openings (of 1,600 possible) for SFT, held-out pairs (one question = 0.005) and the prompt pool (three
rounds of 160 fresh prompts each)."""
MOODS = ("sad", "tired", "scared", "sleepy", "angry", "hungry")
PLAIN_ACTIONS = ("looked at it", "picked it up", "sat down", "ran home", "walked away", "went to bed")
CHEERFUL_ACTIONS = ("smiled", "played with it", "played with a friend")
ACTIONS = PLAIN_ACTIONS + CHEERFUL_ACTIONS
"""SFT pairs any action with any mood, so its samples span the graded judge's ladder: a gloomy mood 0, happy 1.5,
happy after one cheerful action word 2.0, after two (`played with a friend`) 2.25. Each rung is rarer in SFT's
samples than the one below, which leaves every round something better to find."""


def opening(rng: random.Random) -> tuple[str, str]:
    """An opening and the pronoun of its child."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    text = f"Once upon a time, there was a little child named {name}. {name} saw {thing} in {rng.choice(PLACES)}."
    return text, "She" if name in GIRLS else "He"


def continuation(rng: random.Random, pronoun: str, happy: bool | None = None) -> str:
    """One sentence about the opening's child, `<She|He> <action> and was very <mood>.`: any action and mood (None,
    SFT), the judge's top rung `played with a friend ... happy` (True, held-out chosen: so task accuracy, an exact
    match, is the share of openings where the policy found it) or a plain action and a gloomy mood (False)."""
    if happy is None:
        action, mood = rng.choice(ACTIONS), rng.choice(("happy", *MOODS))
    elif happy:
        action, mood = CHEERFUL_ACTIONS[-1], "happy"
    else:
        action, mood = rng.choice(PLAIN_ACTIONS), rng.choice(MOODS)
    return f" {pronoun} {action} and was very {mood}."


def write_data(project: Path, seed: int = 0) -> dict[str, str]:
    """SFT rows (any action, any mood), held-out pairs (the top rung vs a plain action and a gloomy mood) and a
    prompt pool, as string rows."""
    rng = random.Random(seed)
    folder = project / "data" / "stories"
    folder.mkdir(parents=True)
    openings = sorted({opening(rng) for _ in range(5000)})
    rng.shuffle(openings)
    sft, heldout = openings[:SFT_ROWS], openings[SFT_ROWS : SFT_ROWS + HELDOUT]
    pool = openings[SFT_ROWS + HELDOUT : SFT_ROWS + HELDOUT + POOL]
    files = {
        "sft": [{"prompt": p, "completion": continuation(rng, pronoun)} for p, pronoun in sft],
        "eval_pairs": [
            {"prompt": p, "chosen": continuation(rng, pronoun, True), "rejected": continuation(rng, pronoun, False)}
            for p, pronoun in heldout
        ],
        "prompts": [{"prompt": p} for p, _ in pool],
    }
    paths = {}
    for name, rows in files.items():
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        paths[name] = str(path.relative_to(project))
    return paths


def configure(project: Path, real: Path, judge: str = "graded") -> None:
    paths = write_data(project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["model"]["base"] = str((real / "models" / "stories260K").resolve())
    params["data"].update(sft=paths["sft"], eval_pairs=paths["eval_pairs"])
    params["sft"]["train"].update(learning_rate=0.001, epochs=2)
    # A pretrained model takes a lower DPO learning rate than the built-in one trained from scratch: at the committed
    # 1e-3 every stories round forgot and was refused; at 1e-4 round 1 reached 2.20 of the judge's 2.25 and every r3
    # was refused; 5e-5 rose every round in every seed with all 9 rounds promoted (README, 3 seeds).
    params["dpo"]["train"]["learning_rate"] = 5e-5
    params["dpo"]["train"]["epochs"] = 2  # what those 3 seeds were measured with (the built-in task's default is 1.5)
    # Replay off, as those seeds were measured: with the built-in task's full replay (1.0) round 2 rose higher (judge
    # 2.215 vs 2.184) but round 3, training 2 epochs on three rounds' pairs, drifted off the top sentence in every seed
    # and was refused (README).
    params["onpolicy"]["pairs"]["replay_fraction"] = 0.0
    params["onpolicy"]["prompts"].update(pool=paths["prompts"], per_round=160)
    # The longest continuation is 16 tokens on stories260K's tokenizer; 20 leaves room for the end of text.
    params["onpolicy"]["generate"]["max_new_tokens"] = 20
    params["onpolicy"]["judge"] = {"kind": "function", "function": f"benchmarks.story_judge:{judge}"}
    params["eval"]["max_new_tokens"] = 20
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--real", type=Path, default=Path(os.environ.get("SFT_DPO_REAL_ARTIFACTS", ROOT.parent / "shared" / "real"))
    )
    args = parser.parse_args()
    if not (args.real / "models" / "stories260K").is_dir():
        sys.exit(f"no stories260K under {args.real} (set SFT_DPO_REAL_ARTIFACTS)")
    with tempfile.TemporaryDirectory(prefix="sftdpo-bench-stories-") as scratch:
        project = clone(Path(scratch) / "project", Path(scratch) / "cache")
        configure(project, args.real)
        seconds = reproduce(project)
        scores = json.loads((project / "metrics" / "eval.json").read_text())
        rounds = list(yaml.safe_load((project / "params.yaml").read_text())["dpo"]["rounds"])
        gates = {name: json.loads((project / "metrics" / "eval" / f"{name}.json").read_text()) for name in rounds}
    print(
        f"stories260K, {len(rounds)} on-policy rounds, function judge benchmarks/story_judge.py:graded; "
        f"dvc repro {seconds:.0f} s\n"
    )
    print(
        f"| model | judge score (greedy, {HELDOUT} held-out openings) | win rate vs SFT [95 % CI] | LC win rate | "
        "story-text NLL | promoted |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for name, row in scores.items():
        if name.endswith("*"):
            continue
        win = (
            f"{row['win_rate_vs_sft']:.3f} [{row['win_rate_vs_sft_ci_low']:.3f}, {row['win_rate_vs_sft_ci_high']:.3f}]"
            if "win_rate_vs_sft" in row
            else "-"
        )
        lc = f"{row['lc_win_rate_vs_sft']:.3f}" if "lc_win_rate_vs_sft" in row else "-"
        promoted = (
            ("yes" if gates[name]["promoted"] else "no: " + "; ".join(gates[name]["reasons"])) if name in gates else ""
        )
        print(f"| {name} | {row['judge_score_mean']:.3f} | {win} | {lc} | {row.get('text_nll', 0):.3f} | {promoted} |")


if __name__ == "__main__":
    main()
