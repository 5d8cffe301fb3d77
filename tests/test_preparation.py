"""jaxgpt.data: token memmaps checked against an independent re-tokenization, deterministic batches, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import SHARED

from jaxgpt.data import memmap, preparation
from jaxgpt.data.tokenizer import from_meta

SHAKESPEARE = SHARED / "data" / "tinyshakespeare.txt"
BPE = SHARED / "data" / "gpt2.tiktoken"


@pytest.fixture(scope="module")
def shakespeare_char(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sc") / "shakespeare_char"
    preparation.prepare(out, dataset="shakespeare", tokenizer="char", input_path=SHAKESPEARE)
    return out


def test_char_dataset_matches_nanogpt_prepare(shakespeare_char):
    """Reference: nanoGPT's shakespeare_char/preparation.py logic written out in plain Python."""
    text = SHAKESPEARE.read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    n = int(len(text) * 0.9)
    ref_train = np.array([stoi[c] for c in text[:n]], dtype=np.uint16)
    ref_val = np.array([stoi[c] for c in text[n:]], dtype=np.uint16)

    meta = memmap.load_meta(shakespeare_char)
    assert meta["kind"] == "char" and meta["vocab_size"] == len(chars) == 65
    assert meta["chars"] == "".join(chars)
    train = np.fromfile(shakespeare_char / "train.bin", dtype=np.uint16)
    val = np.fromfile(shakespeare_char / "val.bin", dtype=np.uint16)
    np.testing.assert_array_equal(train, ref_train)
    np.testing.assert_array_equal(val, ref_val)
    assert meta["train_tokens"] == train.size and meta["val_tokens"] == val.size
    tok = from_meta(meta)
    assert tok.decode(train) + tok.decode(val) == text


