"""Atomic writes: every file or folder jaxgpt writes appears whole or not at all.

Each writer fills a temporary name beside the destination, then renames it into place (a rename within
one filesystem is atomic), so a killed process, a full disk or an exception never leaves a half-written
file where a good one was.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _tmp_name(path: Path, tag: str) -> Path:
    return path.with_name(f".{path.name}.{tag}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def file(path: str | os.PathLike) -> Iterator[Path]:
    """`with atomic.file(p) as tmp:` write tmp; on success it replaces p, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path, "tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with file(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, indent: int = 1) -> Path:
    return write_text(path, json.dumps(obj, indent=indent, sort_keys=True))


@contextlib.contextmanager
def directory(path: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """`with atomic.directory(p) as tmp:` fill the folder tmp; on success it takes p's place.

    An existing p is refused unless `force`; then it is renamed aside, the new folder renamed in, and only
    then the old one removed, so p always names a complete folder.
    """
    path = Path(path).absolute()
    if path.exists() and not force:
        raise FileExistsError(f"{path} already exists; pick a new path or pass force=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            old = _tmp_name(path, "old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
