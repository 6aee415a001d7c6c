"""flows/serve.py as a user drives it: a real server on a free loopback port, the served deployments,
`prefect deployment run sft-dpo/sft-dpo --watch`, two runs at once, and a clean stop."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from conftest import DIAMOND_DAG, ROOT, make_shell_project

from flows.params_file import write_params
from flows.serve import _deployments, alive


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The serve command on a shell-command pipeline: the server, deployments and artifacts are the point here."""
    project = make_shell_project(tmp_path_factory.mktemp("served"), DIAMOND_DAG)
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_PORT": str(port),
    }
    command = [sys.executable, "-m", "flows.serve", "--port", str(port), "--home", str(home), "--project", str(project)]
    subprocess.run(command + ["--detach"], cwd=project, env=env, check=True, timeout=180)
    pids = {name: int((home / f"{name}.pid").read_text()) for name in ("serve", "server")}
    yield project, env, home, pids, port
    subprocess.run(command + ["--stop"], cwd=project, env=env, timeout=120)


def prefect(env, project, *arguments, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "prefect", *arguments],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_deployment_run_watch_completes_and_publishes_eval_summary(served):
    project, env, home, _, _ = served
    result = prefect(env, project, "deployment", "run", "sft-dpo/sft-dpo", "--watch")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Completed" in result.stdout

    artifact = prefect(env, project, "artifact", "inspect", "eval-summary", "-o", "json")
    rows = json.loads(json.loads(artifact.stdout)[0]["data"])
    scores = json.loads((project / "metrics" / "eval.json").read_text())
    assert [row["model"] for row in rows] == list(scores) and rows[0]["accuracy"].startswith("0.5")


@pytest.mark.slow  # two whole deployment runs one after the other; CI runs it
def test_two_triggered_runs_wait_for_each_other(served):
    project, env, _, _, _ = served
    ids = []
    for _ in range(2):
        started = prefect(env, project, "deployment", "run", "sft-dpo/sft-dpo")
        assert started.returncode == 0, started.stderr
        ids.append(re.search(r"UUID: ([0-9a-f-]{36})", started.stdout).group(1))
    runs = [wait_for_end(env, project, run_id) for run_id in ids]
    assert [run["state"]["type"] for run in runs] == ["COMPLETED", "COMPLETED"]
    first, second = sorted(runs, key=lambda run: run["start_time"])
    assert second["start_time"] >= first["end_time"], "two runs of the pipeline overlapped"


def wait_for_end(env, project, run_id: str, timeout_s: float = 300) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        inspected = prefect(env, project, "flow-run", "inspect", run_id, "-o", "json")
        run = json.loads(inspected.stdout)
        if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        time.sleep(2)
    raise AssertionError(f"flow run {run_id} did not finish in {timeout_s} s")


def test_stop_leaves_no_process_behind(served):
    project, env, home, pids, port = served
    command = [sys.executable, "-m", "flows.serve", "--port", str(port), "--home", str(home), "--stop"]
    subprocess.run(command, cwd=project, env=env, check=True, timeout=120)
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(alive(pid) for pid in pids.values()), pids
    with pytest.raises(ConnectionRefusedError):  # nothing listens on the port any more
        socket.create_connection(("127.0.0.1", port), timeout=2)
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)  # nothing left in the process groups either