def test_gpt2_bpe_dataset(tmp_path):
    """BPE ids equal tiktoken's GPT-2 encoding of each split, stored as uint16; they decode back to the text."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    text = SHAKESPEARE.read_text(encoding="utf-8")[:20000]
    src = tmp_path / "slice.txt"
    src.write_text(text, encoding="utf-8")
    meta = preparation.prepare(tmp_path / "bpe", dataset="text", tokenizer="gpt2", input_path=src, bpe_path=BPE)
    ref_enc = tiktoken.Encoding(  # built here from the ranks file, not through jaxgpt.data.tokenizer
        name="gpt2_ref", pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
        mergeable_ranks=load_tiktoken_bpe(str(BPE)), special_tokens={"<|endoftext|>": 50256})
    n = int(len(text) * 0.9)
    train = np.fromfile(tmp_path / "bpe" / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "bpe" / "val.bin", dtype=np.uint16)
    np.testing.assert_array_equal(train, ref_enc.encode_ordinary(text[:n]))
    np.testing.assert_array_equal(val, ref_enc.encode_ordinary(text[n:]))
    assert meta == {**meta, "kind": "gpt2", "vocab_size": 50257}
    assert ref_enc.decode(train.tolist()) == text[:n]


def test_builtin_corpus_needs_no_file(tmp_path):
    text = preparation.builtin_corpus()
    assert len(text) > 100_000 and "for" in text
    meta = preparation.prepare(tmp_path / "pydoc", dataset="pydoc", tokenizer="char")
    tok = from_meta(meta)
    train = np.fromfile(tmp_path / "pydoc" / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "pydoc" / "val.bin", dtype=np.uint16)
    assert tok.decode(train) + tok.decode(val) == text
    assert meta["vocab_size"] == len(set(text))


def test_named_dataset_downloads_through_its_url(tmp_path, monkeypatch):
    """The real download code runs (on a file:// URL, as there is no network in tests) and caches the text."""
    monkeypatch.setitem(preparation.DATASET_URLS, "shakespeare", SHAKESPEARE.resolve().as_uri())
    meta = preparation.prepare(tmp_path / "d" / "sc", dataset="shakespeare", tokenizer="char")
    assert (tmp_path / "d" / "shakespeare.txt").read_bytes() == SHAKESPEARE.read_bytes()
    assert meta["train_tokens"] + meta["val_tokens"] == len(SHAKESPEARE.read_text(encoding="utf-8"))


def test_offline_download_error_names_the_fix(tmp_path, monkeypatch):
    def fail(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(preparation.urllib.request, "urlopen", fail)
    with pytest.raises(RuntimeError, match="--input FILE"):
        preparation.prepare(tmp_path / "sc", dataset="shakespeare", tokenizer="char")
    assert not (tmp_path / "sc").exists() and not list(tmp_path.glob("*.part"))


def test_batches_are_windows_fixed_by_seed_split_and_step(shakespeare_char):
    train = memmap.load_split(shakespeare_char, "train", 64)
    x, y = memmap.get_batch(train, 12, 64, memmap.batch_rng(1337, 5))
    assert x.shape == y.shape == (12, 64) and x.dtype == np.int32
    # reference: the same RNG draws the window starts; x and y are the slices [s, s+T) and [s+1, s+T+1)
    starts = memmap.batch_rng(1337, 5).integers(0, len(train) - 64, size=12)
    for row, s in enumerate(starts):
        np.testing.assert_array_equal(x[row], train[s:s + 64])
        np.testing.assert_array_equal(y[row], train[s + 1:s + 65])
    x2, y2 = memmap.get_batch(train, 12, 64, memmap.batch_rng(1337, 5))
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    for other in (memmap.batch_rng(1337, 6), memmap.batch_rng(1338, 5), memmap.batch_rng(1337, 5, "val"),
                  memmap.batch_rng(1337, 5, stream=1)):
        assert not np.array_equal(memmap.get_batch(train, 12, 64, other)[0], x)


def test_missing_empty_and_short_data_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare the data"):
        memmap.load_split(tmp_path, "train", 8)
    with pytest.raises(FileNotFoundError, match="prepare the data"):
        memmap.load_meta(tmp_path)
    (tmp_path / "train.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="fewer than block_size"):
        memmap.load_split(tmp_path, "train", 8)
    np.arange(8, dtype=np.uint16).tofile(tmp_path / "train.bin")  # 8 tokens < block_size + 1 = 9
    with pytest.raises(ValueError, match="fewer than block_size"):
        memmap.load_split(tmp_path, "train", 8)
    assert len(memmap.load_split(tmp_path, "train", 7)) == 8  # exactly block_size + 1 is enough
    (tmp_path / "train.bin").write_bytes(b"abc")
    with pytest.raises(ValueError, match="odd number of bytes"):
        memmap.load_split(tmp_path, "train", 1)
    with pytest.raises(ValueError, match="fewer than block_size"):
        memmap.get_batch(np.arange(4, dtype=np.uint16), 2, 4, memmap.batch_rng(0, 0))

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        preparation.prepare(tmp_path / "e", dataset="text", input_path=empty)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        preparation.prepare(tmp_path / "m", dataset="text", input_path=tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="needs an input file"):
        preparation.prepare(tmp_path / "t", dataset="text")
    with pytest.raises(ValueError, match="unknown dataset"):
        preparation.prepare(tmp_path / "u", dataset="openwebtext2")
    with pytest.raises(ValueError, match="unknown tokenizer"):
        preparation.prepare(tmp_path / "k", dataset="pydoc", tokenizer="sentencepiece")
    with pytest.raises(ValueError, match="val_fraction"):
        preparation.prepare(tmp_path / "v", dataset="pydoc", val_fraction=1.0)
    with pytest.raises(ValueError, match="unknown split"):
        memmap.batch_rng(0, 0, "test")


def test_existing_dataset_is_never_overwritten_by_default(tmp_path):
    small = tmp_path / "a.txt"
    small.write_text("hello world, " * 50)
    preparation.prepare(tmp_path / "d", dataset="text", input_path=small)
    before = {f.name: f.read_bytes() for f in (tmp_path / "d").iterdir()}
    other = tmp_path / "b.txt"
    other.write_text("something else entirely " * 40)
    with pytest.raises(FileExistsError, match="overwrite"):
        preparation.prepare(tmp_path / "d", dataset="text", input_path=other)
    assert {f.name: f.read_bytes() for f in (tmp_path / "d").iterdir()} == before
    meta = preparation.prepare(tmp_path / "d", dataset="text", input_path=other, overwrite=True)
    assert meta["source"] == str(other)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt", "d"]  # no temporary folders left


def test_command_line(tmp_path, capsys):
    preparation.main(["--dataset", "shakespeare", "--input", str(SHAKESPEARE), "--out", str(tmp_path / "sc")])
    assert "vocab 65 (char)" in capsys.readouterr().out
    assert json.loads((tmp_path / "sc" / "meta.json").read_text())["vocab_size"] == 65
