"""Stage `dashboard`: one self-contained offline page of what every round did to the model, and how runs compare.

`reports/dashboard.html` holds its charts as Vega-Lite specs drawn by Vega-Embed, whose JavaScript bundle
(vl-convert's, Vega + Vega-Lite + Vega-Embed) is inlined: the page opens from disk with no network.
Rendering is deterministic (sorted JSON, fixed element ids, no clock): the same inputs give the same bytes.
`reports/dashboard.md` is the page's headline (eval table, win rates, the main charts as inlined PNGs),
which the Prefect flow publishes as a markdown artifact.

Each panel reads files the pipeline's stages wrote; one that is missing (a run from an older version, a
round that never ran) leaves its panel saying what is missing instead of failing the page. A file that is
there but not valid JSON is an error naming it. The runs compared come from `dvc exp show --json`.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.lib.chat import last_content
from tasks.lib.errors import DataError
from tasks.lib.files import atomic_path
from tasks.lib.schema import SFT_POLICY, Params
from tasks.lib.stage import stage_main
from tasks.lib.vega import javascript_bundle

TEMPLATE = Path(__file__).parent / "templates" / "dashboard.html.j2"
SIDE_BY_SIDE_PROMPTS = 10
EVAL_COLUMNS = (
    "preference_accuracy",
    "task_accuracy",
    "correct",
    "polite",
    "perplexity",
    "chosen_nll",
    "text_nll",
    "win_rate_vs_sft",
    "lc_win_rate_vs_sft",
    "win_rate_vs_previous",
    "kl_to_sft",
    "judge_score_mean",
    "answer_tokens_mean",
)
METRIC_FAMILIES = {
    "accuracy": ("preference_accuracy", "task_accuracy", "correct", "polite"),
    "perplexity": ("perplexity",),
    "forgetting: held-out per-token NLL (nats)": ("chosen_nll", "text_nll"),
    "win rate": ("win_rate_vs_sft", "lc_win_rate_vs_sft", "win_rate_vs_previous", "lc_win_rate_vs_previous"),
    "KL to SFT": ("kl_to_sft",),
    "greedy answer length (tokens)": ("answer_tokens_mean", "answer_tokens_p95"),
    "judge score": ("judge_score_mean",),
}
TRAINING_CURVES = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)
HEADLINE_METRICS = ("task_accuracy", "preference_accuracy", "win_rate_vs_sft", "lc_win_rate_vs_sft", "kl_to_sft")


@dataclass
class Panel:
    """One section of the page: a title, how to read it, charts, tables, and what was missing."""

    id: str
    title: str
    how_to_read: str
    charts: list[dict] = field(default_factory=list)
    tables: list[dict] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class RunFiles:
    """Reads the run's files; a missing one is noted (the panel says so), an unreadable one is an error."""

    def __init__(self):
        self.missing: list[str] = []

    def json(self, path: Path) -> Any:
        if not path.exists():
            self.missing.append(str(path))
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None

    def records(self, path: Path) -> list[dict] | None:
        if not path.exists():
            self.missing.append(str(path))
            return None
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        return rows

    def take_missing(self) -> list[str]:
        missing, self.missing = self.missing, []
        return missing


# Charts: Vega-Lite specs (no `$schema` URL: the page names no address at all; Vega-Embed is told the mode).


def _chart(title: str, data: list[dict], **spec: Any) -> dict:
    return {"title": title, "data": {"values": data}, "width": "container", "height": 220, **spec}


def _ordered(field_name: str, order: list[str], title: str | None = None) -> dict:
    return {
        "field": field_name,
        "type": "ordinal",
        "sort": order,
        "title": title or field_name,
        "axis": {"labelAngle": 0},
    }


def line_chart(title: str, data: list[dict], x: dict, y: str, color: str, **extra: Any) -> dict:
    layers: list[dict] = [{"transform": [{"filter": "!datum.refused"}], "mark": {"type": "line", "point": True}}]
    if any(row.get("refused") for row in data):  # an empty layer would leave Vega an infinite extent to warn about
        layers.append(
            {
                "transform": [{"filter": "datum.refused"}],
                "mark": {"type": "point", "shape": "cross", "size": 160, "color": "#d62728", "strokeWidth": 3},
            }
        )
    return _chart(
        title,
        data,
        encoding={
            "x": x,
            "y": {"field": y, "type": "quantitative", "scale": {"zero": False}},
            "color": {"field": color, "type": "nominal"},
            "tooltip": [{"field": key} for key in sorted(data[0])] if data else [],
        },
        layer=layers,
        **extra,
    )


