"""Warm stage processes: each stage starts as a fork of a server that has already imported the ML libraries.

Importing torch, transformers, TRL, peft, datasets and lm-eval takes 3-5 s, and every heavy stage is its own
process (that is how DVC runs a stage): on the demo that is two thirds of the stages' wall time. Run the
pipeline under this module instead,

    python -m tasks.lib.warm -- dvc repro

and it starts a server that imports those libraries once, then runs the command with `SFT_DPO_WARM` naming the
server's socket. A stage command started under it (`stage_main`) hands its arguments, working directory,
environment and standard streams to the server, which forks a child that runs the stage module afresh
(`runpy`, the project's own code imported in the child, so edits always count) and reports its exit status;
the stage process waits and exits with it. DVC, Prefect and the stage's outputs see an ordinary process.

Only libraries are preloaded, never the project's modules, and nothing runs in the server (no thread pool
started before a fork). A stage runs in its own process anyway, unwarmed, when no server answers, when the
server runs another Python, when its environment differs in a variable other than DVC's and Prefect's own
(libraries read theirs at import), or when it needs a library the server keeps out (bitsandbytes for
quantization, W&B and MLflow trackers): it says which on stderr. If the stage process dies (kill -9 included),
the server sees its socket close and kills the child's process group.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

WARM_ENV = "SFT_DPO_WARM"
"""The warm server's socket path; set by `python -m tasks.lib.warm -- COMMAND` for COMMAND's processes."""
PRELOAD = (
    "torch",
    "transformers",
    "transformers.modeling_utils",
    "transformers.generation",
    "peft",
    "datasets",
    "trl",
    "trl.trainer.dpo_trainer",
    "trl.trainer.sft_trainer",
    "lm_eval",
    "lm_eval.evaluator",
    "lm_eval.models.huggingface",
    "lm_eval.tasks",
    "torch.utils.tensorboard",
    "scipy.stats",  # lm-eval's metrics
    "sklearn.linear_model",  # the length-controlled win rate (tasks/lib/stats.py)
)
KEPT_OUT = ("bitsandbytes", "wandb", "mlflow")
"""Imported by peft/TRL whenever installed; kept out as a stage with default settings keeps them out (policies)."""
IMPORT_TIME_ENV_PREFIXES = (
    "HF_", "HUGGINGFACE", "TRANSFORMERS", "TORCH", "PYTORCH", "CUDA", "NCCL", "OMP_", "MKL_", "KMP_", "OPENBLAS",
    "TOKENIZERS", "DATASETS", "PYTHON", "LM_EVAL", "ACCELERATE", "TRITON", "PEFT", "TRL_", "BNB", "WANDB", "MLFLOW",
    "ARROW", "XDG_", "TMPDIR", "HOME", "LD_", "VIRTUAL_ENV",
)  # fmt: skip
"""Variables the preloaded libraries (may) read when imported: a stage whose values differ runs unwarmed."""
MAX_MESSAGE = 1 << 20


_STARTUP_ENV: dict[str, str] = {}
"""The server's environment before the preload (libraries add variables when imported)."""


RUN_TIME_ENV = ("PYTHONUNBUFFERED", "TORCHELASTIC_", "TORCH_NCCL_")
"""Matching a prefix above but read when the stage runs, not at import: the child's streams, torchrun's worker
bookkeeping (read when the process group is set up)."""


def _significant_env(env: dict[str, str]) -> dict[str, str]:
    return {
        key: value
        for key, value in env.items()
        if key.startswith(IMPORT_TIME_ENV_PREFIXES) and not key.startswith(RUN_TIME_ENV)
    }


def _added_by_imports() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key not in _STARTUP_ENV}


def _refusal(request: dict) -> str | None:
    """Why this server cannot run the request as a fresh process would, or None."""
    if request["executable"] != sys.executable:
        return f"the server runs {sys.executable}, this stage {request['executable']}"
    added = _added_by_imports()  # a stage may lack them (not imported yet) or carry the same (a parent imported)
    ours, theirs = _significant_env({**_STARTUP_ENV, **added}), _significant_env(request["env"])
    differing = sorted(
        key
        for key in ours.keys() | theirs.keys()
        if ours.get(key) != theirs.get(key) and not (key in added and key not in theirs)
    )
    if differing:
        return f"environment differs from the server's in {', '.join(differing[:5])}"
    return None


