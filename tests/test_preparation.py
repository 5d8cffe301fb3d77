"""jaxgpt.data.preparation: token memmaps checked against an independent re-tokenization (nanoGPT's char
preparation written out in plain Python, tiktoken's GPT-2 encoding built from the ranks file), the built-in corpus,
downloads, refused inputs and the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import BPE, SHAKESPEARE

from jaxgpt.data import memmap, preparation
from jaxgpt.data.tokenizer import from_meta


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


class BigVocab:
    """A tokenizer of 151,936 ids (Qwen's vocabulary size) whose ids go past uint16: one id per character."""

    kind, vocab_size = "big", 151_936

    def encode(self, text: str) -> list[int]:
        return [(ord(c) * 7919) % self.vocab_size for c in text]


def test_a_vocabulary_over_65536_is_stored_as_uint32_and_read_back(tmp_path, monkeypatch):
    """Ids above 65,535 survive preparation and loading (uint32 memmaps, named in meta.json); a uint16 dataset's
    meta.json stays as it was."""
    text = SHAKESPEARE.read_text(encoding="utf-8")[:3000]
    src = tmp_path / "slice.txt"
    src.write_text(text, encoding="utf-8")
    monkeypatch.setattr(preparation, "make_tokenizer", lambda *args: BigVocab())
    meta = preparation.prepare(tmp_path / "big", dataset="text", tokenizer="char", input_path=src)
    assert meta["token_dtype"] == "uint32" and meta["vocab_size"] == 151_936
    n = int(len(text) * 0.9)
    for split, part in (("train", text[:n]), ("val", text[n:])):
        data = memmap.load_split(tmp_path / "big", split, block_size=8)
        assert data.dtype == np.uint32
        np.testing.assert_array_equal(data, BigVocab().encode(part))
    assert int(np.max(memmap.load_split(tmp_path / "big", "train", 8))) > 65_535
    x, y = memmap.get_batch(memmap.load_split(tmp_path / "big", "train", 8), 4, 8, memmap.batch_rng(0, 0))
    assert x.dtype == np.int32 and int(x.max()) > 65_535 and (x[:, 1:] == y[:, :-1]).all()
    monkeypatch.undo()
    small = preparation.prepare(tmp_path / "char", dataset="text", tokenizer="char", input_path=src)
    assert "token_dtype" not in small and memmap.load_split(tmp_path / "char", "train", 8).dtype == np.uint16


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


def test_empty_missing_and_unknown_inputs_are_refused(tmp_path):
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
