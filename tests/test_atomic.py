"""jaxgpt.io.atomic: a file or folder appears whole or not at all. Checked on fresh random contents by reading the
destination back before, during and after each write (a failing block, a SIGKILLed writer, a replaced folder),
listing what is left beside it, and with JSON text written out by hand."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxgpt.io import atomic

LETTERS = list("abcdefghij \n\tÅßλ中🙂")


def _text(seed: int, n: int = 500) -> str:
    return "".join(np.random.default_rng(seed).choice(LETTERS, n))


def _bytes(seed: int, n: int = 4096) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _names(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


# ---------------------------------------------------------------------------------------------------------
# Files


def test_file_replaces_the_destination_only_when_the_block_succeeds(tmp_path):
    dest = tmp_path / "model.bin"
    old, new = _bytes(0), _bytes(1)
    dest.write_bytes(old)
    with atomic.file(dest) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".model.bin.") and tmp != dest
        tmp.write_bytes(new)
        assert dest.read_bytes() == old  # while the block runs, the destination is the old file
    assert dest.read_bytes() == new
    assert _names(tmp_path) == ["model.bin"]  # no temporary left beside it


def test_a_failing_block_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    dest = tmp_path / "metrics.json"
    old = _bytes(2)
    dest.write_bytes(old)
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic.file(dest) as tmp:
            tmp.write_bytes(_bytes(3)[:100])  # half written
            raise RuntimeError("disk full")
    assert dest.read_bytes() == old
    assert _names(tmp_path) == ["metrics.json"]


def test_a_writer_killed_mid_write_leaves_the_old_file_whole(tmp_path):
    dest = tmp_path / "state.bin"
    old = _bytes(4)
    dest.write_bytes(old)
    code = ("import os, signal, sys\nfrom jaxgpt.io import atomic\n"
            "with atomic.file(sys.argv[1]) as tmp:\n"
            "    tmp.write_bytes(b'partial')\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    p = subprocess.run([sys.executable, "-c", code, str(dest)], capture_output=True, timeout=120)
    assert p.returncode == -signal.SIGKILL
    assert dest.read_bytes() == old
    left = [n for n in _names(tmp_path) if n != "state.bin"]  # only a dot-named temporary, never the destination
    assert len(left) == 1 and left[0].startswith(".state.bin.") and (tmp_path / left[0]).read_bytes() == b"partial"


def test_file_creates_missing_parent_folders(tmp_path):
    dest = tmp_path / "a" / "b" / "c.txt"
    text = _text(5)
    assert atomic.write_text(dest, text) == dest
    assert dest.read_text() == text


def test_write_text_replaces_a_file_with_the_new_text(tmp_path):
    dest = tmp_path / "sample.txt"
    dest.write_text(_text(6))
    new = _text(7, 300)
    atomic.write_text(dest, new)
    assert dest.read_text() == new and _names(tmp_path) == ["sample.txt"]


def test_write_json_sorts_keys_and_indents_by_one(tmp_path):
    rng = np.random.default_rng(8)
    obj = {"b": int(rng.integers(1, 100)), "a": [float(rng.random()), "x"], "c": {"z": None, "y": True}}
    path = atomic.write_json(tmp_path / "meta.json", obj)
    want = (f'{{\n "a": [\n  {obj["a"][0]!r},\n  "x"\n ],\n "b": {obj["b"]},\n'
            ' "c": {\n  "y": true,\n  "z": null\n }\n}')
    assert path.read_text() == want
    assert json.loads(path.read_text()) == obj
    atomic.write_json(path, obj, indent=None)
    assert "\n" not in path.read_text()


# ---------------------------------------------------------------------------------------------------------
# Folders


def test_directory_appears_only_when_the_block_succeeds(tmp_path):
    dest = tmp_path / "export"
    files = {f"f{i}.bin": _bytes(10 + i, 1000) for i in range(3)}
    with atomic.directory(dest) as tmp:
        assert tmp.is_dir() and tmp.parent == tmp_path and tmp.name.startswith(".export.")
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        assert not dest.exists()
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == files
    assert _names(tmp_path) == ["export"]


def test_an_existing_directory_is_refused_unless_forced(tmp_path):
    dest = tmp_path / "export"
    dest.mkdir()
    (dest / "keep.bin").write_bytes(_bytes(20))
    with pytest.raises(FileExistsError, match="force=True"):
        with atomic.directory(dest):
            pytest.fail("the block must not run")
    assert _names(dest) == ["keep.bin"] and _names(tmp_path) == ["export"]


def test_force_replaces_a_directory_whole_and_leaves_no_old_copy(tmp_path):
    dest = tmp_path / "export"
    dest.mkdir()
    old = _bytes(21)
    (dest / "old.bin").write_bytes(old)
    new = _bytes(22)
    with atomic.directory(dest, force=True) as tmp:
        (tmp / "new.bin").write_bytes(new)
        assert _names(dest) == ["old.bin"] and (dest / "old.bin").read_bytes() == old  # the old one, complete
    assert _names(dest) == ["new.bin"] and (dest / "new.bin").read_bytes() == new
    assert _names(tmp_path) == ["export"]


def test_a_failing_directory_block_keeps_the_old_folder_and_removes_the_temporary(tmp_path):
    dest = tmp_path / "export"
    dest.mkdir()
    old = _bytes(23)
    (dest / "old.bin").write_bytes(old)
    with pytest.raises(OSError, match="no space"):
        with atomic.directory(dest, force=True) as tmp:
            (tmp / "half.bin").write_bytes(_bytes(24)[:10])
            raise OSError("no space left on device")
    assert _names(dest) == ["old.bin"] and (dest / "old.bin").read_bytes() == old
    assert _names(tmp_path) == ["export"]
    with pytest.raises(ValueError):
        with atomic.directory(tmp_path / "fresh"):
            raise ValueError
    assert _names(tmp_path) == ["export"]  # a new folder that failed is not there at all