def _send(connection: socket.socket, message: dict) -> None:
    connection.sendall(json.dumps(message).encode() + b"\n")


def _text_stream(fd: int, mode: str, unbuffered: bool = False):
    """A standard stream on a received descriptor, buffered as Python buffers a fresh process's (`PYTHONUNBUFFERED`:
    every write goes straight through)."""
    line_buffered = mode == "w" and (unbuffered or fd == 2 or os.isatty(fd))
    stream = open(  # noqa: SIM115  (the process's standard stream: open until it exits)
        fd, mode, buffering=1 if line_buffered else -1, encoding="utf-8", errors="backslashreplace", closefd=False
    )
    if mode == "w" and unbuffered:
        stream.reconfigure(write_through=True)
    return stream


def _run_child(request: dict, fds: list[int]) -> None:
    """In the forked child: become the stage process the request describes and run it; exits like one."""
    import atexit
    import random
    import runpy
    import traceback

    os.setpgid(0, 0)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    unbuffered = bool(request["env"].get("PYTHONUNBUFFERED"))
    sys.stdin = _text_stream(0, "r")
    sys.stdout, sys.stderr = _text_stream(1, "w", unbuffered), _text_stream(2, "w", unbuffered)
    os.chdir(request["cwd"])
    added = _added_by_imports()
    os.environ.clear()
    os.environ.update({**added, **request["env"]})
    os.environ.pop(WARM_ENV, None)
    sys.argv = request["argv"]
    sys.path[:] = request["path"]
    random.seed()  # a fresh process draws its own seeds; a fork would share the server's
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    status = 0
    try:
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        status = _exit_status(stop.code)
    except BaseException:
        traceback.print_exc()
        status = 1
    # What a fresh interpreter does at exit, short of tearing down thousands of preloaded modules (a second).
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(status)


def _exit_status(code) -> int:
    """The status `sys.exit(code)` gives a process (a message is printed to stderr, status 1)."""
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)
    return 1


def _receive(connection: socket.socket) -> tuple[dict, list[int]]:
    fds = array.array("i")
    data, ancillary, _, _ = connection.recvmsg(MAX_MESSAGE, socket.CMSG_LEN(3 * fds.itemsize))
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    while data and not data.endswith(b"\n"):
        data += connection.recv(MAX_MESSAGE)
    return json.loads(data.decode()), list(fds)


def serve(path: Path) -> None:
    """Import the libraries, then fork a child per stage request until SIGTERM."""
    _STARTUP_ENV.update(os.environ)
    for package in KEPT_OUT:
        sys.modules.setdefault(package, None)  # type: ignore[arg-type]
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(64)  # stages that connect during the preload wait for it instead of importing alone
    import importlib

    for module in PRELOAD:
        importlib.import_module(module)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    children: dict[int, socket.socket] = {}
    while True:
        for key, _ in selector.select(timeout=0.05):
            if key.fileobj is listener:
                connection, _ = listener.accept()
                pid = _start(connection, listener, selector)
                if pid is not None:
                    children[pid] = connection
                    selector.register(connection, selectors.EVENT_READ, pid)
            elif not key.fileobj.recv(1):  # the stage process is gone: its child must not outlive it
                _kill_group(key.data)
        _reap(children, selector)


def _start(connection: socket.socket, listener: socket.socket, selector) -> int | None:
    request, fds = _receive(connection)
    reason = _refusal(request) if len(fds) == 3 else "the standard streams did not arrive"
    if reason:
        _send(connection, {"refused": reason})
        connection.close()
        for fd in fds:
            os.close(fd)
        return None
    pid = os.fork()
    if pid == 0:
        selector.close()
        listener.close()
        connection.close()
        _run_child(request, fds)
    for fd in fds:
        os.close(fd)
    _send(connection, {"pid": pid})
    return pid


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it exited meanwhile: reaped below
        os.killpg(pid, signal.SIGKILL)


def _reap(children: dict[int, socket.socket], selector) -> None:
    while children:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            return
        connection = children.pop(pid)
        selector.unregister(connection)
        with contextlib.suppress(OSError):  # the stage process died first: nobody is left to tell
            _send(connection, {"exit": os.waitstatus_to_exitcode(status)})
        connection.close()


