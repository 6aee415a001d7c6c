"""Every stage's command line, derived from the signature of the function that does its work.

A stage module ends with

    if __name__ == "__main__":
        stage_main(train_round)

and `python -m tasks.dpo --help` lists one flag per parameter of `train_round`: `params` becomes
`--params` (params.yaml, validated before any work), `round_name` becomes `--round` (checked against
`dpo.rounds`), a `Path` a required `--flag`, a `Path | None` an optional one, a `bool` a switch.
Each flag's help is the parameter's line in the function's `Args:` docstring section, so the
function's documentation and its command line cannot drift apart.

Bad input (invalid params, an unknown round, a `BadInput` such as `DataError`) ends the process with
one clear message on stderr and exit status 2, which the Prefect flow does not retry: retrying
cannot fix an input. An output the disk will not take (no space, a file-size limit or quota, a read-only
folder) ends it with one message naming the file and the reason, exit status 1; outputs are replaced only once
whole (`tasks.lib.files.atomic_path`), so the previous ones are left as they were.
"""

from __future__ import annotations

import argparse
import errno
import inspect
import os
import re
import shutil
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from tasks.lib import distributed, timing, warm
from tasks.lib.errors import BadInput
from tasks.lib.params import ParamsError, load_params
from tasks.lib.policies import skip_bitsandbytes_unless_quantized, skip_unused_trackers
from tasks.lib.schema import Params

WHOLE_LOCK_COPY = ".dvc/tmp/dvc.lock.whole"
"""Where each stage keeps dvc.lock as DVC left it before starting the stage (whole: DVC just read it), so that one
half-written by a killed `dvc` command can be put back (flows/lockfile.py)."""
BAD_INPUT_EXIT = 2
"""Exit status of a stage refused its input (params, data, arguments): retrying cannot help."""
ROUND_PARAMETER = "round_name"
PARAMS_PARAMETER = "params"


UNWRITABLE = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "larger than the file-size limit",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
}
"""Why a disk refuses a write, by errno: the stage can do nothing about these but say so."""


def unwritable(error: BaseException) -> str | None:
    """`<file>: <reason>` when `error` (or what caused it) is a disk refusing a write, else None.

    Libraries that write through native code (safetensors) report the OS error in their message only.
    """
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in UNWRITABLE:
            return f"{seen.filename or 'an output'}: {UNWRITABLE[seen.errno]} ({seen.strerror})"
        native = re.search(r"os error (\d+)", str(seen))
        if native and int(native.group(1)) in UNWRITABLE:
            return f"{UNWRITABLE[int(native.group(1))]} ({seen})"
        seen = seen.__cause__ or seen.__context__
    return None


def exit_bad_input(message: str) -> NoReturn:
    """Stop a stage whose input is wrong, with the message and the exit status orchestrators do not retry."""
    print(message, file=sys.stderr)
    sys.exit(BAD_INPUT_EXIT)


def argument_help(work: Callable[..., Any]) -> dict[str, str]:
    """`name: text` lines of the `Args:` section of a Google-style docstring (continuation lines joined)."""
    helps: dict[str, str] = {}
    section = (inspect.getdoc(work) or "").partition("Args:")[2]
    current = None
    for line in section.splitlines():
        entry = re.match(r"^    (\w+): (.*)$", line)
        if entry:
            current = entry.group(1)
            helps[current] = entry.group(2)
        elif current and line.startswith("      "):
            helps[current] += " " + line.strip()
        elif line.strip():
            break  # the next docstring section
    return helps


def _flag(name: str) -> str:
    return "--round" if name == ROUND_PARAMETER else "--" + name.replace("_", "-")


