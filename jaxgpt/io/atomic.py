"""Atomic writes: every file or folder jaxgpt writes appears whole or not at all.

On a local disk each writer fills a temporary name beside the destination, then renames it into place (a
rename within one filesystem is atomic), so a killed process, a full disk or an exception never leaves a
half-written file where a good one was.

In a bucket (a gs:// path, `jaxgpt.io.paths`) an object write is already atomic: the object is replaced
whole when its upload completes, or not at all. Text is written straight to the object; a file that a library
must write itself (a PNG, safetensors) is filled in a local temporary file and uploaded in one write. A folder
in a bucket is many objects, and a bucket has no rename: each file of it is uploaded whole, the old folder's
other files are removed after, and a writer killed in between leaves each file either old or new.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jaxgpt.io import paths


def _tmp_name(path: Path, tag: str) -> Path:
    return path.with_name(f".{path.name}.{tag}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def file(path: str | os.PathLike) -> Iterator[Path]:
    """`with atomic.file(p) as tmp:` write tmp (a local file); on success it replaces p, on error it is removed."""
    if paths.is_url(path):
        with _local_file(paths.as_path(path)) as tmp:
            yield tmp
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path, "tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _local_file(dest: Any) -> Iterator[Path]:
    """A local temporary file, uploaded to the bucket object `dest` in one write when the block succeeds."""
    with tempfile.TemporaryDirectory(prefix="jaxgpt-upload-") as d:
        tmp = Path(d) / dest.name
        yield tmp
        dest.write_bytes(tmp.read_bytes())


def write_text(path: str | os.PathLike, text: str) -> Any:
    if paths.is_url(path):
        dest = paths.as_path(path)
        dest.write_text(text)
        return dest
    with file(path) as tmp:
        tmp.write_text(text)
    return paths.as_path(path)


def write_json(path: str | os.PathLike, obj: Any, indent: int = 1) -> Any:
    return write_text(path, json.dumps(obj, indent=indent, sort_keys=True))


@contextlib.contextmanager
def directory(path: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """`with atomic.directory(p) as tmp:` fill the folder tmp (local); on success it takes p's place.

    An existing p is refused unless `force`; then it is renamed aside, the new folder renamed in, and only
    then the old one removed, so p always names a complete folder (in a bucket: see the module docstring).
    """
    if paths.is_url(path):
        with _local_directory(paths.as_path(path), force) as tmp:
            yield tmp
        return
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


@contextlib.contextmanager
def _local_directory(dest: Any, force: bool) -> Iterator[Path]:
    """A local temporary folder whose files are uploaded under the bucket prefix `dest` (each object in one
    write), then the files of an earlier folder there that the new one lacks are removed."""
    if dest.exists() and not force:
        raise FileExistsError(f"{dest} already exists; pick a new path or pass force=True to replace it")
    with tempfile.TemporaryDirectory(prefix="jaxgpt-upload-") as d:
        tmp = Path(d)
        yield tmp
        old = {str(p.relative_to(dest)) for p in paths.files_under(dest)}
        new = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        for name in new:
            (dest / name).write_bytes((tmp / name).read_bytes())
        for name in sorted(old - set(new)):
            (dest / name).unlink(missing_ok=True)