def win_rate_chart(data: list[dict], order: list[str]) -> dict:
    # x, its offset and colour per data layer: the 0.5 rule spans the chart, so it must not inherit them.
    placed = {
        "x": _ordered("model", order),
        "xOffset": {"field": "against"},
        "color": {"field": "against", "type": "nominal"},
    }
    tooltip = [
        {"field": key} for key in ("model", "against", "win_rate", "ci_low", "ci_high", "lc_win_rate", "prompts")
    ]
    return _chart(
        "Win rate (95 % bootstrap interval) and length-controlled win rate",
        data,
        layer=[
            {
                "mark": {"type": "rule", "color": "#888", "strokeDash": [4, 4]},
                "data": {"values": [{"even": 0.5}]},
                "encoding": {"y": {"field": "even", "type": "quantitative"}},
            },
            {
                "mark": {"type": "rule", "strokeWidth": 2},
                "encoding": {
                    **placed,
                    "y": {"field": "ci_low", "type": "quantitative", "title": "win rate", "scale": {"domain": [0, 1]}},
                    "y2": {"field": "ci_high"},
                },
            },
            {
                "mark": {"type": "point", "filled": True, "size": 90},
                "encoding": {**placed, "y": {"field": "win_rate", "type": "quantitative"}, "tooltip": tooltip},
            },
            {
                "mark": {"type": "point", "shape": "diamond", "size": 90},
                "encoding": {**placed, "y": {"field": "lc_win_rate", "type": "quantitative"}, "tooltip": tooltip},
            },
        ],
    )


def histogram(title: str, data: list[dict], value: str, facet: str, color: str | None = None) -> dict:
    encoding: dict[str, Any] = {
        "x": {"field": value, "type": "quantitative", "bin": {"maxbins": 20}, "title": value},
        "y": {"aggregate": "count", "type": "quantitative"},
    }
    mark: dict[str, Any] = {"type": "bar"}
    if color:  # overlaid, not stacked: each side's own distribution
        encoding["color"] = {"field": color, "type": "nominal"}
        encoding["y"]["stack"] = None
        mark["opacity"] = 0.55
    return {
        "title": title,
        "data": {"values": data},
        "facet": {"field": facet, "type": "ordinal", "title": None},
        "columns": 3,
        "spec": {"width": 260, "height": 160, "mark": mark, "encoding": encoding},
        "resolve": {"scale": {"y": "independent"}},
    }


def curves_chart(title: str, data: list[dict], metrics: Iterable[str]) -> dict:
    return {
        "title": title,
        "data": {"values": data},
        "transform": [{"fold": list(metrics), "as": ["metric", "value"]}, {"filter": "isValid(datum.value)"}],
        "facet": {"field": "metric", "type": "nominal", "title": None, "sort": list(metrics)},
        "columns": 4,
        "spec": {
            "width": 210,
            "height": 150,
            "mark": {"type": "line", "point": {"size": 12}},
            "encoding": {
                "x": {"field": "step", "type": "quantitative"},
                "y": {"field": "value", "type": "quantitative", "scale": {"zero": False}, "title": None},
                "color": {"field": "run", "type": "nominal"},
            },
        },
        "resolve": {"scale": {"y": "independent"}},
    }


def other_task_metrics(evaluations: Iterable[dict]) -> list[str]:
    """Metrics of lm-eval tasks other than the project's (`eval.tasks`), named `<task>/<metric>`, sorted."""
    return sorted({key for evaluation in evaluations for key, value in evaluation.items()
                   if "/" in key and isinstance(value, (int, float)) and not isinstance(value, bool)})  # fmt: skip


def _round(value: Any, digits: int = 4) -> Any:
    return round(value, digits) if isinstance(value, float) else value


def _short(digest: Any) -> str:
    return str(digest)[:10] if digest else "-"


# Panels.


@dataclass
class RunView:
    """What the panels share: the models in pipeline order and their evaluations."""

    params: Params
    rounds: list[str]
    evals: dict[str, dict | None]
    candidates: dict[str, dict | None]
    guard_metrics: dict[str, dict | None]

    @property
    def models(self) -> list[str]:
        return [SFT_POLICY, *self.rounds, "merged"]

    def refused(self, round_name: str) -> bool:
        gate = self.evals.get(round_name) or {}
        return gate.get("promoted") is False