def build_parser(work: Callable[..., Any]) -> argparse.ArgumentParser:
    module_doc = sys.modules[work.__module__].__doc__
    parser = argparse.ArgumentParser(description=module_doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    helps = argument_help(work)
    hints = typing.get_type_hints(work)
    for name in inspect.signature(work).parameters:
        hint, help_text = hints.get(name), helps.get(name)
        if name == PARAMS_PARAMETER:
            parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="the pipeline's params file")
        elif name == ROUND_PARAMETER:
            parser.add_argument(
                "--round", dest=name, metavar="ROUND", required=True, help="round name, a key of dpo.rounds"
            )
        elif hint is bool:
            parser.add_argument(_flag(name), dest=name, action="store_true", help=help_text)
        elif hint == Path | None:
            parser.add_argument(_flag(name), dest=name, type=Path, default=None, help=help_text)
        elif hint is Path:
            parser.add_argument(_flag(name), dest=name, type=Path, required=True, help=help_text)
        elif hint is str:
            parser.add_argument(_flag(name), dest=name, required=True, help=help_text)
        else:
            raise TypeError(f"{work.__qualname__}: parameter {name} ({hint}) has no command-line form")
    return parser


def _hand_off_if_warm(work: Callable[..., Any], params: Params) -> None:
    """Under `python -m tasks.lib.warm`, run this stage in a child of the warm server (returns only if not)."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    if work.__module__ != "__main__" or spec is None or not os.environ.get(warm.WARM_ENV):
        return  # called from Python, run as a file path, or no server: the stage runs here
    needs_kept_out = params.model.quantization != "none" or bool({"wandb", "mlflow"} & set(params.tracking.report_to))
    warm.hand_off(spec.name, needs_kept_out)


def _keep_whole_lock_copy() -> None:
    """Run by DVC, a stage starts in the project, whose dvc.lock DVC has just read whole: keep a copy of it."""
    lock, copy = Path("dvc.lock"), Path(WHOLE_LOCK_COPY)
    if lock.is_file() and copy.parent.is_dir():
        scratch = copy.with_name(f"{copy.name}.{os.getpid()}")
        shutil.copyfile(lock, scratch)
        os.replace(scratch, copy)


def stage_main(work: Callable[..., Any], argv: Sequence[str] | None = None) -> None:
    """Parse the command line `work`'s signature describes, validate params.yaml, call `work`.

    Bad input exits with status 2 and its message; anything else propagates (a traceback, exit status 1).
    """
    timed = timing.start()
    arguments = vars(build_parser(work).parse_args(argv))
    try:
        params = load_params(arguments[PARAMS_PARAMETER])
    except ParamsError as error:
        exit_bad_input(f"invalid params:\n{error}")
    arguments[PARAMS_PARAMETER] = params
    round_name = arguments.get(ROUND_PARAMETER)
    if round_name is not None and round_name not in params.dpo.rounds:
        exit_bad_input(f"--round {round_name}: not a key of dpo.rounds ({', '.join(params.dpo.rounds)})")
    try:
        if work.__module__ == "__main__" and getattr(sys.modules["__main__"], "__spec__", None) is not None:
            # A command line: on several processes if `compute` says so (each launched process runs here on one).
            distributed.relaunch_if_distributed(params.compute, sys.modules["__main__"].__spec__.name, sys.argv[1:])
        _hand_off_if_warm(work, params)
        if distributed.rank() == 0:  # once: here, not in a process that launches or hands off the stage
            _keep_whole_lock_copy()
        skip_bitsandbytes_unless_quantized(params.model)
        skip_unused_trackers(params.tracking.report_to)
        work(**arguments)
        distributed.leave_process_group()
    except BadInput as error:
        exit_bad_input(f"{error.kind}:\n{error}")
    except Exception as error:
        problem = unwritable(error)
        if problem is None:
            raise
        print(
            f"the file system refused: {problem}. Outputs are replaced only once whole, so the previous ones are "
            "left as they were; free space or fix the folder, then re-run.",
            file=sys.stderr,
        )
        sys.exit(1)
    if timed:
        timing.write(work.__module__.rsplit(".", 1)[-1] + (f"@{round_name}" if round_name else ""))
