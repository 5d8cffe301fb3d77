"""Token shards in the llm.c / modded-nanogpt format, and a writer that cuts a token stream into them.

A shard file is a header of 256 int32 (magic 20240520, version 1, token count, the rest zero) followed by
that many uint16 token ids. Shards written by llm.c's `dev/data/fineweb.py` or modded-nanogpt load here as
they are, and ours load there. A prepared directory holds

  PREFIX_val_000000.bin      the held-out shard (the first `val_tokens` tokens of the stream)
  PREFIX_train_000001.bin    training shards of `shard_tokens` tokens each (the last one may be shorter)
  ...

Every file is written to a temporary name and renamed, so a reader never sees half a shard.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from jaxgpt.io import atomic

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAX_VOCAB = 2**16  # token ids are uint16
MAX_SHARD_TOKENS = 2**31 - 1  # the count is an int32
SPLITS = ("train", "val")


def check_vocab_fits(vocab_size: int) -> None:
    """Refuse a vocabulary whose ids do not fit uint16 shards."""
    if vocab_size > MAX_VOCAB:
        raise ValueError(f"vocab_size {vocab_size} does not fit uint16 shards (token ids must be < {MAX_VOCAB}); "
                         "use a tokenizer with at most 65536 tokens, e.g. GPT-2 BPE (50257)")


def shard_name(prefix: str, split: str, index: int) -> str:
    """`PREFIX_SPLIT_000042.bin`, llm.c's naming (one index sequence across both splits)."""
    return f"{prefix}_{split}_{index:06d}.bin"


def atomic_write_bytes(path: str | os.PathLike, chunks: Iterable[bytes | memoryview]) -> None:
    """Write `chunks` to a temporary file beside `path`, flush it to disk, then rename it onto `path`."""
    with atomic.file(path) as tmp, open(tmp, "wb") as f:
        for c in chunks:
            f.write(c)
        f.flush()
        os.fsync(f.fileno())


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> None:
    """Write uint16-representable `tokens` [N] as one llm.c shard, atomically."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or tokens.size > MAX_SHARD_TOKENS:
        raise ValueError(f"{path}: a shard holds a 1-D array of at most {MAX_SHARD_TOKENS} tokens, "
                         f"got shape {tokens.shape}; write smaller shards")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= MAX_VOCAB):
        raise ValueError(f"{path}: token ids must be in [0, {MAX_VOCAB}) for uint16 shards; "
                         "use a tokenizer with at most 65536 tokens")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, tokens.size)
    atomic_write_bytes(path, [header.tobytes(), np.ascontiguousarray(tokens, dtype="<u2").data])


def read_header(path: str | os.PathLike) -> int:
    """The token count of a shard, after checking its magic, version and size; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"shard {path} does not exist; prepare the data first (python -m jaxgpt.data)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(HEADER_BYTES), dtype="<i4")
    if header.size < HEADER_INTS:
        raise ValueError(f"shard {path} is {size} bytes, shorter than the {HEADER_BYTES}-byte header; "
                         "it is truncated: prepare it again")
    if header[0] != MAGIC:
        raise ValueError(f"shard {path} has magic {header[0]}, not {MAGIC}: it is not an llm.c uint16 token "
                         "shard (llama-3 uint32 shards are not supported); prepare it again")
    if header[1] != VERSION:
        raise ValueError(f"shard {path} has version {header[1]}, not {VERSION}; prepare it again")
    n = int(header[2])
    if size != HEADER_BYTES + 2 * n:
        raise ValueError(f"shard {path} holds {size - HEADER_BYTES} bytes of tokens, its header says {n} tokens "
                         f"({2 * n} bytes): it is truncated or damaged; prepare it again")
    return n


def open_shard(path: str | os.PathLike) -> np.memmap:
    """The tokens of a shard as a read-only uint16 memory map [N] (nothing is read until indexed)."""
    n = read_header(path)
    if n == 0:
        return np.zeros(0, dtype=np.uint16)  # np.memmap refuses an empty mapping
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n,))


def list_shards(data_dir: str | os.PathLike, split: str) -> list[Path]:
    """The shards of one split in a directory (`*_train_*.bin` / `*_val_*.bin`), sorted by name."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use 'train' or 'val'")
    return sorted(p for p in Path(data_dir).glob(f"*_{split}_*.bin") if p.is_file())


class ShardWriter:
    """Cuts a token stream into shards: the first `val_tokens` go to the val shard, then `shard_tokens` each.

    Memory is one shard's buffer. `on_shard(index, path, n_tokens, consumed)` runs after each shard is on disk,
    where `consumed` is how many tokens of the current `add` call went into shards so far (for resume records).
    """

    def __init__(self, out_dir: str | os.PathLike, prefix: str, shard_tokens: int, val_tokens: int,
                 start_index: int = 0, on_shard: Callable[[int, Path, int, int], None] | None = None) -> None:
        for name, v in (("shard_tokens", shard_tokens), ("val_tokens", val_tokens)):
            if not 0 < v <= MAX_SHARD_TOKENS:
                raise ValueError(f"{name}={v} is not valid; use 1 .. {MAX_SHARD_TOKENS}")
        self.out_dir, self.prefix = Path(out_dir), prefix
        self.sizes = (val_tokens, shard_tokens)
        self.index = start_index
        self.on_shard = on_shard
        self.buf = np.empty(max(shard_tokens, val_tokens), dtype=np.uint16)
        self.fill = 0

    def capacity(self) -> int:
        return self.sizes[0] if self.index == 0 else self.sizes[1]

    def path(self, index: int) -> Path:
        return self.out_dir / shard_name(self.prefix, "val" if index == 0 else "train", index)

    def add(self, tokens: np.ndarray) -> None:
        """Append tokens [N]; every full buffer is written out as the next shard."""
        pos = 0
        while pos < tokens.size:
            take = min(self.capacity() - self.fill, tokens.size - pos)
            self.buf[self.fill:self.fill + take] = tokens[pos:pos + take]
            self.fill += take
            pos += take
            if self.fill == self.capacity():
                self._flush(pos)

    def finish(self) -> None:
        """Write the partial last shard, if any."""
        if self.fill:
            self._flush(None)

    def _flush(self, consumed: int | None) -> None:
        path = self.path(self.index)
        write_shard(path, self.buf[:self.fill])
        n, self.fill = self.fill, 0
        self.index += 1
        if self.on_shard is not None:
            self.on_shard(self.index - 1, path, n, consumed)
