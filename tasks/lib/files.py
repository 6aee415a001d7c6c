"""Stage outputs on disk: written whole or not at all; JSON and JSON-lines files."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a scratch path beside `final` that replaces `final` only if the block finishes.

    A stage that fails part-way leaves no half-written output posing as a whole one.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_scratch_of_dead_writers(final)
    scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", dir=final.parent)) / final.name
    try:
        yield scratch
        if final.is_dir():
            shutil.rmtree(final)
        elif final.exists():
            final.unlink()
        os.replace(scratch, final)
    finally:
        shutil.rmtree(scratch.parent, ignore_errors=True)


def _remove_scratch_of_dead_writers(final: Path) -> None:
    """Scratch folders a killed writer left beside `final` (`.<name>.<pid>.<random>`, that pid no longer running)."""
    for leftover in final.parent.glob(f".{glob.escape(final.name)}.*.*"):
        pid = leftover.name[len(final.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not process_running(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def process_running(pid: int) -> bool:
    """Whether a process with this pid exists (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_utf8(path: str | Path, error: type[Exception]) -> str:
    """A text file's content, or `error` with one line saying why it cannot be read (missing, not UTF-8)."""
    path = Path(path)
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except UnicodeDecodeError as problem:
        raise error(f"{path}: not UTF-8 text ({problem.reason} at byte {problem.start})") from None


def write_json(path: str | Path, payload: Any) -> None:
    with atomic_path(path) as scratch:
        scratch.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_records(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rows as JSON lines (UTF-8, not ASCII-escaped)."""
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file that a validating stage already wrote."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def load_splits(files: dict[str, Path]):
    """JSON-lines files as a `datasets.DatasetDict`, each split loaded on its own.

    One `load_dataset` call over several files infers one schema for all of them, so held-out pairs in
    TRL's standard format beside conversational training pairs fail with a cast error; split by split,
    each keeps its own format (TRL handles either).
    """
    from datasets import DatasetDict, load_dataset

    return DatasetDict(
        {name: load_dataset("json", data_files=str(path), split="train") for name, path in files.items()}
    )
