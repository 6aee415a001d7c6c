"""tasks/dashboard.py: the offline eval page of the micro pipeline, its determinism, odd runs, and a real browser."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import read_json

from tasks.dashboard import render_dashboard
from tasks.lib.errors import DataError
from tasks.lib.params import load_params

PANELS = (
    "eval-table",
    "metrics-by-round",
    "win-rate",
    "length-drift",
    "training-curves",
    "judge-scores",
    "kl",
    "answers",
    "data-lineage",
    "runs",
)
RUN_FOLDERS = ("metrics", "plots", "data/answers", "data/rounds", "data/prepared/pairs")


def render(project: Path, out: Path, overrides: dict | None = None) -> Path:
    """Render the page of `project`'s run files into `out` (the stage's own command line, in-process)."""
    render_dashboard(
        load_params(project / "params.yaml", overrides or {}),
        evals=project / "metrics/eval",
        metrics=project / "metrics",
        round_metrics=project / "metrics/rounds",
        plots=project / "plots",
        answers=project / "data/answers",
        rounds=project / "data/rounds",
        pairs=project / "data/prepared/pairs",
        out=out / "dashboard.html",
        headline=out / "dashboard.md",
    )
    return out / "dashboard.html"


@pytest.fixture
def run_files(pipeline, tmp_path, monkeypatch) -> Path:
    """The micro run's files that the page reads, copied to a folder outside any DVC project."""
    for folder in RUN_FOLDERS:
        shutil.copytree(pipeline / folder, tmp_path / "run" / folder)
    shutil.copy(pipeline / "params.yaml", tmp_path / "run" / "params.yaml")
    monkeypatch.chdir(tmp_path / "run")
    return tmp_path / "run"


