"""Tokenizers: GPT-2 BPE offline from a ranks file (same ids as tiktoken's gpt2), and the char tokenizer."""

import pytest

from jaxgpt.data.tokenizer import BPE_ENV, CharTokenizer, from_meta, gpt2_tokenizer

HELLO = [15496, 995, 11, 428, 318, 402, 11571, 12, 17, 13]  # "Hello world, this is GPT-2." in GPT-2 BPE


def test_gpt2_from_file(gpt2_bpe_file):
    tok = gpt2_tokenizer(gpt2_bpe_file)
    assert tok.vocab_size == 50257 and tok.eot_id == 50256
    assert tok.encode("Hello world, this is GPT-2.") == HELLO
    assert tok.encode("<|endoftext|>") == [50256]
    text = "Rotary embeddings: θ = 10⁴; ünïcödé and  spaces\n\n"
    assert tok.decode(tok.encode(text)) == text


def test_gpt2_from_env(gpt2_bpe_file, monkeypatch):
    monkeypatch.setenv(BPE_ENV, str(gpt2_bpe_file))
    assert gpt2_tokenizer().encode("Hello world, this is GPT-2.") == HELLO
    assert from_meta({"kind": "gpt2"}).encode(" world") == [995]


def test_offline_without_file_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv(BPE_ENV, raising=False)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # empty cache: tiktoken must download
    import tiktoken.load

    def no_network(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    import tiktoken.registry

    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    with pytest.raises(RuntimeError, match=BPE_ENV):
        gpt2_tokenizer()


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        gpt2_tokenizer(tmp_path / "nope.tiktoken")
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("this is not base64 ranks\n")
    with pytest.raises(ValueError):
        gpt2_tokenizer(bad)


def test_char_roundtrip_and_save(tmp_path, shared_dir):
    text = (shared_dir / "data" / "tinyshakespeare.txt").read_text()
    tok = CharTokenizer.from_text(text)
    assert tok.vocab_size == 65  # nanoGPT's shakespeare_char vocabulary
    ids = tok.encode(text[:1000])
    assert tok.decode(ids) == text[:1000]
    assert max(ids) < 65 and min(ids) >= 0
    tok.save(tmp_path / "vocab.json")
    tok2 = CharTokenizer.load(tmp_path / "vocab.json")
    assert tok2.encode("To be, or not") == tok.encode("To be, or not")
    with pytest.raises(ValueError, match="not in the char vocabulary"):
        tok.encode("€")
    with pytest.raises(ValueError, match="non-empty"):
        CharTokenizer.from_text("")
