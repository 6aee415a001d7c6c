"""benchmarks/chaos.py on the micro pipeline: SIGKILL `dvc repro` and the flow's process in the middle of stages of
different kinds; every rerun completes to the uninterrupted run's outputs and no output is ever half-written.
`make chaos` runs the full harness (50 trials over every stage of the demo)."""

from __future__ import annotations

import sys

import pytest
from conftest import ROOT, project_env

sys.path.insert(0, str(ROOT / "benchmarks"))
from chaos import run_trials, summary_rows  # noqa: E402

pytestmark = pytest.mark.slow
STAGES = ["prepare", "sft", "generate@r1", "reference_logps@r1", "dpo@r1", "guard@r1", "eval@r1", "merge", "report"]


def test_killed_stages_resume_to_the_uninterrupted_outputs_and_none_is_ever_half_written(harness, project_copy):
    import os

    from prefect.settings import PREFECT_API_URL

    env = {**project_env(project_copy), "PREFECT_API_URL": PREFECT_API_URL.value()}
    env["SFT_DPO_WARM"] = os.environ["SFT_DPO_WARM"]
    trials = run_trials(project_copy, trials=len(STAGES), seed=1, flow_every=4, env=env, only=STAGES)

    assert {trial.stage for trial in trials} == set(STAGES) and {trial.mode for trial in trials} == {
        "dvc repro",
        "flow",
    }
    assert sum(trial.killed for trial in trials) >= len(STAGES) // 2, "too few kills landed: the test proves little"
    assert [trial.stage for trial in trials if trial.corrupted] == []
    assert [(trial.stage, trial.note) for trial in trials if not trial.rerun_completed] == []
    assert all(trial.identical for trial in trials), summary_rows(trials)
    assert [trial.scratch_after_rerun for trial in trials if trial.scratch_after_rerun] == []