def eval_table_panel(view: RunView, files: RunFiles) -> Panel:
    panel = Panel(
        "eval-table",
        "Evaluation of every model",
        "Rows in pipeline order: SFT, each round's policy after the gate (a refused round's own candidate follows "
        "as <round>*), the merged model. Each cell: value, then its change against SFT and against the row above "
        "(the previous round) in small print.",
    )
    rows: list[tuple[str, dict]] = []
    for name in view.models:
        evaluation = view.evals.get(name)
        if evaluation is None:
            continue
        rows.append((name, evaluation))
        if view.refused(name):
            rows.append((f"{name}*", view.candidates.get(name) or evaluation.get("candidate") or {}))
    columns = [c for c in EVAL_COLUMNS if any(c in row for _, row in rows)] + other_task_metrics(row for _, row in rows)
    sft = view.evals.get(SFT_POLICY) or {}
    table_rows, previous = [], None
    for name, row in rows:
        cells: list[Any] = [name]
        for column in columns:
            value = row.get(column)
            if not isinstance(value, (int, float)):
                cells.append("-")
                continue
            changes = []
            if name != SFT_POLICY and isinstance(sft.get(column), (int, float)):
                changes.append(f"{value - sft[column]:+.4f} vs sft")
            if previous is not None and isinstance(previous.get(column), (int, float)) and name != SFT_POLICY:
                changes.append(f"{value - previous[column]:+.4f} vs prev")
            cells.append((f"{value:.4f}", ", ".join(changes)) if changes else f"{value:.4f}")
        table_rows.append(cells)
        if not name.endswith("*"):
            previous = row
    panel.tables.append({"caption": "metrics", "header": ["model", *columns], "rows": table_rows})
    panel.tables.append(gate_table(view))
    panel.missing = files.take_missing()
    return panel


def gate_table(view: RunView) -> dict:
    gate = view.params.dpo.gate
    rows = []
    for name in view.rounds:
        decision = view.evals.get(name)
        if decision is None:
            rows.append([name, "not run", "-", "-", "-", "-"])
            continue
        candidate, start = decision.get("candidate") or {}, decision.get("started_from") or {}
        drop = (
            f"{start['task_accuracy'] - candidate['task_accuracy']:+.4f}"
            if "task_accuracy" in start and "task_accuracy" in candidate
            else "-"
        )
        rise = (
            f"{candidate['chosen_nll'] / start['chosen_nll'] - 1:+.2%}"
            if "chosen_nll" in start and "chosen_nll" in candidate
            else "-"
        )
        guard = (view.guard_metrics.get(name) or {}).get("quality", "-")
        verdict = "promoted" if decision.get("promoted") else f"refused (kept {decision.get('source')})"
        rows.append([name, verdict, drop, rise, guard, "; ".join(decision.get("reasons") or []) or "-"])
    limits = [f"task accuracy may fall by at most {gate.max_task_accuracy_drop}"]
    if gate.max_chosen_nll_rise is not None:
        limits.append(f"held-out preferred answers' NLL may rise by at most {gate.max_chosen_nll_rise:.0%}")
    if gate.max_chosen_nll_rise_vs_sft is not None:
        limits.append(
            f"held-out preferred answers' NLL may stand at most {gate.max_chosen_nll_rise_vs_sft:.0%} above SFT's"
        )
    if gate.max_perplexity_rise is not None:
        limits.append(f"perplexity may rise by at most {gate.max_perplexity_rise:.0%}")
    return {
        "caption": (
            f"promotion gate: {', '.join(limits)}, the collapse guard "
            f"{'must' if gate.require_guard_ok else 'need not'} pass"
        ),
        "header": ["round", "decision", "task accuracy drop", "chosen NLL rise", "collapse guard", "reasons"],
        "rows": rows,
    }


def metrics_panel(view: RunView) -> Panel:
    panel = Panel(
        "metrics-by-round",
        "Every eval metric across rounds",
        "One chart per metric family, one line per metric, models in pipeline order; a red cross marks the "
        "candidate of a round the gate refused (the line carries the policy it kept).",
    )
    evaluations = [view.evals.get(name) or {} for name in view.models]
    families = {**METRIC_FAMILIES, "other lm-eval tasks": tuple(other_task_metrics(evaluations))}
    for family, metrics in families.items():
        if not metrics:
            continue
        data = []
        for name in view.models:
            evaluation = view.evals.get(name) or {}
            for metric in metrics:
                if isinstance(evaluation.get(metric), (int, float)):
                    data.append(
                        {"model": name, "metric": metric, "value": _round(evaluation[metric]), "refused": False}
                    )
                candidate = view.candidates.get(name) if view.refused(name) else None
                if candidate and isinstance(candidate.get(metric), (int, float)):
                    data.append({"model": name, "metric": metric, "value": _round(candidate[metric]), "refused": True})
        if data:
            panel.charts.append(line_chart(family, data, _ordered("model", view.models), "value", "metric"))
        else:
            panel.notes.append(f"{family}: no model has these metrics ({', '.join(metrics)})")
    return panel


