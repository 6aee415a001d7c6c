"""Stage `report`: one `metrics/eval.json` as `{model: {metric: value}}` and the printed table.

Models in pipeline order: `sft`, each round's policy after the promotion gate, `merged`. A round
the gate refused shows the policy it kept, with the refused candidate's own row (`<round>*`) below it;
rounds the collapse guard marked are flagged. `make demo` ends by re-running this stage alone to print
the table (deterministic: the same metrics file, unchanged dvc.lock).
"""

from __future__ import annotations

from pathlib import Path

from tasks.lib.files import read_json, write_json
from tasks.lib.schema import Params
from tasks.lib.stage import stage_main

COLUMNS = (
    "preference_accuracy", "task_accuracy", "correct", "polite", "chosen_nll", "perplexity", "win_rate_vs_sft",
    "kl_to_sft",
)  # fmt: skip
"""The printed table's columns; metrics/eval.json holds every metric of the eval stages."""
DECISION_KEYS = ("promoted", "source", "reasons", "candidate", "started_from")


def collect(params: Params, evals: Path) -> dict[str, dict[str, float]]:
    """Metrics of every model in pipeline order; a refused round's candidate follows as `<round>*`."""
    names = ["sft", *params.dpo.rounds, "merged"]
    missing = [name for name in names if not (evals / f"{name}.json").exists()]
    if missing:
        raise FileNotFoundError(f"no evaluation for {', '.join(missing)} in {evals}")
    scores = {}
    for name in names:
        evaluation = read_json(evals / f"{name}.json")
        scores[name] = {key: value for key, value in evaluation.items() if key not in DECISION_KEYS}
        if evaluation.get("promoted") is False:
            scores[f"{name}*"] = evaluation["candidate"]
    return scores


def round_notes(params: Params, evals: Path, metrics: Path) -> dict[str, str]:
    """Per round: the gate's decision and the collapse guard's verdict."""
    notes = {}
    for name in params.dpo.rounds:
        gate, guard = evals / f"{name}.json", metrics / f"guard_{name}.json"
        if gate.exists():
            decision = read_json(gate)
            notes[name] = "promoted" if decision.get("promoted") else f"kept {decision.get('source')}"
            if not decision.get("promoted"):
                notes[f"{name}*"] = "refused"
        if guard.exists() and read_json(guard)["quality"] != "ok":
            notes[name] = notes.get(name, "") + " FAILED-QUALITY"
    return notes


def table(scores: dict[str, dict[str, float]], notes: dict[str, str]) -> str:
    columns = [c for c in COLUMNS if any(c in row for row in scores.values())]
    header = f"{'model':<8}" + "".join(f"{c:>20}" for c in columns) + f"{'gate':>24}"
    lines = [header, "-" * len(header)]
    for name, row in scores.items():
        cells = "".join(f"{row[c]:>20.4f}" if c in row else f"{'-':>20}" for c in columns)
        lines.append(f"{name:<8}{cells}{notes.get(name, ''):>24}")
    return "\n".join(lines)


def plot_rows(params: Params, scores: dict[str, dict[str, float]]) -> list[dict]:
    """One row per model in pipeline order (`position` 0 is SFT), for DVC's plots of metrics across rounds.

    Every row has every metric (null where a model has none, e.g. SFT's win rate against itself): DVC reads
    a plot file's fields from its first row and refuses rows that lack one.
    """
    names = ["sft", *params.dpo.rounds, "merged"]
    metrics = sorted({metric for name in names for metric in scores[name]})
    return [
        {"position": position, "model": name, **{metric: scores[name].get(metric) for metric in metrics}}
        for position, name in enumerate(names)
    ]


def write_report(params: Params, evals: Path, metrics: Path, out: Path, plot: Path) -> None:
    """Collect every model's metrics into `out` and print the table (the gate's decisions and guard flags beside it).

    Args:
        params: the pipeline's params
        evals: folder of per-model evaluations
        metrics: folder of the rounds' metrics
        out: `{model: {metric: value}}` (metrics/eval.json)
        plot: the same metrics as rows in pipeline order, for `dvc plots` (x: position)
    """
    scores = collect(params, evals)
    write_json(out, scores)
    write_json(plot, plot_rows(params, scores))
    notes = round_notes(params, evals, metrics)
    print(table(scores, notes))
    failed = [name for name, note in notes.items() if "FAILED-QUALITY" in note]
    if failed:
        print(
            f"\nWARNING: the collapse guard marked {', '.join(failed)} as failed-quality; "
            "see metrics/guard_<round>.json"
        )
    refused = [name for name, note in notes.items() if note.startswith("kept")]
    if refused:
        print(f"\nThe promotion gate refused {', '.join(refused)}; reasons in metrics/eval/<round>.json")


if __name__ == "__main__":
    stage_main(write_report)
