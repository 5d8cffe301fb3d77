"""Tokenizers: GPT-2 BPE offline from a ranks file (same ids as tiktoken's gpt2), the char tokenizer, and a
Hugging Face tokenizer.json (the ids and text of transformers' PreTrainedTokenizerFast)."""

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


def test_hf_tokenizer_json_gives_transformers_ids_and_text(tmp_path, shared_dir):
    transformers = pytest.importorskip("transformers")
    from helpers import write_bpe_tokenizer

    from jaxgpt.data.tokenizer import HFTokenizer, hf_tokenizer

    file = write_bpe_tokenizer(tmp_path)
    ours = hf_tokenizer(tmp_path)
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(file), bos_token="<s>", eos_token="</s>")
    lines = (shared_dir / "data" / "tinyshakespeare.txt").read_text().splitlines()
    texts = ["\n".join(lines[1000:1040]), "Rotary embeddings: θ = 10⁴; ünïcödé and  spaces\n\n", "", " x"]
    for text in texts:  # unseen lines, bytes outside the training text, the empty string
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False)
        assert ours.encode_prompt(text) == ref.encode(text) and ours.encode_prompt(text)[:1] == [0]
        ids = ours.encode_prompt(text) + [1]
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True) == text
    assert max(len(ours.decode([i])) for i in ours.encode(texts[0])) > 2  # BPE merges, not single bytes
    assert (ours.bos_id, ours.eot_id, ours.vocab_size) == (0, 1, len(ref))

    (tmp_path / "generation_config.json").write_text('{"bos_token_id": 1, "eos_token_id": [5, 1]}')
    assert (hf_tokenizer(tmp_path).bos_id, hf_tokenizer(tmp_path).eot_id) == (1, 5)  # the first of a list
    again = from_meta(ours.meta())
    assert isinstance(again, HFTokenizer) and again.encode(texts[0]) == ours.encode(texts[0])


def test_hf_tokenizer_bad_folders_are_one_line_errors(tmp_path):
    from jaxgpt.data.tokenizer import hf_tokenizer

    with pytest.raises(FileNotFoundError, match="tokenizer.json does not exist"):
        hf_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not a readable tokenizers file"):
        hf_tokenizer(tmp_path)