def win_rate_panel(view: RunView) -> Panel:
    panel = Panel(
        "win-rate",
        "Win rate against SFT and against the previous round",
        "Each round's policy answered the held-out prompts greedily; the run's judge "
        f"({view.params.onpolicy.judge.kind}) scored both answers of each prompt (ties count half). Dots: win rate "
        "with its 95 % bootstrap interval; diamonds: length-controlled win rate (the length difference regressed "
        "out). Above the dashed 0.5 line the round's policy is preferred.",
    )
    data, rows = [], []
    for name in [*view.rounds, "merged"]:
        evaluation = view.evals.get(name) or {}
        for against in ("sft", "previous"):
            key = f"win_rate_vs_{against}"
            if key not in evaluation:
                continue
            entry = {
                "model": name,
                "against": against,
                "win_rate": _round(evaluation[key]),
                "ci_low": _round(evaluation[f"{key}_ci_low"]),
                "ci_high": _round(evaluation[f"{key}_ci_high"]),
                "lc_win_rate": _round(evaluation[f"lc_{key}"]),
                "prompts": evaluation[f"{key}_prompts"],
            }
            data.append(entry)
            rows.append(
                [name, against, f"{entry['win_rate']:.3f}", f"[{entry['ci_low']:.3f}, {entry['ci_high']:.3f}]"]
                + [f"{entry['lc_win_rate']:.3f}", str(entry["prompts"])]
            )
        if view.refused(name):
            panel.notes.append(
                f"{name} was refused: its policy is {evaluation.get('source')}'s, so these are that policy's win rates"
            )
    if data:
        panel.charts.append(win_rate_chart(data, [*view.rounds, "merged"]))
        panel.tables.append(
            {
                "caption": "win rates",
                "header": ["model", "against", "win rate", "95 % interval", "LC win rate", "prompts"],
                "rows": rows,
            }
        )
    else:
        panel.notes.append("no win rates in the eval files (a run from before they were measured?)")
    return panel


def length_panel(view: RunView, files: RunFiles, round_metrics: Path) -> Panel:
    panel = Panel(
        "length-drift",
        "Response length drift",
        "Iterative DPO tends to lengthen answers round after round. Left: mean and p95 length (tokens) of each "
        "model's greedy answers. Middle: chosen vs rejected lengths in each round's pairs (a chosen side that is "
        "always longer teaches length). Right: share of sampled responses that ended with end-of-turn vs were cut "
        "at max_new_tokens.",
    )
    greedy = [
        {
            "model": name,
            "statistic": statistic,
            "tokens": (view.evals.get(name) or {}).get(f"answer_tokens_{statistic}"),
            "refused": False,
        }
        for name in view.models
        for statistic in ("mean", "p95")
    ]
    greedy = [row for row in greedy if isinstance(row["tokens"], (int, float))]
    pairs, ends = [], []
    for name in view.rounds:
        report = files.json(round_metrics / name / "pairs.json") or {}
        for side in ("chosen", "rejected"):
            for statistic in ("mean", "p95"):
                value = report.get(f"{side}_tokens_{statistic}")
                if isinstance(value, (int, float)):
                    pairs.append({"round": name, "series": f"{side} {statistic}", "tokens": value, "refused": False})
        generate = files.json(round_metrics / name / "generate.json") or {}
        for key, label in (("eos_rate", "ended (EOS)"), ("truncated_rate", "cut at max_new_tokens")):
            if isinstance(generate.get(key), (int, float)):
                ends.append({"round": name, "end": label, "share": generate[key]})
    if greedy:
        panel.charts.append(
            line_chart("greedy answers (tokens)", greedy, _ordered("model", view.models), "tokens", "statistic")
        )
    if pairs:
        panel.charts.append(
            line_chart("pairs: chosen vs rejected (tokens)", pairs, _ordered("round", view.rounds), "tokens", "series")
        )
    if ends:
        panel.charts.append(
            _chart(
                "sampled responses: how they ended",
                ends,
                mark="bar",
                encoding={
                    "x": _ordered("round", view.rounds),
                    "y": {"field": "share", "type": "quantitative", "stack": "zero", "scale": {"domain": [0, 1]}},
                    "color": {"field": "end", "type": "nominal"},
                },
            )
        )
    panel.missing = files.take_missing()
    return panel


