"""Stages on two and three gloo processes (`compute.processes`, torchrun on the CPU): data-parallel training averages
gradients (it matches one process with the same global batch, which training each rank alone would not), every
process ends with the same weights, rank 0 alone writes; the sharded stages write what one process writes.

Training runs full-batch on 8 rows (one process x 8 rows vs two x 4), so the order the rows are dealt in cannot
explain a difference: only the averaging can.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, read_json, read_params, tiny_reward_model

ROWS = 8
THREE_PROCESSES = pytest.mark.slow
"""Three torchrun processes on a 2-core machine cost a minute of `make test`: these run in `make test-slow` (CI)."""


def load_weights(folder: Path, name: str = "model.safetensors") -> dict:
    from safetensors.torch import load_file

    return load_file(folder / name)


def max_difference(one: dict, other: dict) -> float:
    return max(float((one[name] - other[name]).abs().max()) for name in one)


# Two processes sum their gradients in another order than one process does, and float32 sums differ in the last
# bits by order (and by CPU: AVX-512 and AVX2 kernels round differently). Adam divides each update by the root of
# its second moment, so a last-bit difference in a near-zero gradient can move a weight by up to lr per step: the
# two runs agree to a small fraction of the update, not to an absolute 1e-5 (2.3e-5 was seen on one x86-64 CPU
# for an update of ~0.1). A run that failed to average (each rank stepping on its own half batch) differs by a
# sizeable part of the update itself, so 1 % of the largest update still tells the two apart.
RELATIVE_TOLERANCE = 0.01


def agree_within_update(two: dict, one: dict, update: float) -> tuple[float, float]:
    """(largest difference between the runs, the tolerance: 1 % of the largest update)."""
    return max_difference(two, one), RELATIVE_TOLERANCE * update


@pytest.fixture(scope="module")
def inputs(pipeline, tmp_path_factory) -> Path:
    """8 SFT rows and 8 pairs with their reference log-probs, from the micro pipeline's outputs."""
    folder = tmp_path_factory.mktemp("distributed")
    for name in ("sft_train", "sft_heldout"):
        lines = (pipeline / f"data/prepared/{name}.jsonl").read_text().splitlines(keepends=True)[:ROWS]
        (folder / f"{name}.jsonl").write_text("".join(lines))
    (folder / "reference_logps").mkdir()
    lines = (pipeline / "models/reference_logps/r1/train.jsonl").read_text().splitlines(keepends=True)[:ROWS]
    (folder / "reference_logps" / "train.jsonl").write_text("".join(lines))
    return folder


