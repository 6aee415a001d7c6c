"""Benchmark: does each round make the model better, over several seeds? (`make bench-alignment`)

For each task (`builtin`: the demo's addition task with its rule judge; `stories`: llama2.c's pretrained
stories260K from ../shared/real with the graded function judge `benchmarks.story_judge:graded`), one clean clone
of the committed project runs `dvc repro` with `--rounds` on-policy rounds (r1, r2, ...; each starts from the
round before, the reference is the frozen SFT policy) once per seed. The seed sets `onpolicy.prompts.seed` (which
fresh prompts each round draws), `onpolicy.generate.seed` (the sampled responses, hence the pairs) and
`dpo.train.seed` (LoRA initialisation and pair order). The SFT policy, the held-out data and the eval's own KL
samples are the same for every seed: one SFT per task, restored from DVC's run-cache after the first seed.

Per task it reports, for sft, r1, r2, ... (each round's policy after its gate), the mean, standard deviation and
per-seed values of every eval metric, and each seed's gate decisions, as a table and in `--out`
(reports/alignment.json):

    {"tasks": {"<task>": {"models": ["sft", "r1", ...], "seeds": [...],
                          "metrics": {"<metric>": {"mean": [...], "sd": [...], "per_seed": [[...], ...]}},
                          "promoted": [[true, ...], ...], "gate_reasons": [[[...], ...], ...],
                          "overrides": {...}, "variant": "default"}}}

`--variant NAME:key=value,key=value` (repeatable) also runs each variant's params over the same seeds in the same
clone (its SFT restored), for the README's ablation table; variants land under `"ablations"`. Two pseudo-keys shape
the rounds: `rounds.reference=previous` (each round's reference is the policy it starts from) and
`rounds.lr_decay=F` (round k's learning rate is `dpo.train.learning_rate` x F^(k-1)).

    .venv/bin/python benchmarks/alignment.py [--seeds 0,1,2] [--rounds 3] [--tasks builtin,stories]
        [--set dpo.train.learning_rate=1e-4] [--variant lr1e-4:dpo.train.learning_rate=1e-4]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from onpolicy import clone, timed_run  # noqa: E402  (the clean-clone helpers)

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("builtin", "stories")
SEEDED = ("onpolicy.prompts.seed", "onpolicy.generate.seed", "dpo.train.seed")
TABLE_METRICS = {
    "builtin": ("correct", "task_accuracy", "polite", "chosen_nll", "win_rate_vs_sft", "lc_win_rate_vs_sft"),
    "stories": ("judge_score_mean", "chosen_nll", "text_nll", "win_rate_vs_sft", "answer_tokens_mean"),
}


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`key=value` strings as {dotted key: YAML value}."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"override {item!r}: expected key=value")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # YAML 1.1 reads 2e-4 as a string
            with contextlib.suppress(ValueError):
                parsed = float(parsed)
        overrides[key.strip()] = parsed
    return overrides


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    name, sep, body = text.partition(":")
    if not sep or not name:
        raise SystemExit(f"--variant {text!r}: expected NAME:key=value,key=value")
    # Split at the commas that start another key=, not those inside a value such as [1.0,3.0].
    return name, parse_overrides([part for part in re.split(r",(?=[\w.+]+=)", body) if part])


def set_key(params: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = params
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


ROUND_KEYS = ("rounds.reference", "rounds.lr_decay")
"""Pseudo-keys of a variant that shape the round chain: `rounds.reference=previous` (each round's reference is the
policy it starts from, not SFT), `rounds.lr_decay=0.5` (round k's learning rate is dpo.train's x 0.5^(k-1))."""


def round_chain(rounds: int, params: dict, shape: dict[str, Any]) -> dict[str, dict[str, Any]]:
    names = [f"r{index}" for index in range(1, rounds + 1)]
    chain = {}
    for i, name in enumerate(names):
        previous = "sft" if i == 0 else names[i - 1]
        spec: dict[str, Any] = {"previous": previous, "reference": previous if shape.get("rounds.reference") else "sft"}
        if shape.get("rounds.lr_decay") and i > 0:
            spec["learning_rate"] = params["dpo"]["train"]["learning_rate"] * shape["rounds.lr_decay"] ** i
        chain[name] = spec
    return chain


def configure_task(project: Path, task: str, real: Path) -> None:
    if task == "stories":
        from stories import configure

        configure(project, real)


def run_seed(project: Path, base_params: dict, rounds: int, seed: int, overrides: dict[str, Any]) -> dict:
    """One seed's pipeline: params written, `dvc repro` under a warm server, the models' metrics read back."""
    params = json.loads(json.dumps(base_params))
    for key in SEEDED:
        set_key(params, key, seed)
    for key, value in overrides.items():
        if key not in ROUND_KEYS:
            set_key(params, key, value)
    params["dpo"]["rounds"] = round_chain(rounds, params, {k: v for k, v in overrides.items() if k in ROUND_KEYS})
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    seconds = timed_run([sys.executable, "-m", "tasks.lib.warm", "--", sys.executable, "-m", "dvc", "repro"], project)
    evals = project / "metrics" / "eval"
    models = {"sft": json.loads((evals / "sft.json").read_text())}
    candidates = {"sft": models["sft"]}
    promoted, reasons = [], []
    for name in params["dpo"]["rounds"]:
        gate = json.loads((evals / f"{name}.json").read_text())
        models[name] = {k: v for k, v in gate.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        candidates[name] = gate["candidate"]
        promoted.append(bool(gate["promoted"]))
        reasons.append(gate.get("reasons", []))
    return {"models": models, "candidates": candidates, "promoted": promoted, "reasons": reasons, "seconds": seconds}


def metric_summary(runs: list[dict], which: str) -> dict[str, dict]:
    """{metric: {mean, sd, per_seed}} over the runs' `which` models ("models": after the gates; "candidates")."""
    models = list(runs[0][which])
    names = sorted({metric for run in runs for model in run[which].values() for metric in model})
    metrics = {}
    for metric in names:
        per_seed = [[run[which][model].get(metric) for model in models] for run in runs]
        columns = list(zip(*per_seed, strict=True))
        mean = [statistics.fmean(c) if None not in c else None for c in columns]
        sd = [statistics.stdev(c) if None not in c and len(c) > 1 else None for c in columns]
        metrics[metric] = {"mean": mean, "sd": sd, "per_seed": per_seed}
    return metrics