def training_panel(view: RunView, files: RunFiles, plots: Path) -> Panel:
    panel = Panel(
        "training-curves",
        "Training curves",
        "DPO per logged step, one colour per round: loss, implicit rewards of chosen and rejected (beta times the "
        "log-ratio to the reference), their margin and how often chosen beats rejected, and the policy's log-probs. "
        "Healthy: margins and accuracies rise while logps/chosen does not collapse. Last chart: SFT loss.",
    )
    dpo_rows = []
    for name in view.rounds:
        for row in files.json(plots / "dpo" / f"{name}.json") or []:
            dpo_rows.append({"run": name, **{k: _round(v) for k, v in row.items()}})
    if dpo_rows:
        panel.charts.append(curves_chart("DPO", dpo_rows, TRAINING_CURVES))
    sft_rows = [
        {"run": "sft", **{k: _round(v) for k, v in row.items()}} for row in files.json(plots / "sft.json") or []
    ]
    if sft_rows:
        panel.charts.append(curves_chart("SFT", sft_rows, ["loss"]))
    panel.missing = files.take_missing()
    return panel


def judge_panel(view: RunView, files: RunFiles, rounds: Path, pairs: Path) -> Panel:
    panel = Panel(
        "judge-scores",
        "Judge score distributions",
        "Top: every sampled response's score, one histogram per round (the policy a round samples from improves "
        "when its mass moves right). Bottom: the scores of the responses each round paired as chosen and as "
        "rejected (human pairs have no score and are left out).",
    )
    samples, paired = [], []
    for name in view.rounds:
        scored = files.records(rounds / name / "scored.jsonl") or []
        lookup: dict[tuple[str, str], float] = {}
        for row in scored:
            key = json.dumps(row["prompt"], sort_keys=True)
            for response, score in zip(row["responses"], row["scores"], strict=True):
                samples.append({"round": name, "score": _round(score)})
                lookup[(key, response)] = score
        for pair in files.records(pairs / f"{name}.jsonl") or []:
            key = json.dumps(pair["prompt"], sort_keys=True)
            for side in ("chosen", "rejected"):
                score = lookup.get((key, last_content(pair[side])))
                if score is not None:
                    paired.append({"round": name, "side": side, "score": _round(score)})
    if samples:
        panel.charts.append(histogram("scores of sampled responses", samples, "score", "round"))
    if paired:
        panel.charts.append(histogram("chosen vs rejected scores", paired, "score", "round", color="side"))
    panel.missing = files.take_missing()
    return panel


def kl_panel(view: RunView) -> Panel:
    panel = Panel(
        "kl",
        "KL to the SFT reference",
        "Mean over held-out prompts of log pi(y|x) - log pi_sft(y|x) for the model's own greedy answer y: how far "
        "each policy has moved from the frozen SFT snapshot (0 for SFT itself). A jump flags a round that "
        "drifted; crosses mark refused candidates.",
    )
    data = []
    for name in [*view.rounds, "merged"]:
        evaluation = view.evals.get(name) or {}
        if isinstance(evaluation.get("kl_to_sft"), (int, float)):
            data.append(
                {"model": name, "series": "policy", "kl_to_sft": _round(evaluation["kl_to_sft"]), "refused": False}
            )
        candidate = view.candidates.get(name) if view.refused(name) else None
        if candidate and isinstance(candidate.get("kl_to_sft"), (int, float)):
            data.append(
                {"model": name, "series": "policy", "kl_to_sft": _round(candidate["kl_to_sft"]), "refused": True}
            )
    if data:
        panel.charts.append(
            line_chart(
                "KL to SFT (nats per answer)", data, _ordered("model", [*view.rounds, "merged"]), "kl_to_sft", "series"
            )
        )
    else:
        panel.notes.append("no kl_to_sft in the eval files (a run from before it was measured?)")
    return panel


