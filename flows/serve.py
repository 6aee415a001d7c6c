"""`make serve` / `make stop`: this project's Prefect server and its two served deployments.

`python -m flows.serve` starts `prefect server start` on loopback (SQLite under PREFECT_HOME, which the
Makefile puts in `.prefect/`) unless one already answers at PREFECT_API_URL, then serves
`sft-dpo/sft-dpo` and `sft-dpo/next-round` (the latter on `orchestration.next_round.cron`) until
Ctrl-C or SIGTERM, and stops the server it started. `--detach` does the same in the background
(log in PREFECT_HOME/serve.log); `--stop` ends a detached one.

Off loopback (`--host` other than 127.0.0.1, localhost, ::1) the server would take commands from the network: it
refuses to start unless `PREFECT_SERVER_API_AUTH_STRING` holds a `user:password` (Prefect's basic auth), and then
turns on Prefect's CSRF protection too. The auth string stays in the environment: it is never put on a command
line, in a file or in a log.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tasks.lib.files import process_running as alive
from tasks.lib.params import load_params

ROOT = Path(__file__).resolve().parents[1]
DEPLOYMENTS = ("sft-dpo", "next-round")
STARTUP_TIMEOUT_S = 90
SERVING_MESSAGE = "being served"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
SERVER_AUTH_ENV = "PREFECT_SERVER_API_AUTH_STRING"
CLIENT_AUTH_ENV = "PREFECT_API_AUTH_STRING"
CSRF_ENV = "PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED"


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default=os.environ.get("PREFECT_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PREFECT_PORT", "4200")))
    parser.add_argument(
        "--home",
        type=Path,
        default=Path(os.environ.get("PREFECT_HOME", ROOT / ".prefect")),
        help="Prefect's folder: database, settings, serve log and pid files",
    )
    parser.add_argument("--project", type=Path, default=ROOT, help="the project whose pipeline is served")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--detach", action="store_true", help="serve in the background; stop with --stop")
    mode.add_argument("--stop", action="store_true", help="stop a detached server and runner")
    return parser.parse_args()


def _secure_off_loopback(host: str) -> None:
    """A server other machines can reach needs a password (basic auth) and CSRF protection; refuse it otherwise."""
    if host in LOOPBACK_HOSTS:
        return
    auth = os.environ.get(SERVER_AUTH_ENV, "")
    user, colon, password = auth.partition(":")
    if not (user and colon and password):
        sys.exit(
            f"--host {host}: not a loopback address, so the Prefect server would take commands from the network; "
            f"set {SERVER_AUTH_ENV}=<user>:<password> in the environment (Prefect's basic auth; clients set "
            f"{CLIENT_AUTH_ENV} to the same) or serve on 127.0.0.1"
        )
    os.environ[CSRF_ENV] = "true"
    os.environ.setdefault(CLIENT_AUTH_ENV, auth)  # this process's runner is a client of its own server


def _configure(args: argparse.Namespace) -> str:
    """Prefect reads its settings at import: set them first. Returns the API URL."""
    _secure_off_loopback(args.host)
    api_url = os.environ.get("PREFECT_API_URL") or f"http://{args.host}:{args.port}/api"
    args.home.mkdir(parents=True, exist_ok=True)
    os.environ.update(PREFECT_API_URL=api_url, PREFECT_HOME=str(args.home.resolve()))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The runner asks the server for new runs every 10 s by default; a triggered run should start at once.
    os.environ.setdefault("PREFECT_RUNNER_POLL_FREQUENCY", "2")
    return api_url


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _wait_until(predicate, what: str, process: subprocess.Popen | None, log: Path | None) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not predicate():
        if process is not None and process.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            sys.exit(f"{what} exited with status {process.returncode} before it was ready\n{tail}")
        if time.monotonic() > deadline:
            sys.exit(f"{what} not ready after {STARTUP_TIMEOUT_S} s")
        time.sleep(0.5)


def _start_server(args: argparse.Namespace, api_url: str) -> subprocess.Popen | None:
    if _healthy(api_url):
        print(f"using the Prefect server already at {api_url}")
        return None
    log = args.home / "server.log"
    command = [
        sys.executable,
        "-m",
        "prefect",
        "server",
        "start",
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--analytics-off",
    ]
    # Its own session: Ctrl-C reaches the runner first, which then stops the server in order.
    server = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    (args.home / "server.pid").write_text(str(server.pid))
    _wait_until(lambda: _healthy(api_url), f"prefect server (log: {log})", server, log)
    print(f"Prefect server at {api_url.removesuffix('/api')} (UI), database in {args.home}")
    return server


def _stop_process(pid: int, name: str, process: subprocess.Popen | None = None, grace_s: float = 20.0) -> None:
    """SIGTERM a process group, then SIGKILL it after `grace_s`; reaps it when it is our own child."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            return
        if process is None and not alive(pid):
            return
        time.sleep(0.2)
    print(f"{name} (pid {pid}) ignored SIGTERM for {grace_s:.0f} s; killing it")
    with contextlib.suppress(ProcessLookupError):  # it may end between the check and the kill
        os.killpg(pid, signal.SIGKILL)
    if process is not None:
        process.wait()