def test_dashboard_stage_wrote_one_self_contained_page(pipeline):
    page = (pipeline / "reports" / "dashboard.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page), "the page loads something from a network"
    assert "<link" not in page and "@import" not in page and "url(http" not in page
    for panel in PANELS:
        assert f'<section id="{panel}"' in page
    assert len(page.encode()) < 3_000_000
    scores = read_json(pipeline / "metrics" / "eval.json")
    # The win-rate table carries the eval stages' figures.
    assert f"{scores['r1']['win_rate_vs_sft']:.3f}" in page


def test_two_renders_are_byte_identical(pipeline, tmp_path, monkeypatch):
    monkeypatch.chdir(pipeline)
    first = render(pipeline, tmp_path / "a")
    second = render(pipeline, tmp_path / "b")
    assert first.read_bytes() == second.read_bytes()
    assert (tmp_path / "a/dashboard.md").read_bytes() == (tmp_path / "b/dashboard.md").read_bytes()
    # The headline has no runs panel, so it is the same as the dvc stage wrote during the pipeline's repro (the page's
    # runs panel changed since: the build was committed after it, and the baseline commit now has metrics).
    assert (tmp_path / "a/dashboard.md").read_bytes() == (pipeline / "reports" / "dashboard.md").read_bytes()


def test_a_one_round_run_renders_only_that_round(run_files, tmp_path):
    rounds = {"r1": load_params(run_files / "params.yaml").dpo.rounds["r1"].model_dump()}
    page = render(run_files, tmp_path / "out", {"dpo.rounds": rounds}).read_text()
    assert "1 round of" in page and "<td>r2</td>" not in page


def test_a_run_whose_rounds_were_all_refused_still_renders_and_says_so(run_files, tmp_path):
    for name in ("r1", "r2"):
        path = run_files / "metrics/eval" / f"{name}.json"
        decision = read_json(path)
        sft = read_json(run_files / "metrics/eval/sft.json")
        path.write_text(
            json.dumps(
                {**sft, "promoted": False, "source": "sft", "reasons": ["planted"]}
                | {"candidate": decision["candidate"], "started_from": sft}
            )
        )
    page = render(run_files, tmp_path / "out").read_text()
    assert page.count("refused (kept sft)") == 2 and "<td>r1*</td>" in page and "planted" in page


def test_missing_optional_files_leave_a_note_not_a_crash(run_files, tmp_path):
    for path in ("metrics/rounds/r1/generate.json", "data/answers/merged.jsonl", "plots/dpo/r2.json"):
        (run_files / path).unlink()
    page = render(run_files, tmp_path / "out").read_text()
    for path in ("metrics/rounds/r1/generate.json", "data/answers/merged.jsonl", "plots/dpo/r2.json"):
        assert f"missing: {run_files / path}" in page
    assert "no runs to compare: dvc exp show says:" in page  # the copy is not a DVC project


def test_other_lm_eval_task_metrics_get_a_column_and_a_chart(run_files, tmp_path):
    for name, value in (("sft", 0.25), ("r1", 0.5), ("r2", 0.75), ("merged", 0.75)):
        path = run_files / "metrics/eval" / f"{name}.json"
        path.write_text(json.dumps({**read_json(path), "capitals_mc/acc": value}))
    page = render(run_files, tmp_path / "out").read_text()
    assert "<th>capitals_mc/acc</th>" in page and "+0.5000 vs sft" in page
    specs = json.loads(re.search(r'<script id="specs" type="application/json">(.*?)</script>', page, re.S).group(1))
    charts = [spec for spec in specs.values() if spec.get("title") == "other lm-eval tasks"]
    assert len(charts) == 1 and {row["value"] for row in charts[0]["data"]["values"]} == {0.25, 0.5, 0.75}


def test_a_function_judge_is_named_on_the_page(run_files, tmp_path):
    overrides = {"onpolicy.judge.kind": "function", "onpolicy.judge.function": "tasks.lib.builtin_task:verify"}
    page = render(run_files, tmp_path / "out", overrides).read_text()
    assert "the run&#39;s judge (function)" in page


def test_a_metrics_file_that_is_not_json_is_an_error_naming_it(run_files, tmp_path):
    broken = run_files / "metrics/eval/r1.json"
    broken.write_text('{"promoted": true,\n  oops\n}')
    with pytest.raises(DataError, match=re.escape(f"{broken}:2: not valid JSON")):
        render(run_files, tmp_path / "out")
    assert not (tmp_path / "out" / "dashboard.html").exists()


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def round_columns(project: Path) -> list[str]:
    """Each round's side-by-side column: its name, and the policy it kept when the gate refused it."""
    columns = []
    for name in yaml.safe_load((project / "params.yaml").read_text())["dpo"]["rounds"]:
        decision = json.loads((project / "metrics" / "eval" / f"{name}.json").read_text())
        columns.append(name if decision["promoted"] else f"{name} (kept {decision['source']})")
    return columns


@pytest.mark.slow  # a real browser: a minute; in `make test-slow`, which CI runs too
@pytest.mark.skipif(
    chromium() is None and os.environ.get("SFT_DPO_REQUIRE_BROWSER") != "1",
    reason="no Chromium on this machine (`make test` installs Debian's chromium where it can; CI requires it)",
)
def test_every_panel_draws_offline_in_chromium(request, tmp_path):
    """On the micro pipeline's page, or on the page SFT_DPO_DASHBOARD names (the demo's, for README's screenshot)."""
    from playwright.sync_api import sync_playwright

    chosen = os.environ.get("SFT_DPO_DASHBOARD")
    page_file = Path(chosen).resolve() if chosen else request.getfixturevalue("pipeline") / "reports" / "dashboard.html"
    problems, requests = [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: problems.append(str(error)))
            # The network is blocked: any request other than the file itself is recorded and refused.
            page.route(
                "**/*",
                lambda route: (
                    requests.append(route.request.url),
                    route.continue_() if route.request.url == page_file.as_uri() else route.abort(),
                ),
            )
            page.goto(page_file.as_uri())
            page.wait_for_function(
                "document.querySelectorAll('.chart svg').length === document.querySelectorAll('.chart').length"
            )
            charts = page.locator(".chart")
            drawn = {
                charts.nth(i).get_attribute("id"): charts.nth(i).locator("svg g.role-mark > *").count()
                for i in range(charts.count())
            }
            for panel in PANELS:
                assert page.locator(f"section#{panel} h2").is_visible()
            rows = page.locator("#side-by-side tbody tr")
            header = page.locator("#side-by-side thead th").all_inner_texts()
            row_count = rows.count()
            cells_per_row = {rows.nth(i).locator("td").count() for i in range(row_count)}
            page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
        finally:
            browser.close()
    assert problems == []
    assert requests == [page_file.as_uri()]
    assert len(drawn) >= 12 and all(marks > 0 for marks in drawn.values()), drawn
    assert header == ["prompt", "reference", "sft", *round_columns(page_file.parents[1]), "merged"]
    assert row_count == 10 and cells_per_row == {len(header)}
    if os.environ.get("SFT_DPO_SCREENSHOT"):
        shutil.copy(tmp_path / "dashboard.png", os.environ["SFT_DPO_SCREENSHOT"])


def exp_show_entry(rev: str, name: str | None, beta: float, task_accuracy: float | None) -> dict:
    """One revision as `dvc exp show --json` (DVC 3) writes it, reduced to what the page reads."""
    metrics = {"metrics/eval.json": {"data": {"merged": {"task_accuracy": task_accuracy}}}} if task_accuracy else {}
    params = {"params.yaml": {"data": {"dpo": {"loss": {"beta": beta}}, "model": {"base": "builtin"}}}}
    return {"rev": rev, "name": name, "data": {"rev": rev, "params": params, "metrics": metrics}, "error": None}


def test_runs_compared_tabulates_changed_params_and_plots_a_metric_against_them(run_files, tmp_path, monkeypatch):
    shown = [
        {**exp_show_entry("workspace", None, 0.1, 0.76), "experiments": None},
        {
            **exp_show_entry("a" * 40, "main", 0.1, None),
            "experiments": [
                {"revs": [{**exp_show_entry("b" * 40, "beta-05", 0.5, 0.70), "experiments": None}], "name": "beta-05"},
                {"revs": [{**exp_show_entry("c" * 40, "beta-02", 0.2, 0.74), "experiments": None}], "name": "beta-02"},
            ],
        },
    ]
    monkeypatch.setattr("tasks.dashboard.show_experiments", lambda project: (shown, None))
    page = render(run_files, tmp_path / "out").read_text()
    section = page[page.index('<section id="runs"') :]
    assert "<th>dpo.loss.beta</th>" in section and "<th>model.base</th>" not in section  # only what differs
    assert "<td>beta-05 (experiment)</td><td>0.5</td><td>0.7000</td>" in section
    specs = json.loads(re.search(r'<script id="specs" type="application/json">(.*?)</script>', page, re.S).group(1))
    points = specs["runs-chart-0"]["data"]["values"]
    assert {(p["run"], p["param_value"], p["value"]) for p in points} == {
        ("workspace", 0.1, 0.76),
        ("beta-05 (experiment)", 0.5, 0.7),
        ("beta-02 (experiment)", 0.2, 0.74),
    }