def answers_panel(view: RunView, files: RunFiles, answers: Path) -> Panel:
    panel = Panel(
        "answers",
        "Answers side by side",
        f"The first {SIDE_BY_SIDE_PROMPTS} held-out prompts, with each model's greedy answer and the judge's score "
        "in brackets; read across a row to see what each round changed.",
    )
    columns = [name for name in view.models if (answers / f"{name}.jsonl").exists()]
    for name in view.models:
        if name not in columns:
            files.missing.append(str(answers / f"{name}.jsonl"))
    by_model = {name: files.records(answers / f"{name}.jsonl") or [] for name in columns}
    if columns:
        keys = [json.dumps(a["prompt"], sort_keys=True) for a in by_model[columns[0]]][:SIDE_BY_SIDE_PROMPTS]
        indexed = {name: {json.dumps(a["prompt"], sort_keys=True): a for a in rows} for name, rows in by_model.items()}
        rows = []
        for key in keys:
            first = indexed[columns[0]][key]
            cells = [last_content(first["prompt"]), first.get("reference", "-")]
            for name in columns:
                answer = indexed[name].get(key)
                cells.append(f"{answer['response']} [{answer['score']:.2f}]" if answer else "-")
            rows.append(cells)
        labels = [
            f"{name} (kept {(view.evals.get(name) or {}).get('source')})" if view.refused(name) else name
            for name in columns
        ]
        panel.tables.append(
            {
                "caption": "greedy answers [judge score]",
                "header": ["prompt", "reference", *labels],
                "rows": rows,
                "id": "side-by-side",
            }
        )
    panel.missing = files.take_missing()
    return panel


def data_panel(view: RunView, files: RunFiles, metrics: Path, round_metrics: Path) -> Panel:
    panel = Panel(
        "data-lineage",
        "Data and lineage",
        "What each dataset held (rows, bad lines dropped, prompts truncated at max_length, token lengths) and, per "
        "round, where its pairs came from: the sampling settings and short content hashes of every input (a "
        "changed hash is a changed input).",
    )
    data = files.json(metrics / "data.json") or {}
    fields = (
        "lines",
        "kept",
        "dropped",
        "duplicates_removed",
        "truncated_rows",
        "tokens_mean",
        "tokens_p95",
        "tokens_max",
    )
    rows = [[name, *[str(report.get(key, "-")) for key in fields]] for name, report in sorted(data.items())]
    for name in view.rounds:
        pairs = files.json(round_metrics / name / "pairs.json") or {}
        if pairs:
            rows.append(
                [
                    f"pairs {name}",
                    str(pairs.get("lines", "-")),
                    str(pairs.get("pairs", "-")),
                    str(pairs.get("dropped", "-")),
                    "-",
                ]
                + [
                    str(pairs.get("truncated_rows", "-")),
                    str(pairs.get("chosen_tokens_mean", "-")),
                    str(pairs.get("chosen_tokens_p95", "-")),
                    "-",
                ]
            )
    if rows:
        panel.tables.append({"caption": "datasets", "header": ["data", *fields], "rows": rows})
    lineage_rows = []
    for name in view.rounds:
        lineage = files.json(round_metrics / name / "lineage.json")
        if lineage:
            lineage_rows.append(lineage_row(name, lineage))
    if lineage_rows:
        panel.tables.append(
            {
                "caption": "round lineage (short hashes)",
                "header": ["round", "sampled from", "sampling", "judge", "content hashes"],
                "rows": lineage_rows,
            }
        )
    panel.missing = files.take_missing()
    return panel


def lineage_row(name: str, lineage: dict) -> list[str]:
    generations = lineage.get("generations") or {}
    sampling = generations.get("sampling") or {}
    settings = ", ".join(
        f"{key} {sampling[key]}"
        for key in ("temperature", "top_p", "samples_per_prompt", "max_new_tokens", "seed")
        if key in sampling
    )
    judge = (lineage.get("scores") or {}).get("judge") or {}
    checkpoint = lineage.get("checkpoint") or {}
    hashes = ", ".join(
        f"{section} {_short(value.get('sha256'))}"
        for section, value in lineage.items()
        if isinstance(value, dict) and value.get("sha256")
    )
    return [
        name,
        f"{generations.get('policy', '-')} (reference {checkpoint.get('reference', '-')})",
        settings or "-",
        str(judge.get("kind", "-")),
        hashes or "-",
    ]


FAILED_RUN_SUFFIX = "-failed"
"""A flow run that failed is recorded as the experiment `<run>-failed` (flows/pipeline.py)."""


def run_state(experiment: dict, name: str) -> str:
    """`completed`, or what DVC says of a run still going (`running`, `queued`) or one that failed (`failed`)."""
    state = (experiment.get("executor") or {}).get("state")
    if state in ("running", "queued", "failed"):
        return state
    return "failed" if name.endswith(FAILED_RUN_SUFFIX) else "completed"


