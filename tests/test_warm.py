"""tasks/lib/warm.py: a stage started under a warm server runs in a fork that already imported the libraries.

The probe stage below imports no ML library itself: `torch` in its `sys.modules` means it ran in the server's
fork. It reports its process, working directory and environment, and can fail, crash or hang on request.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

from tasks.lib.warm import WARM_ENV, start_server

PROBE = '''"""A stage that reports the process it runs in."""
import json, os, sys, time
from pathlib import Path
from tasks.lib.errors import DataError
from tasks.lib.stage import stage_main


def probe(params, mode: str, out: Path) -> None:
    """Args:
        mode: report, bad, crash or hang
        out: the report
    """
    report = {"pid": os.getpid(), "preloaded": "torch" in sys.modules, "cwd": os.getcwd(),
              "marker": os.environ.get("PROBE_MARKER"), "warm": os.environ.get("SFT_DPO_WARM")}
    out.write_text(json.dumps(report))
    print("probe says hi")
    print("probe warns", file=sys.stderr)
    if mode == "bad":
        raise DataError("data/x.jsonl:3: a bad row")
    if mode == "crash":
        raise RuntimeError("the probe crashed")
    if mode == "hang":
        time.sleep(120)


if __name__ == "__main__":
    stage_main(probe)
'''


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("warm")
    (folder / "warm_probe.py").write_text(PROBE)
    return folder


def base_env() -> dict[str, str]:
    """The tests' environment without the session's warm server (conftest), with the project importable."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop(WARM_ENV, None)
    return env


@pytest.fixture(scope="module")
def server(probe_dir) -> str:
    """A warm server, as `python -m tasks.lib.warm -- COMMAND` starts one; its socket path."""
    with start_server(probe_dir / "server.sock", env=base_env()) as path:
        yield str(path)


def start_probe(probe_dir: Path, mode: str, env: dict[str, str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "warm_probe", "--params", str(ROOT / "params.yaml"), "--mode", mode]
    return subprocess.Popen(
        [*command, "--out", str(probe_dir / f"{mode}.json")],
        cwd=probe_dir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_probe(probe_dir: Path, mode: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, dict]:
    """The probe's result (its process id as `args`) and report."""
    process = start_probe(probe_dir, mode, env)
    stdout, stderr = process.communicate(timeout=120)
    result = subprocess.CompletedProcess(process.pid, process.returncode, stdout, stderr)
    return result, json.loads((probe_dir / f"{mode}.json").read_text())


def test_a_stage_runs_in_a_fork_of_the_server_with_its_own_streams_directory_and_environment(probe_dir, server):
    result, report = run_probe(probe_dir, "report", {**base_env(), WARM_ENV: server, "PROBE_MARKER": "m1"})
    assert result.returncode == 0, result.stderr
    assert report["preloaded"] and report["pid"] != result.args and report["marker"] == "m1"
    assert report["cwd"] == str(probe_dir) and report["warm"] is None  # a stage it starts runs unwarmed
    assert "probe says hi" in result.stdout and "probe warns" in result.stderr


def test_without_a_server_the_stage_runs_in_its_own_process(probe_dir):
    result, report = run_probe(probe_dir, "report", base_env())
    assert result.returncode == 0, result.stderr
    assert not report["preloaded"]


def test_exit_statuses_and_messages_are_the_stage_s(probe_dir, server):
    env = {**base_env(), WARM_ENV: server}
    bad, _ = run_probe(probe_dir, "bad", env)
    assert bad.returncode == 2 and "data/x.jsonl:3: a bad row" in bad.stderr
    crash, report = run_probe(probe_dir, "crash", env)
    assert crash.returncode == 1 and "RuntimeError: the probe crashed" in crash.stderr and report["preloaded"]


def test_an_environment_libraries_read_at_import_runs_unwarmed(probe_dir, server):
    result, report = run_probe(probe_dir, "report", {**base_env(), WARM_ENV: server, "HF_HOME": str(probe_dir)})
    assert result.returncode == 0 and not report["preloaded"]
    assert "environment differs from the server's in HF_HOME; running unwarmed" in result.stderr


def test_killing_the_stage_process_kills_its_warm_child(probe_dir, server):
    process = start_probe(probe_dir, "hang", {**base_env(), WARM_ENV: server})
    report_file = probe_dir / "hang.json"
    deadline = time.monotonic() + 60
    while not report_file.exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child = json.loads(report_file.read_text())["pid"]
    process.send_signal(signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and Path(f"/proc/{child}/stat").read_text().split()[2] != "Z":
        assert time.monotonic() < deadline, "the warm child outlived its stage process"
        time.sleep(0.05)


def test_the_wrapper_runs_a_command_with_a_server_and_returns_its_status(probe_dir):
    command = [sys.executable, "-m", "warm_probe", "--params", str(ROOT / "params.yaml"), "--mode", "bad"]
    wrapped = [sys.executable, "-m", "tasks.lib.warm", "--", *command, "--out", str(probe_dir / "wrapped.json")]
    result = subprocess.run(wrapped, cwd=probe_dir, env=base_env(), capture_output=True, text=True, timeout=180)
    assert result.returncode == 2, result.stderr
    assert json.loads((probe_dir / "wrapped.json").read_text())["preloaded"]


def test_a_server_already_named_is_reused_not_started_again(server, monkeypatch):
    from tasks.lib.warm import warm_stages

    monkeypatch.setenv(WARM_ENV, server)
    with warm_stages() as path:
        assert str(path) == server
    assert os.environ[WARM_ENV] == server


def test_unbuffered_output_is_honoured_and_does_not_refuse_the_stage(probe_dir, server):
    result, report = run_probe(probe_dir, "report", {**base_env(), WARM_ENV: server, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0 and report["preloaded"], result.stderr
    assert "probe says hi" in result.stdout