def hand_off(module: str, needs_kept_out: bool) -> None:
    """Run this stage process's work in a warm child and exit with its status; return if it runs here instead."""
    path = os.environ.get(WARM_ENV)
    if not path:
        return
    if needs_kept_out:
        print(f"{WARM_ENV}: this stage needs one of {', '.join(KEPT_OUT)}; running unwarmed", file=sys.stderr)
        return
    from tasks.lib.timing import STARTED_ENV, seconds_since_process_start

    request = {
        "module": module,
        "argv": sys.argv,
        "cwd": os.getcwd(),
        "env": {**os.environ, STARTED_ENV: str(time.time() - (seconds_since_process_start() or 0.0))},
        "path": sys.path,
        "executable": sys.executable,
    }
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(path)
        socket.send_fds(connection, [json.dumps(request).encode() + b"\n"], [0, 1, 2])
    except OSError as error:
        print(f"{WARM_ENV}={path}: no warm server answers ({error}); running unwarmed", file=sys.stderr)
        return
    replies = connection.makefile("r")
    first = json.loads(replies.readline() or "{}")
    if "refused" in first:
        print(f"{WARM_ENV}: {first['refused']}; running unwarmed", file=sys.stderr)
        return
    for handled in (signal.SIGINT, signal.SIGTERM):  # closing the socket makes the server kill the child
        signal.signal(handled, lambda number, _: os._exit(128 + number))
    last = json.loads(replies.readline() or '{"exit": 1}')
    os._exit(last["exit"] if last["exit"] >= 0 else 128 - last["exit"])


@contextlib.contextmanager
def start_server(path: Path, env: dict[str, str] | None = None) -> Iterator[Path]:
    """A warm server listening on `path` (it preloads meanwhile: early stages wait for it), stopped on exit.

    Stages whose environment is `env` (default: this process's) start warm.
    """
    server = subprocess.Popen([sys.executable, "-m", "tasks.lib.warm", "--serve", str(path)], env=env)
    try:
        while not path.exists():
            if server.poll() is not None:
                raise RuntimeError(f"the warm server exited with status {server.returncode} before listening")
            time.sleep(0.01)
        yield path
    finally:
        server.terminate()
        server.wait()


SOCKET_PREFIX = "sftdpo-warm-"
"""The warm server's socket folder in the temp folder: `sftdpo-warm-<pid of the process that started it>-<random>`."""


def _remove_sockets_of_dead_servers() -> None:
    """Socket folders whose starter was killed (SIGKILL skips the clean-up); a live starter's are left alone."""
    from tasks.lib.files import process_running

    for folder in Path(tempfile.gettempdir()).glob(f"{SOCKET_PREFIX}*-*"):
        pid = folder.name[len(SOCKET_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not process_running(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def warm_stages(env: dict[str, str] | None = None) -> Iterator[Path]:
    """For the duration, `SFT_DPO_WARM` in this process's environment names a warm server started with `env`
    (default: this process's): stage processes started meanwhile with that environment start warm.

    A server this process already names (an outer `python -m tasks.lib.warm --`, the test session's) is reused.
    """
    previous = os.environ.get(WARM_ENV)
    if previous and Path(previous).exists():
        yield Path(previous)
        return
    _remove_sockets_of_dead_servers()
    scratch_folder = tempfile.TemporaryDirectory(prefix=f"{SOCKET_PREFIX}{os.getpid()}-")
    with scratch_folder as scratch, start_server(Path(scratch) / "s", env) as path:
        os.environ[WARM_ENV] = str(path)
        try:
            yield path
        finally:
            if previous is None:
                os.environ.pop(WARM_ENV, None)
            else:
                os.environ[WARM_ENV] = previous


def run_warm(command: list[str]) -> int:
    """Run `command` with a warm server started for it; `command`'s exit status."""
    with warm_stages():
        return subprocess.call(command)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", type=Path, help="serve on this socket path (what `-- COMMAND` starts)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the command to run with a warm server")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give a command after --, or --serve PATH")
    sys.exit(run_warm(command))


if __name__ == "__main__":
    main()