def experiment_rows(shown: list[dict]) -> list[dict]:
    """`dvc exp show --json` as one row per run: its name, flattened params and `merged`'s headline metrics.

    Only a completed run shows metrics: a running one's files are a mid-run copy and a failed one's are its base
    commit's, neither the run's own result.
    """
    rows = []

    def add(entry: dict, label: str, state: str = "completed") -> None:
        data = entry.get("data") or {}
        params = _flatten((data.get("params") or {}).get("params.yaml", {}).get("data") or {})
        scores = (data.get("metrics") or {}).get("metrics/eval.json", {}).get("data") or {}
        merged = (scores.get("merged") or {}) if state == "completed" else {}
        rows.append(
            {"run": label, "params": params, "metrics": {k: merged[k] for k in HEADLINE_METRICS if k in merged}}
        )

    for commit in shown:
        add(commit, "workspace" if commit.get("rev") == "workspace" else f"{commit.get('name') or commit['rev'][:7]}")
        for experiment in commit.get("experiments") or []:
            for revision in experiment.get("revs") or []:
                name = revision.get("name") or revision["rev"][:7]
                state = run_state(experiment, name)
                add(revision, f"{name} (experiment{'' if state == 'completed' else ', ' + state})", state)
    return rows


def _flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def show_experiments(project: Path) -> tuple[list[dict] | None, str | None]:
    """`dvc exp show --json` of the project, or None and dvc's own message when it cannot say (not a git repo)."""
    shown = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=project, capture_output=True, text=True
    )
    if shown.returncode != 0:
        return None, (shown.stderr.strip().splitlines() or ["dvc exp show failed"])[-1]
    return json.loads(shown.stdout or "[]"), None


def runs_panel(project: Path) -> Panel:
    panel = Panel(
        "runs",
        "Runs compared",
        "Every run DVC records (the workspace, commits and their experiments: `dvc exp run`, sweeps, flow runs with "
        "overrides) with the params that differ between them and the merged model's headline metrics; pick a "
        "param and a metric to plot one against the other (a beta sweep reads at a glance).",
    )
    shown, problem = show_experiments(project)
    if shown is None:
        panel.notes.append(f"no runs to compare: dvc exp show says: {problem}")
        return panel
    rows = experiment_rows(shown)
    keys = sorted({key for row in rows for key in row["params"]})
    changed = [key for key in keys if len({json.dumps(row["params"].get(key)) for row in rows}) > 1]
    metrics = [m for m in HEADLINE_METRICS if any(m in row["metrics"] for row in rows)]
    panel.tables.append(
        {
            "caption": "runs (params that differ, merged model's metrics)",
            "header": ["run", *changed, *metrics],
            "rows": [
                [row["run"]]
                + [json.dumps(row["params"].get(key)) for key in changed]
                + [f"{row['metrics'][m]:.4f}" if m in row["metrics"] else "-" for m in metrics]
                for row in rows
            ],
        }
    )
    numeric = [key for key in changed if all(isinstance(row["params"].get(key), (int, float)) for row in rows)]
    points = [
        {
            "run": row["run"],
            "param": key,
            "param_value": row["params"][key],
            "metric": m,
            "value": _round(row["metrics"][m]),
        }
        for row in rows
        for key in numeric
        for m in metrics
        if m in row["metrics"]
    ]
    if points:
        panel.charts.append(param_metric_chart(points, numeric, metrics))
    elif len(rows) < 2:
        panel.notes.append("one run recorded: each `dvc exp run` or sweep point adds a row and a point here")
    else:
        panel.notes.append("no numeric param differs between the runs, so there is nothing to plot against")
    return panel


def param_metric_chart(points: list[dict], params: list[str], metrics: list[str]) -> dict:
    return _chart(
        "a metric against a param, one point per run",
        points,
        params=[
            {
                "name": "param_pick",
                "value": params[0],
                "bind": {"input": "select", "options": params, "name": "param "},
            },
            {
                "name": "metric_pick",
                "value": metrics[0],
                "bind": {"input": "select", "options": metrics, "name": "metric "},
            },
        ],
        transform=[{"filter": "datum.param == param_pick && datum.metric == metric_pick"}],
        mark={"type": "point", "filled": True, "size": 90},
        encoding={
            "x": {"field": "param_value", "type": "quantitative", "title": "param value", "scale": {"zero": False}},
            "y": {"field": "value", "type": "quantitative", "title": "metric value", "scale": {"zero": False}},
            "tooltip": [{"field": "run"}, {"field": "param_value"}, {"field": "value"}],
        },
    )


# The page and its headline.