def test_next_round_schedule_comes_from_params(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    pipeline, next_round, _ = _deployments(tmp_path)
    assert pipeline.schedules == [] and next_round.schedules == [] and next_round.parameters == {"next_round": True}

    write_params(
        tmp_path / "params.yaml",
        {"orchestration.next_round.cron": "0 3 * * *", "orchestration.next_round.timezone": "Europe/Paris"},
    )
    _, next_round, _ = _deployments(tmp_path)
    schedule = next_round.schedules[0].schedule
    assert (schedule.cron, schedule.timezone) == ("0 3 * * *", "Europe/Paris")
    assert pipeline.concurrency_limit == next_round.concurrency_limit == 1


def api_status(url: str, method: str = "POST", auth: str | None = None, csrf: str | None = None) -> tuple[int, bytes]:
    import base64
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json"}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    if csrf is not None:
        headers.update({"Prefect-Csrf-Token": csrf, "Prefect-Csrf-Client": "sft-dpo-test"})
    request = urllib.request.Request(url, data=b"{}" if method == "POST" else None, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


WORKER_STOP_S = 60


def stop_worker(worker: subprocess.Popen) -> str:
    """The worker's log once it has stopped.

    What the test checks (the run's completion through the worker) is known before this, so a worker that a loaded
    machine is slow to stop does not fail it: after SIGTERM it gets WORKER_STOP_S to cancel its polling loops and
    close its client, then it is killed and the end of its log (what it was doing) is reported as a warning.
    """
    worker.terminate()
    try:
        return worker.communicate(timeout=WORKER_STOP_S)[0]
    except subprocess.TimeoutExpired:
        worker.kill()
        log = worker.communicate()[0]
        warnings.warn(
            f"the worker had not exited {WORKER_STOP_S} s after SIGTERM and was killed; its log ended:\n" + log[-1500:],
            stacklevel=2,
        )
        return log


def run_pool_deployment(env: dict, project: Path, worker_folder: Path) -> tuple[subprocess.CompletedProcess, str]:
    """prefect.yaml's deployments on a process pool `sft-dpo`, a worker started in `worker_folder` (its own process),
    and `prefect deployment run sft-dpo/pool --watch` on `project`: the run's output and the worker's log."""
    created = prefect(env, ROOT, "work-pool", "create", "sft-dpo", "--type", "process", "--overwrite")
    assert created.returncode == 0, created.stdout + created.stderr
    deployed = prefect(env, ROOT, "--no-prompt", "deploy", "--all")
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    worker = subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", "sft-dpo", "--install-policy", "never"],
        cwd=worker_folder,
        env={**env, "SFT_DPO_CHECKOUT": str(ROOT), "PREFECT_WORKER_QUERY_SECONDS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        result = prefect(env, project, "deployment", "run", "sft-dpo/pool", "-p", f"project={json.dumps(str(project))}",
                         "--watch", timeout=300)  # fmt: skip
    finally:
        worker_log = stop_worker(worker)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:] + worker_log[-3000:]
    return result, worker_log


@pytest.mark.slow  # a server, a runner, a work pool, a worker and a run: most of a minute; CI runs it
def test_off_loopback_the_server_needs_a_password_and_a_work_pool_runs_behind_it(tmp_path):
    """127.0.0.2 stands in for a network address: anything but 127.0.0.1/localhost/::1 needs basic auth and CSRF.
    Behind it, prefect.yaml's `sft-dpo/pool` runs to completion on a real process pool through a worker in another
    process; nothing the run leaves behind holds the password or this machine's paths."""
    import secrets

    (tmp_path / "project").mkdir()
    project = make_shell_project(tmp_path / "project", DIAMOND_DAG)
    home, host, port = tmp_path / "home", "127.0.0.2", free_port()
    api = f"http://{host}:{port}/api"
    env = {key: value for key, value in os.environ.items() if "AUTH_STRING" not in key and "CSRF" not in key}
    env.update(PREFECT_HOME=str(home), PREFECT_API_URL=api)
    command = [sys.executable, "-m", "flows.serve", "--host", host, "--port", str(port), "--home", str(home),
               "--project", str(project)]  # fmt: skip

    refused = subprocess.run(command + ["--detach"], env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    assert "--host 127.0.0.2: not a loopback address" in refused.stderr and "PREFECT_SERVER_API_AUTH_STRING" in (
        refused.stderr
    )
    assert not (home / "serve.pid").exists() and not (home / "server.pid").exists()

    password = f"sftdpo-admin:{secrets.token_hex(12)}"
    subprocess.run(command + ["--detach"], env={**env, "PREFECT_SERVER_API_AUTH_STRING": password}, check=True,
                   timeout=180)  # fmt: skip
    try:
        assert api_status(f"{api}/admin/version", method="GET")[0] == 401
        assert api_status(f"{api}/admin/version", method="GET", auth="sftdpo-admin:guess")[0] == 401
        assert api_status(f"{api}/admin/version", method="GET", auth=password)[0] == 200
        assert api_status(f"{api}/flows/filter", auth=password)[0] == 403, "CSRF protection is off"
        status, body = api_status(f"{api}/csrf-token?client=sft-dpo-test", method="GET", auth=password)
        assert status == 200
        token = json.loads(body)["token"]
        assert api_status(f"{api}/flows/filter", auth=password, csrf=token)[0] == 200

        # A real process work pool behind the password: a worker in another process and folder takes the run.
        client = {**env, "PREFECT_API_AUTH_STRING": password}
        (tmp_path / "worker").mkdir()
        result, worker_log = run_pool_deployment(client, project, tmp_path / "worker")
        assert "Completed" in result.stdout
        run_id = re.search(r"UUID: ([0-9a-f-]{36})", result.stdout).group(1)
        assert run_id in worker_log, "the run did not go through the worker"
        run = json.loads(prefect(client, project, "flow-run", "inspect", run_id, "--output", "json").stdout)
        assert run["work_pool_name"] == "sft-dpo"
        assert json.loads((project / "metrics/eval.json").read_text()) == {"sft": {"accuracy": 0.5}}
        assert not list((tmp_path / "worker").iterdir()), "the run did not start in the worker's checkout"
        artifacts = api_status(f"{api}/artifacts/filter", auth=password, csrf=token)[1].decode()
        assert "eval-summary" in artifacts and "run-report" in artifacts
    finally:
        subprocess.run(command + ["--stop"], env=env, timeout=120)

    secret = password.split(":", 1)[1]
    written = {"artifacts": artifacts}
    for folder in (home, project):
        for path in folder.rglob("*"):
            internal = any(part in str(path) for part in ("/.dvc/cache/", "/.dvc/tmp/", "/.git/objects/"))
            if path.is_file() and not internal:  # DVC's and git's own stores; git objects are read through git log
                written[str(path)] = path.read_text(errors="replace")
    experiments = subprocess.run(["git", "log", "-p", "--all"], cwd=project, capture_output=True, text=True)
    written["git log -p --all"] = experiments.stdout
    assert not [name for name, text in written.items() if secret in text], "the password was written down"
    leaked = [name for name, text in written.items() if str(tmp_path) in text and not name.startswith(str(home))]
    assert not leaked, f"absolute paths of this machine in {leaked}"
