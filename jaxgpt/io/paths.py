"""One path type for every file of a run, on a local disk or in a bucket: `as_path` gives an `etils.epath.Path`
(what orbax uses too), which reads and writes local paths with `os` and `gs://` (also `s3://`, `az://`) URLs
with fsspec (`gcsfs` for Google Cloud Storage, the `gcs` extra). A local path behaves as a `pathlib.Path`
and compares equal to one.

A bucket is not a disk: an object is written whole in one request (so a single object write is already
atomic), it cannot be appended to or renamed, and "folders" are only name prefixes. Code that relies on a
disk asks `is_url` first. This module imports no JAX.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from etils.epath import Path as EPath

# the URL schemes etils.epath reads and writes, and the package each needs
BACKENDS = {"gs": ("gcsfs", "the gcs extra: pip install 'jaxgpt[gcs]'"), "s3": ("s3fs", "s3fs: pip install s3fs"),
            "az": ("adlfs", "adlfs: pip install adlfs")}
CACHE_ENV = "JAXGPT_CACHE_DIR"  # local folder for what a bucket workdir keeps on this machine


class MissingBackend(ImportError):
    """A bucket URL whose filesystem package is not installed."""


def is_url(path: str | os.PathLike) -> bool:
    """True for a bucket URL (gs://b/run), False for a local path."""
    return "://" in os.fspath(path)


def scheme(path: str | os.PathLike) -> str | None:
    s = os.fspath(path)
    return s.split("://", 1)[0] if "://" in s else None


def as_path(path: str | os.PathLike) -> EPath:
    """An `etils.epath.Path` for a local path or a bucket URL; one line naming the fix when the URL's scheme is
    not supported or its package is missing."""
    from etils import epath

    if isinstance(path, epath.Path):
        return path
    s = os.fspath(path)
    if "://" in s:
        require_backend(s)
    elif any(s.startswith(f"{sch}:/") for sch in BACKENDS):
        raise ValueError(f"{s} is a bucket URL that lost a slash (pathlib.Path('gs://b/x') makes 'gs:/b/x'); pass "
                         "the URL as a string")
    return epath.Path(s)


def absolute(path: str | os.PathLike) -> EPath:
    """`as_path(path)`, made absolute when local (a bucket URL already is)."""
    p = as_path(path)
    return p if is_url(p) else p.absolute()


def require_backend(url: str) -> None:
    """Raise MissingBackend (one line) unless the package that reads `url`'s scheme imports; for gs:// also turn
    gcsfs's listing cache off (see `_configure_gcs`)."""
    sch = scheme(url)
    if sch not in BACKENDS:
        raise ValueError(f"{url}: the scheme {sch}:// is not supported; use a local path or a "
                         f"{', '.join(f'{s}://' for s in BACKENDS)} URL")
    package, fix = BACKENDS[sch]
    try:
        __import__(package)
        if sch == "gs":
            __import__("google.cloud.storage")  # the workdir lock's generation preconditions
    except ImportError:
        raise MissingBackend(f"{url} needs {fix}") from None
    if sch == "gs":
        _configure_gcs()


def _configure_gcs() -> None:
    """gcsfs caches directory listings per process; other processes (the other hosts of a run) and tensorstore
    (orbax's array writer) write objects it would not see, so every listing asks the bucket."""
    import fsspec.config

    fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)


def bucket_and_key(url: str | os.PathLike) -> tuple[str, str]:
    """("b", "run/.lock") for gs://b/run/.lock."""
    rest = os.fspath(url).split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    return bucket, key


def local_cache(url: str | os.PathLike) -> Path:
    """A local folder standing for `url` on this machine ($JAXGPT_CACHE_DIR or ~/.cache/jaxgpt, then
    buckets/<scheme>/<bucket>/<key>): what a bucket workdir needs on a local disk (a memory-mapped dataset)."""
    base = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "jaxgpt")
    bucket, key = bucket_and_key(url)
    return base / "buckets" / str(scheme(url)) / bucket / key.strip("/")


def files_under(folder: EPath) -> list[EPath]:
    """Every file below `folder` (an epath path), recursively; [] when it does not exist."""
    if not folder.is_dir():
        return []
    base = os.fspath(folder).split("://", 1)[-1].rstrip("/")
    out = []
    for root, _, names in folder.walk():  # fsspec gives a bucket's roots without their scheme
        rel = os.fspath(root).split("://", 1)[-1][len(base):].strip("/")
        out += [(folder / rel / name) if rel else folder / name for name in names]
    return out


@contextlib.contextmanager
def local_folder(path: str | os.PathLike) -> Iterator[Path]:
    """`with local_folder(p) as d:` a local folder holding p's files: p itself when local, else a temporary copy of
    the bucket folder's files (for readers that need a local file, such as safetensors' memory map), removed after."""
    if not is_url(path):
        yield Path(path).absolute()
        return
    folder = as_path(path)
    with tempfile.TemporaryDirectory(prefix="jaxgpt-") as tmp:
        base = os.fspath(folder).rstrip("/")
        for f in files_under(folder):
            dest = Path(tmp) / os.fspath(f)[len(base):].lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(f.read_bytes())
        yield Path(tmp)


def parts_of(path: EPath) -> EPath:
    """The folder of objects that stand for appends to `path` where appending is impossible (a bucket):
    metrics.jsonl -> metrics.jsonl.parts/ holding 00000000.jsonl, 00000001.jsonl, ... in write order."""
    return path.parent / f"{path.name}.parts"


def next_part(parts: EPath) -> int:
    """The number of the next part in `parts` (0 when there is none)."""
    if not parts.is_dir():
        return 0
    numbers = [int(p.name.split(".")[0]) for p in parts.iterdir() if p.name.split(".")[0].isdigit()]
    return max(numbers, default=-1) + 1


def part_name(number: int, suffix: str) -> str:
    return f"{number:08d}{suffix}"


def sorted_parts(parts: EPath) -> list[EPath]:
    """The parts in write order ([] when the folder does not exist)."""
    if not parts.is_dir():
        return []
    return sorted((p for p in parts.iterdir() if p.name.split(".")[0].isdigit()), key=lambda p: p.name)
