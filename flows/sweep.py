"""Sweeps: a grid over params keys, each point one DVC experiment sharing every output its params do not change.

DVC does the work: each point is one `dvc exp run --temp --set-param key=value ...`, run in DVC's own temporary
workspace (the user's working tree is never written), and a stage whose dependencies and params a point does not
change is restored from DVC's run-cache instead of re-run (data, SFT, the reference, its log-probs, round 1's
samples for a key only DPO reads). The first point runs alone to fill that cache, the others `--jobs` at a time
(default 2), all with warm stage processes (tasks/lib/warm.py). Results land in `dvc exp show` and on the eval
dashboard's runs panel.

    python -m flows.sweep dpo.loss.beta=0.05,0.1,0.5 [dpo.train.learning_rate=1e-4,5e-4] [--jobs 2]  (make sweep)
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from flows.dvc_project import SUMMARY_STAGE, read_graph, run_dvc, stage_environment, with_git_identity
from flows.lockfile import recover_after_kill
from tasks.lib.params import ParamsError, load_params
from tasks.lib.warm import warm_stages

PARAMS_FILE = "params.yaml"
HEADLINE = ("task_accuracy", "preference_accuracy", "win_rate_vs_sft", "kl_to_sft")
"""The merged model's metrics shown per point (every metric is in `dvc exp show` and on the dashboard)."""


def parse_settings(arguments: list[str]) -> dict[str, list[Any]]:
    """`key=v1,v2` arguments as {key: [v1, v2]}, each value read as YAML (numbers, booleans, strings)."""
    settings: dict[str, list[Any]] = {}
    for argument in arguments:
        key, separator, values = argument.partition("=")
        if not separator or not key or not values:
            raise ParamsError(f"sweep: {argument!r}: expected key=value1,value2,...")
        settings[key] = [yaml.safe_load(value) for value in values.split(",")]
    return settings


def grid(settings: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the settings' values (the points run as experiments), in order."""
    keys = list(settings)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*settings.values())]


def check_points(root: Path, settings: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Validate every point with the params schema before anything runs; ParamsError names the bad one."""
    if not settings or any(not values for values in settings.values()):
        raise ParamsError("sweep: give at least one key with at least one value")
    points = grid(settings)
    for point in points:
        try:
            load_params(root / PARAMS_FILE, point)
        except ParamsError as error:
            raise ParamsError(f"sweep point {point}: {error}") from None
    return points


def _set_param(raw: dict, key: str, value: Any) -> str:
    """DVC's `--set-param` for one key; `+` adds a key params.yaml leaves to the schema's default."""
    node: Any = raw
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    prefix = "" if node is not None else "+"
    return f"{prefix}{key}={json.dumps(value)}"


def _dvc(root: Path, *arguments: str) -> subprocess.CompletedProcess:
    env = with_git_identity(root, stage_environment())
    env.setdefault("DVC_SITE_CACHE_DIR", str(root / ".dvc" / "site_cache"))  # absolute: experiments run elsewhere
    return run_dvc(root, *arguments, env=env)


def run_sweep(
    root: Path, settings: dict[str, list[Any]], targets: tuple[str, ...] = (), jobs: int = 2
) -> list[dict[str, Any]]:
    """Run each point of the grid as a DVC experiment; return its experiment and metrics.

    The first point runs alone: what every point shares (data, SFT, the reference, its log-probs, ...) then sits in
    DVC's run-cache, and the other points, `jobs` at a time, restore it instead of computing it again each.
    `targets`: the stages to reproduce (and what they depend on); none: the whole pipeline.
    """
    points = check_points(root, settings)
    for repaired in recover_after_kill(root):  # a killed sweep's points would otherwise show as running for ever
        print(repaired)
    if jobs < 1:
        raise ParamsError(f"sweep: jobs {jobs}: run at least one point at a time")
    raw = yaml.safe_load((root / PARAMS_FILE).read_text(encoding="utf-8"))
    before = set(_experiment_results(root))

    def run_point(point: dict[str, Any]) -> None:
        settings_given = [
            argument for key, value in point.items() for argument in ("--set-param", _set_param(raw, key, value))
        ]
        _dvc(root, "exp", "run", "--temp", *settings_given, *targets)

    with warm_stages(stage_environment()):
        run_point(points[0])
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            for done in [pool.submit(run_point, point) for point in points[1:]]:
                done.result()  # the first failure, after every point has finished or failed
    results = {name: row for name, row in _experiment_results(root).items() if name not in before}
    if len(results) != len(points):
        raise RuntimeError(f"sweep: {len(points)} points ran but {len(results)} experiments were recorded")
    return [{"experiment": name, **row} for name, row in results.items()]


def _experiment_results(root: Path) -> dict[str, dict[str, Any]]:
    """Every experiment `dvc exp show` knows: name -> its params and metrics files' data."""
    shown = json.loads(_dvc(root, "exp", "show", "--json").stdout or "[]")
    results = {}
    for commit in shown:
        for experiment in commit.get("experiments") or []:
            for revision in experiment.get("revs") or []:
                data = revision.get("data") or {}
                results[revision.get("name") or revision["rev"]] = {
                    "params": (data.get("params") or {}).get(PARAMS_FILE, {}).get("data") or {},
                    "metrics": {path: entry.get("data") for path, entry in (data.get("metrics") or {}).items()},
                }
    return results


def point_rows(root: Path, results: list[dict[str, Any]], settings: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """One row per point: its experiment, the swept keys' values and the merged model's headline metrics."""
    summary_file = read_graph(root).metric_files[SUMMARY_STAGE][0]
    rows = []
    for result in results:
        merged = (result["metrics"].get(summary_file) or {}).get("merged") or {}
        point = {key: dotted_value(result["params"], key) for key in settings}
        rows.append({"experiment": result["experiment"], **point, **{k: merged[k] for k in HEADLINE if k in merged}})
    return rows


def dotted_value(mapping: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        mapping = mapping.get(part, {}) if isinstance(mapping, dict) else {}
    return mapping


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("settings", nargs="+", metavar="KEY=V1,V2", help="a params key and the values to try")
    parser.add_argument("--project", type=Path, default=Path("."))
    parser.add_argument("--target", action="append", default=[], help="a stage to reproduce (default: all)")
    parser.add_argument("--jobs", type=int, default=2, help="points run at once after the first (default 2)")
    args = parser.parse_args()
    root = args.project.resolve()
    try:
        settings = parse_settings(args.settings)
        rows = point_rows(root, run_sweep(root, settings, tuple(args.target), args.jobs), settings)
    except ParamsError as error:
        sys.exit(f"invalid sweep:\n{error}")
    for row in rows:
        print(
            ", ".join(
                f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}" for key, value in row.items()
            )
        )


if __name__ == "__main__":
    main()
