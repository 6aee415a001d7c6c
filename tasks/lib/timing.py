"""Where a stage process's wall time goes: start-up, imports, model loading, work, saving (`make bench-stages`).

Time is attributed to the innermost phase running: an import inside a model load counts as an import. Recording
costs a clock read per phase change; the figures are written only when `SFT_DPO_STAGE_TIMES` names a file.
"""

from __future__ import annotations

import builtins
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TIMES_ENV = "SFT_DPO_STAGE_TIMES"
"""A JSON-lines file each stage process appends its phase times to."""
STARTED_ENV = "SFT_DPO_STAGE_STARTED"
"""When a stage process that handed its work to a warm child (tasks/lib/warm.py) started (epoch seconds)."""
PHASES = ("startup", "imports", "load", "work", "save")

_stack = ["work"]
_totals = dict.fromkeys(PHASES, 0.0)
_mark = time.perf_counter()


def _account() -> None:
    global _mark
    now = time.perf_counter()
    _totals[_stack[-1]] += now - _mark
    _mark = now


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Attribute the time spent inside to `name` (`load`, `save`), nested phases excepted."""
    _account()
    _stack.append(name)
    try:
        yield
    finally:
        _account()
        _stack.pop()


def _timing_import(original):
    def timed_import(*args, **kwargs):
        if _stack[-1] == "imports":
            return original(*args, **kwargs)
        with phase("imports"):
            return original(*args, **kwargs)

    return timed_import


def seconds_since_process_start() -> float | None:
    """Wall seconds since this process started (Linux: from /proc), or None elsewhere."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def start() -> bool:
    """Begin recording when `SFT_DPO_STAGE_TIMES` is set; what ran before (interpreter, module imports) is start-up."""
    global _mark
    if not os.environ.get(TIMES_ENV):
        return False
    if STARTED_ENV in os.environ:  # a warm child: start-up ran from the stage process's start to now
        _totals["startup"] = time.time() - float(os.environ[STARTED_ENV])
    else:
        _totals["startup"] = seconds_since_process_start() or 0.0
    _mark = time.perf_counter()
    builtins.__import__ = _timing_import(builtins.__import__)
    return True


def write(stage: str) -> None:
    """Append this process's phase times (seconds) to the file `SFT_DPO_STAGE_TIMES` names."""
    _account()
    record = {"stage": stage, "argv": sys.argv[1:], **{name: round(seconds, 3) for name, seconds in _totals.items()}}
    record["wall"] = round(sum(_totals.values()), 3)
    with open(os.environ[TIMES_ENV], "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
