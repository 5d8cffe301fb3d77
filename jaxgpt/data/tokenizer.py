"""Tokenizers: GPT-2 BPE through tiktoken (online, or offline from a local ranks file) and a char tokenizer.

Both have the same small interface: `encode(text) -> list[int]`, `decode(ids) -> str`, `vocab_size`,
`eot_id` (None for the char tokenizer) and `kind`.
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


def from_meta(meta: dict, bpe_path: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer described by a dataset/run meta dict: {"kind": "char", "chars": ...} or {"kind": "gpt2"}."""
    kind = meta.get("kind")
    if kind == "char":
        return CharTokenizer(meta["chars"])
    if kind == "gpt2":
        return gpt2_tokenizer(bpe_path)
    raise ValueError(f"unknown tokenizer kind {kind!r} in meta; expected 'char' or 'gpt2'")