def summarise(runs: list[dict], seeds: list[int]) -> dict:
    return {
        "models": list(runs[0]["models"]),
        "seeds": seeds,
        "metrics": metric_summary(runs, "models"),
        # Each round's trained candidate, promoted or not (a refused round's policy above is its starting one).
        "candidate_metrics": metric_summary(runs, "candidates"),
        "promoted": [run["promoted"] for run in runs],
        # Why each refused round was refused (the gate's reasons; empty lists for promoted rounds), per seed.
        "gate_reasons": [run["reasons"] for run in runs],
        "seconds": [round(run["seconds"], 1) for run in runs],
    }


def table(task: str, result: dict) -> str:
    models = result["models"]
    lines = [f"| {task} | " + " | ".join(models) + " |", "|---" * (len(models) + 1) + "|"]
    for metric in TABLE_METRICS[task]:
        if metric not in result["metrics"]:
            continue
        values = result["metrics"][metric]
        cells = [
            "-" if mean is None else f"{mean:.4f}" + ("" if sd is None else f" ± {sd:.4f}")
            for mean, sd in zip(values["mean"], values["sd"], strict=True)
        ]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    for metric in TABLE_METRICS[task][:1]:
        values = result["candidate_metrics"][metric]
        cells = [f"{mean:.4f} ± {sd or 0:.4f}" for mean, sd in zip(values["mean"], values["sd"], strict=True)]
        lines.append(f"| {metric} (candidate) | " + " | ".join(cells) + " |")
    promoted = [sum(seed[i] for seed in result["promoted"]) for i in range(len(models) - 1)]
    lines.append("| promoted (seeds) | - | " + " | ".join(f"{n}/{len(result['seeds'])}" for n in promoted) + " |")
    return "\n".join(lines)


def run_task(task: str, args, variants: list[tuple[str, dict]], scratch: Path) -> dict[str, dict]:
    project = clone(scratch / task, scratch / "cache")
    configure_task(project, task, args.real)
    base_params = yaml.safe_load((project / "params.yaml").read_text())
    results = {}
    for name, overrides in variants:
        started = time.perf_counter()
        runs = [run_seed(project, base_params, args.rounds, seed, overrides) for seed in args.seeds]
        results[name] = {**summarise(runs, args.seeds), "variant": name, "overrides": overrides}
        print(f"\n{task}, {name} ({overrides or 'the committed params'}; {time.perf_counter() - started:.0f} s):")
        print(table(task, results[name]), flush=True)
        for seed, rounds in zip(args.seeds, results[name]["gate_reasons"], strict=True):
            for round_name, reasons in zip(results[name]["models"][1:], rounds, strict=True):
                if reasons:
                    print(f"  seed {seed} {round_name} refused: {'; '.join(reasons)}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2", type=lambda text: [int(s) for s in text.split(",")])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tasks", default=",".join(TASKS), type=lambda text: text.split(","))
    parser.add_argument("--set", action="append", default=[], help="key=value over the committed params (all runs)")
    parser.add_argument("--variant", action="append", default=[], help="NAME:key=value,... also run (ablation)")
    parser.add_argument("--no-default", action="store_true", help="run only the variants")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "alignment.json")
    parser.add_argument(
        "--real", type=Path, default=Path(os.environ.get("SFT_DPO_REAL_ARTIFACTS", ROOT.parent / "shared" / "real"))
    )
    args = parser.parse_args()
    unknown = [task for task in args.tasks if task not in TASKS]
    if unknown:
        raise SystemExit(f"--tasks: unknown {unknown} (known: {', '.join(TASKS)})")
    if "stories" in args.tasks and not (args.real / "models" / "stories260K").is_dir():
        raise SystemExit(f"no stories260K under {args.real} (set SFT_DPO_REAL_ARTIFACTS or --tasks builtin)")
    common = parse_overrides(args.set)
    variants = [] if args.no_default else [("default", dict(common))]
    variants += [(name, {**common, **overrides}) for name, overrides in map(parse_variant, args.variant)]
    report: dict[str, Any] = {"tasks": {}, "ablations": {}, "rounds": args.rounds, "seeded": list(SEEDED)}
    with tempfile.TemporaryDirectory(prefix="sftdpo-bench-alignment-") as scratch:
        for task in args.tasks:
            results = run_task(task, args, variants, Path(scratch))
            if "default" in results:
                report["tasks"][task] = results.pop("default")
            if results:
                report["ablations"][task] = results
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
