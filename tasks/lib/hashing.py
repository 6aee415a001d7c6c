"""Content digests: the identity of a data file or a saved model, as lineage and fingerprints record it."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def directory_digest(folder: str | Path) -> str:
    """sha256 over every file's relative name and content: the identity of a saved model."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def source_digest(path: str | Path) -> str:
    """The identity of a data source: a file's digest, or a folder's (a `save_to_disk` or fetched hub dataset)."""
    return directory_digest(path) if Path(path).is_dir() else file_digest(path)
