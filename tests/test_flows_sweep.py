"""flows/sweep.py: a grid of params as DVC experiments. Each point runs in DVC's own temporary workspace and
restores every stage its params do not change from the cache; the user's working tree is not written."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import commit_all, dvc, make_shell_project

from flows.sweep import check_points, grid, parse_settings
from tasks.lib.params import ParamsError

# `up` reads no swept key, `report` (the summary stage, as in dvc.yaml) reads dpo.loss.beta; each appends to a
# file outside the project when it runs.
SWEEP_DAG = r"""
stages:
  up:
    cmd: cat data/builtin/sft.jsonl | wc -l > up.txt && echo ran >> {counts}/up
    deps: [data/builtin/sft.jsonl]
    params: [data.seed]
    outs: [up.txt]
  report:
    cmd: >-
      mkdir -p metrics && python -c "import yaml, json; params = yaml.safe_load(open('params.yaml'));
      merged = {{'task_accuracy': params['dpo']['loss']['beta']}};
      json.dump({{'merged': merged}}, open('metrics/eval.json', 'w'))" && echo ran >> {counts}/report
    deps: [up.txt]
    params: [dpo.loss.beta]
    metrics: [metrics/eval.json]
"""


def runs(counts: Path, stage: str) -> int:
    path = counts / stage
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_grid_is_every_combination_in_order():
    settings = parse_settings(["dpo.loss.beta=0.05,0.5", "dpo.method=lora,full"])
    assert settings == {"dpo.loss.beta": [0.05, 0.5], "dpo.method": ["lora", "full"]}
    assert grid(settings) == [
        {"dpo.loss.beta": 0.05, "dpo.method": "lora"},
        {"dpo.loss.beta": 0.05, "dpo.method": "full"},
        {"dpo.loss.beta": 0.5, "dpo.method": "lora"},
        {"dpo.loss.beta": 0.5, "dpo.method": "full"},
    ]


def test_a_bad_point_is_refused_before_anything_runs(tmp_path):
    project = make_shell_project(tmp_path, SWEEP_DAG.format(counts=tmp_path))
    with pytest.raises(ParamsError, match=r"sweep point \{'dpo.loss.beta': -1\}: .*dpo.loss.beta"):
        check_points(project, {"dpo.loss.beta": [0.2, -1]})
    with pytest.raises(ParamsError, match="key=value1,value2"):
        parse_settings(["dpo.loss.beta"])


def test_each_point_is_an_experiment_that_reuses_what_it_does_not_change(harness, tmp_path):
    """Through the flow's `sweep` parameter (flows/pipeline.py), which runs flows/sweep.py's grid."""
    from flows.pipeline import sft_dpo

    counts = tmp_path / "counts"
    counts.mkdir()
    (tmp_path / "project").mkdir()
    project = make_shell_project(tmp_path / "project", SWEEP_DAG.format(counts=counts))
    dvc(project, "repro")
    commit_all(project, "baseline run")
    before = {name: (project / name).read_bytes() for name in ("params.yaml", "dvc.lock")}

    rows = sft_dpo(project=str(project), sweep={"dpo.loss.beta": [0.2, 0.3]})["sweep"]

    assert sorted((row["dpo.loss.beta"], row["task_accuracy"]) for row in rows) == [(0.2, 0.2), (0.3, 0.3)]
    assert runs(counts, "up") == 1, "a stage no swept key reaches ran again"
    assert runs(counts, "report") == 3  # the baseline and each point
    assert {name: (project / name).read_bytes() for name in before} == before, "the working tree was written"
    shown = dvc(project, "exp", "show", "--json").stdout
    assert all(row["experiment"] in shown for row in rows)


def test_points_after_the_first_run_together_and_restore_what_the_first_computed(tmp_path):
    from flows.sweep import run_sweep

    counts = tmp_path / "counts"
    counts.mkdir()
    (tmp_path / "project").mkdir()
    project = make_shell_project(tmp_path / "project", SWEEP_DAG.format(counts=counts))

    rows = run_sweep(project, {"dpo.loss.beta": [0.2, 0.3, 0.4]}, jobs=2)

    assert sorted(row["params"]["dpo"]["loss"]["beta"] for row in rows) == [0.2, 0.3, 0.4]
    assert runs(counts, "up") == 1, "a point computed again what the first point left in the run-cache"
    assert runs(counts, "report") == 3
    assert not (project / "up.txt").exists(), "the working tree was written"