def _deployments(project: Path):
    # Prefect (through flows.pipeline) is imported here, not at the top: `--stop` and `--help` do not need it.
    from prefect.schedules import Cron

    from flows.pipeline import PARAMS_FILE, sft_dpo

    plan = load_params(project / PARAMS_FILE).orchestration.next_round
    schedules = [Cron(plan.cron, timezone=plan.timezone)] if plan.cron else []
    # One run at a time per deployment (DVC holds a repository lock); the runner's limit covers both.
    pipeline = sft_dpo.to_deployment(
        name="sft-dpo",
        concurrency_limit=1,
        tags=["sft-dpo"],
        description="The whole pipeline; only what changed re-runs.",
    )
    next_round = sft_dpo.to_deployment(
        name="next-round",
        concurrency_limit=1,
        tags=["sft-dpo"],
        parameters={"next_round": True},
        schedules=schedules,
        description="Append the next DPO round and run what it needs.",
    )
    return pipeline, next_round, plan


def serve_foreground(args: argparse.Namespace) -> None:
    api_url = _configure(args)
    os.chdir(args.project)  # served runs start in this folder; the flow's `project` defaults to it
    server = _start_server(args, api_url)
    # Ctrl-C and SIGTERM both end serving the same way, even where a launcher started us with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        from prefect import serve

        pipeline, next_round, plan = _deployments(args.project)
        schedule = (
            f"on cron {plan.cron!r} ({plan.timezone})" if plan.cron else "unscheduled (orchestration.next_round.cron)"
        )
        print(f"serving sft-dpo/sft-dpo and sft-dpo/next-round, {schedule}; Ctrl-C stops both")
        serve(pipeline, next_round, limit=1)
    except KeyboardInterrupt:
        pass
    finally:
        if server is not None:
            _stop_process(server.pid, "prefect server", server)
            (args.home / "server.pid").unlink(missing_ok=True)
            print("Prefect server stopped")


def serve_detached(args: argparse.Namespace) -> None:
    api_url = _configure(args)
    pid_file, log = args.home / "serve.pid", args.home / "serve.log"
    if pid_file.exists() and alive(int(pid_file.read_text())):
        sys.exit(f"already serving (pid {pid_file.read_text()}); `make stop` first")
    command = [
        sys.executable,
        "-m",
        "flows.serve",
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--home",
        str(args.home),
        "--project",
        str(args.project),
    ]
    runner = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
    pid_file.write_text(str(runner.pid))
    # Prefect prints this once both deployments are registered and the runner polls for their runs.
    _wait_until(lambda: SERVING_MESSAGE in log.read_text(errors="replace"), "flows.serve", runner, log)
    print(
        f"serving in the background (pid {runner.pid}, log {log}); UI at {api_url.removesuffix('/api')}; "
        "`make stop` stops it"
    )


def stop(args: argparse.Namespace) -> None:
    stopped = False
    for name in ("serve", "server"):  # the runner first: it stops its own server on the way out
        pid_file = args.home / f"{name}.pid"
        if pid_file.exists():
            _stop_process(int(pid_file.read_text()), name)
            pid_file.unlink(missing_ok=True)
            stopped = True
    print("stopped" if stopped else f"nothing to stop (no pid files in {args.home})")


def main() -> None:
    args = _arguments()
    args.home = args.home.resolve()
    args.project = args.project.resolve()
    if args.stop:
        stop(args)
    elif args.detach:
        serve_detached(args)
    else:
        serve_foreground(args)


if __name__ == "__main__":
    main()
