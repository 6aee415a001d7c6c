"""Benchmark: two on-policy rounds of n pairs against one offline round of 2n pairs.

Both arms run the committed pipeline (`dvc repro`) in clean clones with the same params and seeds
and share one DVC cache, so they start from the same SFT policy (the second arm restores it from
DVC's run-cache). They differ only in their preference data:
- on-policy (the default params): rounds r1 and r2, each sampling `onpolicy.generate` responses to
  n = `onpolicy.prompts.per_round` fresh prompts from the round's starting policy, judged by the rule
  judge, best vs worst (at most n pairs per round);
- offline: one round r1 trained on the first 2n of the shipped offline pairs
  (data/builtin/pairs_r1.jsonl, then pairs_r2.jsonl), dropped in as the round's human pairs with no
  prompts drawn.
Prints, per model, the pairs it was trained on and its held-out metrics (lm-eval, metrics/eval.json);
`correct` is the metric offline pairs did not move.

    .venv/bin/python benchmarks/onpolicy.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("task_accuracy", "correct", "polite", "preference_accuracy", "perplexity")
OFFLINE_SOURCES = ("data/builtin/pairs_r1.jsonl", "data/builtin/pairs_r2.jsonl")


def environment(project: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_SITE_CACHE_DIR": str(project / ".dvc" / "site_cache"),
        "DVC_NO_ANALYTICS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def clone(target: Path, cache: Path) -> Path:
    subprocess.run(["git", "clone", "-q", str(ROOT), str(target)], check=True)
    subprocess.run(
        [sys.executable, "-m", "dvc", "cache", "dir", "--local", str(cache)],
        cwd=target,
        check=True,
        env=environment(target),
    )
    return target


def timed_run(command: list[str], project: Path, env: dict[str, str] | None = None) -> float:
    """Wall seconds of `command` in `project` (environment: `environment(project)`); exits with its output if it
    fails."""
    started = time.perf_counter()
    result = subprocess.run(command, cwd=project, env=env or environment(project), capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def make_offline(project: Path, pairs: int) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["dpo"]["rounds"] = {"r1": params["dpo"]["rounds"]["r1"]}
    params["onpolicy"]["prompts"]["per_round"] = 0
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    lines = [line for source in OFFLINE_SOURCES for line in (project / source).read_text().splitlines() if line.strip()]
    if len(lines) < pairs:
        sys.exit(f"only {len(lines)} offline pairs shipped; the offline arm needs {pairs}")
    (project / "data" / "incoming" / "r1.jsonl").write_text("\n".join(lines[:pairs]) + "\n")


def reproduce(project: Path) -> float:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "dvc", "repro"], cwd=project, env=environment(project), capture_output=True, text=True
    )
    if result.returncode != 0:
        sys.exit(f"dvc repro failed in {project}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def arm_rows(project: Path, arm: str) -> list[dict]:
    params = yaml.safe_load((project / "params.yaml").read_text())
    rows, trained = [], 0
    for name in params["dpo"]["rounds"]:
        trained += json.loads((project / "metrics" / "rounds" / name / "pairs.json").read_text())["pairs"]
        gate = json.loads((project / "metrics" / "eval" / f"{name}.json").read_text())
        rows.append({"model": f"{arm} {name}", "pairs": trained, "promoted": gate["promoted"], **gate["candidate"]})
    return rows


def table(rows: list[dict]) -> str:
    header = f"| model | pairs trained on | promoted | {' | '.join(METRICS)} |"
    lines = [header, "|" + " --- |" * (3 + len(METRICS))]
    for row in rows:
        cells = " | ".join(f"{row[m]:.4f}" if m != "perplexity" else f"{row[m]:.1f}" for m in METRICS)
        promoted = "" if row["promoted"] is None else "yes" if row["promoted"] else "no"
        lines.append(f"| {row['model']} | {row['pairs']} | {promoted} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    per_round = yaml.safe_load((ROOT / "params.yaml").read_text())["onpolicy"]["prompts"]["per_round"]
    with tempfile.TemporaryDirectory(prefix="sftdpo-bench-onpolicy-") as scratch:
        scratch = Path(scratch)
        cache = scratch / "cache"
        onpolicy = clone(scratch / "onpolicy", cache)
        onpolicy_seconds = reproduce(onpolicy)
        offline = clone(scratch / "offline", cache)
        make_offline(offline, 2 * per_round)
        offline_seconds = reproduce(offline)
        sft = json.loads((onpolicy / "metrics" / "eval.json").read_text())["sft"]
        rows = [{"model": "sft", "pairs": 0, "promoted": None, **sft}]
        rows += arm_rows(offline, "offline") + arm_rows(onpolicy, "on-policy")
    print(f"n = {per_round} prompts per on-policy round; offline: {2 * per_round} pairs in one round")
    print(f"dvc repro: on-policy arm {onpolicy_seconds:.0f} s, offline arm {offline_seconds:.0f} s (SFT restored)\n")
    print(table(rows))
    best = {arm: max(r["correct"] for r in rows if r["model"].startswith(arm)) for arm in ("offline", "on-policy")}
    final = {arm: [r for r in rows if r["model"].startswith(arm)][-1]["correct"] for arm in ("offline", "on-policy")}
    print(
        f"\ncorrect after the last round: on-policy {final['on-policy']:.4f} vs offline {final['offline']:.4f} "
        f"(sft {sft['correct']:.4f}); best round: on-policy {best['on-policy']:.4f} vs offline {best['offline']:.4f}"
    )


if __name__ == "__main__":
    main()
