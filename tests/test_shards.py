"""jaxgpt.data.shards: the llm.c shard format against a reader/writer written here from its spec, bad files, the writer."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from jaxgpt.data import shards


def write_llmc_shard(path, tokens) -> None:
    """An llm.c `write_datafile` shard built by hand: 256 little-endian int32, then uint16 tokens."""
    header = struct.pack("<256i", 20240520, 1, len(tokens), *([0] * 253))
    path.write_bytes(header + struct.pack(f"<{len(tokens)}H", *tokens))


def test_llmc_shard_is_read_back(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 2**16, size=3001).tolist()
    write_llmc_shard(tmp_path / "fineweb_train_000001.bin", tokens)
    assert shards.read_header(tmp_path / "fineweb_train_000001.bin") == 3001
    m = shards.open_shard(tmp_path / "fineweb_train_000001.bin")
    assert isinstance(m, np.memmap) and m.dtype == np.uint16
    np.testing.assert_array_equal(m, tokens)
    assert shards.list_shards(tmp_path, "train") == [tmp_path / "fineweb_train_000001.bin"]
    assert shards.list_shards(tmp_path, "val") == []


def test_written_shard_matches_the_spec(tmp_path):
    tokens = np.random.default_rng(1).integers(0, 50257, size=777)
    shards.write_shard(tmp_path / "a.bin", tokens)
    raw = (tmp_path / "a.bin").read_bytes()
    assert len(raw) == 1024 + 2 * 777
    header = struct.unpack("<256i", raw[:1024])
    assert header[:3] == (20240520, 1, 777) and not any(header[3:])
    assert list(struct.unpack("<777H", raw[1024:])) == tokens.tolist()
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]  # no temporary file left
    shards.write_shard(tmp_path / "empty.bin", np.zeros(0, np.uint16))
    assert shards.open_shard(tmp_path / "empty.bin").size == 0


@pytest.mark.parametrize("damage,match", [
    (lambda raw: raw[:500], "shorter than the 1024-byte header"),
    (lambda raw: raw[:-2], "truncated"),
    (lambda raw: raw + b"\0\0", "truncated"),
    (lambda raw: struct.pack("<i", 20240801) + raw[4:], "magic 20240801"),
    (lambda raw: raw[:4] + struct.pack("<i", 7) + raw[8:], "version 7"),
])
def test_bad_shards_name_the_file(tmp_path, damage, match):
    write_llmc_shard(tmp_path / "x_train_000001.bin", list(range(100)))
    f = tmp_path / "x_train_000001.bin"
    f.write_bytes(damage(f.read_bytes()))
    with pytest.raises(ValueError, match=match) as e:
        shards.open_shard(f)
    assert str(f) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="prepare the data"):
        shards.read_header(tmp_path / "missing.bin")


def test_bad_tokens_and_vocab_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"must be in \[0, 65536\)"):
        shards.write_shard(tmp_path / "a.bin", np.array([1, 70000]))
    with pytest.raises(ValueError, match="1-D"):
        shards.write_shard(tmp_path / "a.bin", np.zeros((2, 2), np.uint16))
    assert not list(tmp_path.iterdir())
    shards.check_vocab_fits(50257)
    shards.check_vocab_fits(65536)  # ids 0 .. 65535 fit
    with pytest.raises(ValueError, match="vocab_size 100277 does not fit uint16"):
        shards.check_vocab_fits(100277)
    with pytest.raises(ValueError, match="unknown split"):
        shards.list_shards(tmp_path, "test")


def test_failed_write_keeps_the_old_file(tmp_path):
    shards.write_shard(tmp_path / "a.bin", np.arange(10))
    before = (tmp_path / "a.bin").read_bytes()

    def chunks():
        yield b"partial"
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        shards.atomic_write_bytes(tmp_path / "a.bin", chunks())
    assert (tmp_path / "a.bin").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_writer_cuts_a_stream_into_val_then_train_shards(tmp_path):
    rng = np.random.default_rng(2)
    stream = rng.integers(0, 50257, size=10_000).astype(np.uint16)
    seen = []
    w = shards.ShardWriter(tmp_path, "p", shard_tokens=3000, val_tokens=1500,
                           on_shard=lambda i, path, n, consumed: seen.append((i, path.name, n, consumed)))
    cuts = np.sort(rng.choice(np.arange(1, stream.size), size=20, replace=False))
    for piece in np.split(stream, cuts):
        w.add(piece)
    w.finish()
    assert [(i, name, n) for i, name, n, _ in seen] == [
        (0, "p_val_000000.bin", 1500), (1, "p_train_000001.bin", 3000), (2, "p_train_000002.bin", 3000),
        (3, "p_train_000003.bin", 2500)]
    assert seen[-1][3] is None  # the last, partial shard comes from finish()
    val = shards.open_shard(tmp_path / "p_val_000000.bin")
    train = np.concatenate([shards.open_shard(p) for p in shards.list_shards(tmp_path, "train")])
    np.testing.assert_array_equal(np.concatenate([val, train]), stream)
    with pytest.raises(ValueError, match="shard_tokens=0"):
        shards.ShardWriter(tmp_path, "p", shard_tokens=0, val_tokens=1)
