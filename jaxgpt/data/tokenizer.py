"""Tokenizers: GPT-2 BPE through tiktoken (online, or offline from a local ranks file), a char tokenizer, and
the `tokenizer.json` a Hugging Face model folder ships (Llama, Qwen, SmolLM; through the `tokenizers` library).

All have the same small interface: `encode(text) -> list[int]`, `decode(ids) -> str`, `vocab_size`,
`eot_id` (None for the char tokenizer) and `kind`. `encode` adds no special tokens; a Hugging Face tokenizer
also has `encode_prompt` (its own special tokens, e.g. Llama's BOS, as transformers adds them) and `bos_id`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Protocol

GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_EOT = 50256
BPE_ENV = "JAXGPT_GPT2_BPE"


class Tokenizer(Protocol):
    kind: str
    vocab_size: int
    eot_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class GPT2Tokenizer:
    """GPT-2's byte-level BPE (50257 tokens, `<|endoftext|>` = 50256)."""

    kind = "gpt2"
    eot_id = GPT2_EOT

    def __init__(self, encoding) -> None:  # a tiktoken.Encoding
        self.encoding = encoding
        self.vocab_size = encoding.n_vocab

    def encode(self, text: str, allow_eot: bool = True) -> list[int]:
        allowed = {"<|endoftext|>"} if allow_eot else set()
        return self.encoding.encode(text, allowed_special=allowed)

    def encode_ordinary(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self.encoding.decode([int(i) for i in ids])


def gpt2_encoding_from_file(path: str | os.PathLike):
    """A tiktoken Encoding for GPT-2 from a local `gpt2.tiktoken` ranks file (no network)."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GPT-2 BPE ranks file {path} does not exist; pass the path of a gpt2.tiktoken file")
    try:
        ranks = load_tiktoken_bpe(str(path))
    except Exception as e:  # noqa: BLE001 - any parse failure is the same user problem
        raise ValueError(f"{path} is not a tiktoken ranks file ({e}); pass a valid gpt2.tiktoken file") from e
    if len(ranks) != GPT2_EOT:
        raise ValueError(f"{path} holds {len(ranks)} ranks, GPT-2 has {GPT2_EOT}; pass GPT-2's gpt2.tiktoken")
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PAT_STR, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": GPT2_EOT})


def gpt2_tokenizer(path: str | os.PathLike | None = None) -> GPT2Tokenizer:
    """GPT-2 BPE from `path`, else from $JAXGPT_GPT2_BPE, else tiktoken's download (cached by tiktoken)."""
    path = path or os.environ.get(BPE_ENV)
    if path:
        return GPT2Tokenizer(gpt2_encoding_from_file(path))
    import tiktoken

    try:
        return GPT2Tokenizer(tiktoken.get_encoding("gpt2"))
    except Exception as e:  # noqa: BLE001 - network errors come in many types
        raise RuntimeError(
            f"cannot load the GPT-2 tokenizer ({type(e).__name__}): offline, set {BPE_ENV}=/path/to/gpt2.tiktoken "
            "or pass its path (the file ships in the openai-whisper package as whisper/assets/gpt2.tiktoken)"
        ) from e


class CharTokenizer:
    """One id per distinct character of a corpus (nanoGPT's shakespeare_char)."""

    kind = "char"
    eot_id = None

    def __init__(self, chars: str) -> None:
        if not chars:
            raise ValueError("CharTokenizer needs a non-empty vocabulary; build it from a non-empty corpus")
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        self.vocab_size = len(chars)

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the char vocabulary; use characters of the corpus") from e

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps({"kind": "char", "chars": self.chars}))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CharTokenizer":
        d = json.loads(Path(path).read_text())
        if d.get("kind") != "char":
            raise ValueError(f"{path} is not a char vocabulary file")
        return cls(d["chars"])


HF_TOKENIZER_FILE = "tokenizer.json"
# where a model folder names its special tokens, most specific first (transformers' generate reads them so)
SPECIAL_SOURCES = ("generation_config.json", "config.json")


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (the `tokenizers` library): the ids transformers'
    PreTrainedTokenizerFast gives. BOS and EOS come from the model folder (`special_ids`)."""

    kind = "hf"

    def __init__(self, tokenizer, path: str | os.PathLike, bos_id: int | None, eot_id: int | None) -> None:
        self.tokenizer = tokenizer  # a tokenizers.Tokenizer
        self.path = Path(path)
        self.bos_id, self.eot_id = bos_id, eot_id
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """The ids of `text` alone (no BOS/EOS): PreTrainedTokenizerFast.encode(text, add_special_tokens=False)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    encode_ordinary = encode

    def encode_prompt(self, text: str) -> list[int]:
        """The ids with the tokenizer's own special tokens (Llama's BOS), as transformers encodes a prompt."""
        return self.tokenizer.encode(text, add_special_tokens=True).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids, special tokens (BOS, EOS, padding) left out."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def meta(self) -> dict:
        """The dict `from_meta` rebuilds this tokenizer from."""
        return {"kind": "hf", "path": str(self.path.absolute()), "vocab_size": self.vocab_size}


def _first_id(value) -> int | None:
    """A token id from config JSON: an int, the first of a list (Llama 3 lists several EOS ids), or None."""
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def special_ids(folder: Path, tokenizer) -> tuple[int | None, int | None]:
    """(bos_id, eos_id) of a model folder: generation_config.json, then config.json, then the token strings of
    tokenizer_config.json looked up in the tokenizer."""
    confs = [_read_json(folder / name) for name in SPECIAL_SOURCES if (folder / name).is_file()]
    f = folder / "tokenizer_config.json"
    tok_conf = _read_json(f) if f.is_file() else {}

    def find(kind: str) -> int | None:
        for conf in confs:
            found = _first_id(conf.get(f"{kind}_token_id"))
            if found is not None:
                return found
        token = tok_conf.get(f"{kind}_token")
        token = token.get("content") if isinstance(token, dict) else token
        return tokenizer.token_to_id(token) if isinstance(token, str) else None

    return find("bos"), find("eos")


def _read_json(f: Path) -> dict:
    try:
        d = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f} is not valid JSON ({e}); re-download the model folder") from e
    return d if isinstance(d, dict) else {}


def hf_tokenizer(path: str | os.PathLike) -> HFTokenizer:
    """The tokenizer of a Hugging Face model folder (its tokenizer.json), or of a tokenizer.json file."""
    path = Path(path)
    file = path / HF_TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist; a Hugging Face model folder ships its tokenizer as "
                                f"{HF_TOKENIZER_FILE}: download it beside config.json")
    from tokenizers import Tokenizer as RustTokenizer

    try:
        tok = RustTokenizer.from_file(str(file))
    except Exception as e:  # the library raises a bare Exception on any parse failure
        raise ValueError(f"{file} is not a readable tokenizers file ({e}); re-download it") from e
    bos, eos = special_ids(file.parent, tok)
    return HFTokenizer(tok, file, bos, eos)


def from_meta(meta: dict, bpe_path: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer described by a dataset/run meta dict: {"kind": "char", "chars": ...}, {"kind": "gpt2"} or
    {"kind": "hf", "path": tokenizer.json}."""
    kind = meta.get("kind")
    if kind == "char":
        return CharTokenizer(meta["chars"])
    if kind == "gpt2":
        return gpt2_tokenizer(bpe_path)
    if kind == "hf":
        return hf_tokenizer(meta["path"])
    raise ValueError(f"unknown tokenizer kind {kind!r} in meta; expected 'char', 'gpt2' or 'hf'")