def params_file(pipeline: Path, folder: Path, processes: int, section: str | None = None, **changes) -> Path:
    """The micro params on `processes` processes; `section`'s training full-batch over the 8 rows; `changes`."""
    params = read_params(pipeline)
    params["compute"]["processes"] = processes
    if section is not None:
        params[section]["train"].update(batch_size=ROWS // processes, epochs=3, warmup_ratio=0.0, logging_steps=1)
        params["tracking"]["report_to"] = []
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = params
        for part in parents:
            node = node[part]
        node[leaf] = value
    target = folder / f"params_{section or 'micro'}_{processes}.yaml"
    target.write_text(yaml.safe_dump(params, sort_keys=False))
    return target


def run_stage(pipeline: Path, module: str, *arguments: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", module, *arguments], cwd=pipeline, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def train_sft(pipeline: Path, inputs: Path, tmp_path: Path, processes: int) -> tuple[Path, str]:
    params = params_file(pipeline, tmp_path, processes, "sft")
    out = tmp_path / f"sft_{processes}"
    result = run_stage(
        pipeline, "tasks.sft", "--params", str(params), "--base", str(pipeline / "models/base"),
        "--train", str(inputs / "sft_train.jsonl"), "--heldout", str(inputs / "sft_heldout.jsonl"),
        "--out", str(out), "--checkpoints", str(tmp_path / f"checkpoints_sft_{processes}"),
        "--logs", str(tmp_path / f"logs_sft_{processes}"),
        "--plots", str(tmp_path / f"plots_sft_{processes}.json"), "--metrics", str(tmp_path / f"sft_{processes}.json"),
    )  # fmt: skip
    return out, result.stdout


def test_sft_on_two_processes_averages_gradients_like_one_process_with_the_same_global_batch(
    pipeline, inputs, tmp_path
):
    one, _ = train_sft(pipeline, inputs, tmp_path, 1)
    two, log = train_sft(pipeline, inputs, tmp_path, 2)

    assert "torch.distributed.run --standalone --nproc_per_node=2" in log
    assert "world size 2: 2 processes hold identical weights" in log
    assert log.count("sft: loss") == 1, "a stage on two processes reported (and wrote) twice"
    base = load_weights(pipeline / "models/base")
    update = max_difference(load_weights(one), base)
    assert update > 1e-3, "training did not move the weights: the test proves nothing"
    difference, tolerance = agree_within_update(load_weights(two), load_weights(one), update)
    assert difference < tolerance, f"2 processes differ from 1 by {difference:.3g} (tolerance {tolerance:.3g})"
    assert not list(tmp_path.glob(".sft_2.*")), "a scratch copy of the output was left behind"


def test_dpo_on_two_processes_averages_gradients_like_one_process_with_the_same_global_batch(
    pipeline, inputs, tmp_path
):
    # The sigmoid loss is a mean over pairs; TRL's `sft` term is a token mean per process (as per accumulation step).
    outs, logs = {}, {}
    for processes in (1, 2):
        plain_loss = {"dpo.loss.types": ["sigmoid"], "dpo.loss.weights": None}
        params = params_file(pipeline, tmp_path, processes, "dpo", **plain_loss)
        outs[processes] = tmp_path / f"dpo_{processes}"
        logs[processes] = run_stage(
            pipeline, "tasks.dpo", "--params", str(params), "--round", "r1",
            "--policy", str(pipeline / "models/policies/sft"), "--reference-logps", str(inputs / "reference_logps"),
            "--out", str(outs[processes]), "--checkpoints", str(tmp_path / f"checkpoints_dpo_{processes}"),
            "--logs", str(tmp_path / f"logs_dpo_{processes}"),
            "--plots", str(tmp_path / f"plots_dpo_{processes}.json"),
            "--metrics", str(tmp_path / f"dpo_{processes}.json"),
        ).stdout  # fmt: skip

    assert "world size 2: 2 processes hold identical weights" in logs[2]
    adapters = {n: load_weights(outs[n] / "adapter", "adapter_model.safetensors") for n in outs}
    lora_b = [value for name, value in adapters[1].items() if "lora_B" in name]  # LoRA's B matrices start at zero
    update = max(float(value.abs().max()) for value in lora_b)
    assert update > 1e-4, "DPO did not move the adapter"
    difference, tolerance = agree_within_update(adapters[2], adapters[1], update)
    assert difference < tolerance, f"2 processes differ from 1 by {difference:.3g} (tolerance {tolerance:.3g})"


@THREE_PROCESSES
def test_generate_on_more_processes_than_batches_writes_the_samples_one_process_wrote(pipeline, tmp_path):
    """Three processes, two batches (the micro round's 32 prompts, 16 a call): rank 2 samples nothing and still
    joins and leaves the group. Against the micro pipeline's own round-1 samples (one process, the same params)."""
    out = tmp_path / "generations.jsonl"
    log = run_stage(
        pipeline, "tasks.generate", "--params", str(params_file(pipeline, tmp_path, 3)),
        "--policy", str(pipeline / "models/policies/sft"),
        "--prompts", str(pipeline / "data/rounds/r1/prompts.jsonl"),
        "--out", str(out), "--checkpoints", str(tmp_path / "checkpoints"),
        "--metrics", str(tmp_path / "generate.json"),
    ).stdout  # fmt: skip
    assert "--nproc_per_node=3" in log and log.count(" responses to ") == 1
    assert read_json(tmp_path / "generate.json")["batches"] < 3, "no process went without a batch"
    assert out.read_bytes() == (pipeline / "data/rounds/r1/generations.jsonl").read_bytes()


@THREE_PROCESSES
def test_reference_logps_on_three_processes_are_the_ones_one_process_wrote(pipeline, tmp_path):
    """Against the micro pipeline's own round-1 reference log-probs (one process, the same params); ~30 pairs in
    batches of 8 do not split evenly over three processes."""
    log = run_stage(
        pipeline, "tasks.reference_logps", "--params", str(params_file(pipeline, tmp_path, 3)),
        "--round", "r1", "--sft-policy", str(pipeline / "models/policies/sft"),
        "--previous-policy", str(pipeline / "models/policies/sft"),
        "--pairs", str(pipeline / "data/prepared/pairs/r1.jsonl"),
        "--out", str(tmp_path / "reference_logps"),
    ).stdout  # fmt: skip
    assert "--nproc_per_node=3" in log
    written = (tmp_path / "reference_logps" / "train.jsonl").read_bytes()
    assert written == (pipeline / "models/reference_logps/r1/train.jsonl").read_bytes()


@THREE_PROCESSES
def test_judge_with_a_reward_model_on_three_processes_writes_the_scores_one_process_wrote(pipeline, tmp_path):
    """128 responses in batches of 3: 43 batches, dealt 15/14/14 over three processes."""
    policy = pipeline / "models/policies/sft"
    reward_model = tiny_reward_model(policy, tmp_path / "rm")
    scored = {}
    for processes in (1, 3):
        params = params_file(
            pipeline, tmp_path, processes,
            **{"onpolicy.judge.kind": "reward_model", "onpolicy.judge.reward_model": str(reward_model),
               "onpolicy.judge.batch_size": 3},
        )  # fmt: skip
        scored[processes] = tmp_path / f"scored_{processes}.jsonl"
        log = run_stage(
            pipeline, "tasks.judge", "--params", str(params),
            "--generations", str(pipeline / "data/rounds/r1/generations.jsonl"), "--policy", str(policy),
            "--out", str(scored[processes]), "--metrics", str(tmp_path / f"judge_{processes}.json"),
        ).stdout  # fmt: skip
        assert log.count("judge (reward_model)") == 1
    assert "--nproc_per_node=3" in log
    responses = sum(len(row["responses"]) for row in map(json.loads, scored[1].read_text().splitlines()))
    batches = -(-responses // 3)
    assert responses % 3 and batches % 3, "the batches split evenly: the test proves less than it says"
    assert scored[3].read_bytes() == scored[1].read_bytes()
    assert read_json(tmp_path / "judge_3.json") == read_json(tmp_path / "judge_1.json")


def test_eval_on_two_processes_uses_lm_evals_data_parallel_mode_and_writes_what_one_process_wrote(pipeline, tmp_path):
    """Against the micro pipeline's own SFT evaluation (one process, the same params)."""
    result = run_stage(
        pipeline, "tasks.evaluate", "--params", str(params_file(pipeline, tmp_path, 2)),
        "--model", str(pipeline / "models/policies/sft"),
        "--eval-pairs", str(pipeline / "data/prepared/eval_pairs.jsonl"),
        "--sft-heldout", str(pipeline / "data/prepared/sft_heldout.jsonl"),
        "--out", str(tmp_path / "sft.json"), "--answers-out", str(tmp_path / "sft.jsonl"),
    )  # fmt: skip
    assert "--nproc_per_node=2" in result.stdout and result.stdout.count("preference_accuracy") == 1
    prompts = len((pipeline / "data/answers/sft.jsonl").read_text().splitlines())
    share = f"Running generate_until requests: 100%|██████████| {prompts // 2}/{prompts // 2}"
    assert prompts % 2 == 0 and share in result.stderr, "rank 0 did not get half of lm-eval's requests"
    one = read_json(pipeline / "metrics/eval/sft.json")
    two = read_json(tmp_path / "sft.json")
    assert two.keys() == one.keys()
    assert two == pytest.approx(one, abs=1e-6)
    assert (tmp_path / "sft.jsonl").read_bytes() == (pipeline / "data/answers/sft.jsonl").read_bytes()


def test_launch_commands_and_the_shipped_accelerate_configs():
    from accelerate.commands.config.config_args import load_config_from_file
    from torch.distributed.run import get_args_parser

    from tasks.lib.distributed import launch_command
    from tasks.lib.errors import SettingError
    from tasks.lib.schema import ComputeParams

    torchrun = launch_command(ComputeParams(processes=2), 2, "tasks.sft", ["--logs", "logs/sft", "--params", "p.yaml"])
    assert torchrun[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
    parsed = get_args_parser().parse_args(torchrun[3:])  # torchrun's own parser: `--logs` is the stage's
    assert (parsed.training_script, parsed.training_script_args) == (
        "tasks.sft",
        ["--logs", "logs/sft", "--params", "p.yaml"],
    )
    kinds = {}
    for config in sorted(ROOT.glob("configs/accelerate/*.yaml")):
        kinds[config.stem] = str(load_config_from_file(str(config)).distributed_type)
        compute = ComputeParams(launcher="accelerate", accelerate_config=str(config))
        command = launch_command(compute, 4, "tasks.dpo", [])
        assert command[2:6] == ["accelerate.commands.launch", "--config_file", str(config), "--num_processes"]
    assert kinds == {
        "ddp": "DistributedType.MULTI_GPU",
        "fsdp": "DistributedType.FSDP",
        "deepspeed_zero2": "DistributedType.DEEPSPEED",
        "deepspeed_zero3": "DistributedType.DEEPSPEED",
    }
    with pytest.raises(SettingError, match="compute.accelerate_config nowhere.yaml: no such file"):
        launch_command(ComputeParams(launcher="accelerate", accelerate_config="nowhere.yaml"), 2, "tasks.sft", [])
