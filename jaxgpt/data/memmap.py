"""A prepared dataset directory read back: meta.json, the token memmaps of each split (uint16, or the
`token_dtype` meta.json names: uint32 for vocabularies over 65,536), and batches of
random windows drawn by a NumPy RNG seeded by (seed, split, step) alone."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

SPLITS = ("train", "val")


def load_meta(data_dir: str | os.PathLike) -> dict[str, Any]:
    """meta.json of a prepared dataset directory."""
    f = Path(data_dir) / "meta.json"
    if not f.is_file():
        raise FileNotFoundError(f"{f} does not exist; prepare the data first (python -m jaxgpt.data --out {data_dir})")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f} is not valid JSON ({e}); prepare the data again with --overwrite") from e


def load_split(data_dir: str | os.PathLike, split: str, block_size: int) -> np.memmap:
    """The token memmap of one split (uint16, or meta.json's `token_dtype`), checked to hold at least
    block_size + 1 tokens."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use 'train' or 'val'")
    f = Path(data_dir) / f"{split}.bin"
    if not f.is_file():
        raise FileNotFoundError(f"{f} does not exist; prepare the data first (python -m jaxgpt.data --out {data_dir})")
    meta = Path(data_dir) / "meta.json"
    dtype = np.dtype(load_meta(data_dir).get("token_dtype", "uint16") if meta.is_file() else "uint16")
    size, width = f.stat().st_size, dtype.itemsize
    if size % width:
        raise ValueError(f"{f} has {size} bytes, not a whole number of {dtype.name} tokens; "
                         "prepare the data again with --overwrite")
    if size // width < block_size + 1:
        raise ValueError(f"{f} holds {size // width} tokens, fewer than block_size + 1 = {block_size + 1}; "
                         "use more text or a smaller block_size")
    return np.memmap(f, dtype=dtype, mode="r")


def batch_rng(seed: int, step: int, split: str = "train", stream: int = 0) -> np.random.Generator:
    """The RNG of one batch: a function of (seed, split, step, stream) only (stream 0 trains, 1 evaluates)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use 'train' or 'val'")
    return np.random.default_rng([int(seed), SPLITS.index(split), int(step), int(stream)])


def get_batch(data: np.ndarray, batch_size: int, block_size: int, rng: np.random.Generator,
              ) -> tuple[np.ndarray, np.ndarray]:
    """Random windows: inputs x [B, T] and next-token targets y [B, T] (int32)."""
    n = len(data) - block_size
    if n < 1:
        raise ValueError(f"data holds {len(data)} tokens, fewer than block_size + 1 = {block_size + 1}; "
                         "use more text or a smaller block_size")
    starts = rng.integers(0, n, size=batch_size)  # [B]
    idx = starts[:, None] + np.arange(block_size + 1)[None, :]  # [B, T+1]
    window = np.asarray(data[idx], dtype=np.int32)
    return window[:, :-1], window[:, 1:]
