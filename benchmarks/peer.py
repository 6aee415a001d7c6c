"""Benchmark: the demo as the pipeline runs it vs the same work as one plain script (`make bench-peer`).

Both arms start from the same inputs, a clean clone where `check_params`, `base` and `prepare` have run:
- pipeline: `dvc repro` of everything else in that clone (SFT, reference, two on-policy rounds of prompts,
  generate, judge, pairs, reference log-probs, DPO, eval of every policy with KL and win rates, gates,
  lineage, merge, report, dashboard), under `python -m tasks.lib.warm` as `make demo` runs it; with `--cold`
  also as plain `dvc repro`. Each repeat in a fresh clone with an empty DVC cache (nothing restored);
- plain: `benchmarks/plain_pipeline.py`, what a user would write instead (one process: SFTTrainer, then per
  round sample -> score -> pair -> DPOTrainer with the SFT model as reference -> lm-eval; no KL, win rates,
  guard, gate, lineage or dashboard).
Repeats alternate the arms; prints each wall, the medians and the ratios.

    .venv/bin/python benchmarks/peer.py [--repeats 3] [--cold]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from onpolicy import clone, timed_run  # noqa: E402  (the clean-clone helpers)

PLAIN = Path(__file__).resolve().with_name("plain_pipeline.py")
DVC = [sys.executable, "-m", "dvc"]


def prepared(folder: Path) -> Path:
    """A clean clone with an empty DVC cache where the inputs (`base`, `prepare`) are built."""
    project = clone(folder / "project", folder / "cache")
    timed_run([*DVC, "repro", "prepare"], project)
    return project


def pipeline_arm(scratch: Path, name: str, warm: bool) -> float:
    folder = scratch / name
    project = prepared(folder)
    repro = [*DVC, "repro"]
    wall = timed_run([sys.executable, "-m", "tasks.lib.warm", "--", *repro] if warm else repro, project)
    shutil.rmtree(folder)
    return wall


def plain_arm(inputs: Path, scratch: Path) -> float:
    out = scratch / "plain-out"
    wall = timed_run([sys.executable, str(PLAIN), "--project", str(inputs), "--out", str(out)], inputs)
    shutil.rmtree(out)
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cold", action="store_true", help="also time plain `dvc repro` (no warm stages)")
    args = parser.parse_args()
    arms = ["pipeline", "plain", *(["pipeline-cold"] if args.cold else [])]
    walls: dict[str, list[float]] = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory(prefix="sftdpo-bench-peer-") as scratch:
        scratch = Path(scratch)
        inputs = prepared(scratch / "inputs")
        for repeat in range(args.repeats):
            for arm in arms if repeat % 2 == 0 else arms[::-1]:
                if arm == "plain":
                    wall = plain_arm(inputs, scratch)
                else:
                    wall = pipeline_arm(scratch, f"{arm}-{repeat}", warm=arm == "pipeline")
                walls[arm].append(wall)
                print(f"repeat {repeat + 1}: {arm} {wall:.1f} s", flush=True)
    medians = {arm: statistics.median(values) for arm, values in walls.items()}
    print(f"\nmedians of {args.repeats}, from the same base model and prepared data:")
    for arm, median in medians.items():
        print(f"{arm:14} {median:6.1f} s   {median / medians['plain']:.2f}x the plain script")


if __name__ == "__main__":
    main()