def page_html(panels: list[Panel], title: str) -> str:
    import jinja2

    environment = jinja2.Environment(autoescape=True, keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    specs = {f"{panel.id}-chart-{index}": chart for panel in panels for index, chart in enumerate(panel.charts)}
    # `</` inside inline JSON would close the script element early.
    specs_json = json.dumps(specs, sort_keys=True, ensure_ascii=False).replace("</", "<\\/")
    return environment.from_string(TEMPLATE.read_text(encoding="utf-8")).render(
        title=title,
        panels=panels,
        specs_json=jinja2.utils.markupsafe.Markup(specs_json),
        vega_bundle=jinja2.utils.markupsafe.Markup(javascript_bundle().replace("</script", "<\\/script")),
    )


def _markdown_cell(cell: str | tuple[str, str]) -> str:
    text = cell if isinstance(cell, str) else f"{cell[0]} ({cell[1]})"
    return text.replace("|", "\\|")


def headline_markdown(panels: dict[str, Panel]) -> str:
    """The eval table, the win rates and the headline charts as PNG data URIs (Prefect's markdown artifact)."""
    import vl_convert

    lines = ["## Eval dashboard", ""]
    for table in panels["eval-table"].tables[:1] + panels["win-rate"].tables:
        lines += [f"**{table['caption']}**", "", "| " + " | ".join(table["header"]) + " |"]
        lines += ["| " + " | ".join("---" for _ in table["header"]) + " |"]
        lines += ["| " + " | ".join(_markdown_cell(cell) for cell in row) + " |" for row in table["rows"]]
        lines.append("")
    for panel_id in ("win-rate", "metrics-by-round", "length-drift"):
        for chart in panels[panel_id].charts[:2]:
            png = vl_convert.vegalite_to_png({**chart, "width": 480}, scale=1)
            lines += [f"![{chart['title']}](data:image/png;base64,{base64.b64encode(png).decode()})", ""]
    lines.append("The full page: reports/dashboard.html (opens offline).")
    return "\n".join(lines) + "\n"


def render_dashboard(
    params: Params,
    evals: Path,
    metrics: Path,
    round_metrics: Path,
    plots: Path,
    answers: Path,
    rounds: Path,
    pairs: Path,
    out: Path,
    headline: Path,
) -> list[Panel]:
    """Build the offline dashboard page and its markdown headline from the run's files.

    Args:
        params: the pipeline's params
        evals: folder of per-model evaluations (metrics/eval)
        metrics: folder of the stages' metrics (data.json, guard_<round>.json)
        round_metrics: folder of the rounds' metrics (metrics/rounds/<round>/*.json)
        plots: folder of training curves (sft.json, dpo/<round>.json)
        answers: folder of each model's judged greedy answers
        rounds: folder of the rounds' sampled and scored responses
        pairs: folder of the rounds' training pairs
        out: the page (self-contained HTML)
        headline: its headline as markdown with inlined PNG charts
    """
    files = RunFiles()
    names = list(params.dpo.rounds)
    view = RunView(
        params=params,
        rounds=names,
        evals={name: files.json(evals / f"{name}.json") for name in [SFT_POLICY, *names, "merged"]},
        candidates={name: files.json(evals / f"candidate_{name}.json") for name in names},
        guard_metrics={name: files.json(metrics / f"guard_{name}.json") for name in names},
    )
    panels = [
        eval_table_panel(view, files),
        metrics_panel(view),
        win_rate_panel(view),
        length_panel(view, files, round_metrics),
        training_panel(view, files, plots),
        judge_panel(view, files, rounds, pairs),
        kl_panel(view),
        answers_panel(view, files, answers),
        data_panel(view, files, metrics, round_metrics),
        runs_panel(Path.cwd()),
    ]
    title = f"sft-dpo: {len(names)} round{'s' if len(names) != 1 else ''} of {params.model.base}"
    with atomic_path(out) as scratch:
        scratch.write_text(page_html(panels, title), encoding="utf-8")
    with atomic_path(headline) as scratch:
        scratch.write_text(headline_markdown({panel.id: panel for panel in panels}), encoding="utf-8")
    charts = sum(len(panel.charts) for panel in panels)
    print(f"dashboard: {len(panels)} panels, {charts} charts, {out.stat().st_size / 1e6:.2f} MB: {out.resolve()}")
    for panel in panels:
        for missing in panel.missing:
            print(f"  {panel.id}: missing {missing}")
    return panels


if __name__ == "__main__":
    stage_main(render_dashboard)
