"""Decoding options: one frozen `DecodeOptions` that `generate`, `stream`, `sample_text`, `generate_uncached`
and `lower_generate` take. It checks itself when built; importing it does not import JAX."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from jaxgpt.decode.cache_kinds import DENSE, parse_kind


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """How to decode: sampling, stopping, the sliding window and the KV cache.

    temperature: 0 is greedy (top_k and top_p are then ignored); otherwise the logits are divided by it.
    top_k: keep the k most likely tokens (None: all). top_p: keep the smallest set of most likely tokens whose
        probability sums to >= top_p (None or 1: all). Top-k applies first, then top-p, as in transformers.
    seed: the integer seed of the random draws; sampling (temperature > 0) needs one, greedy does not.
    eos_id: a row that emits it stops; its later tokens are pad_id (default: eos_id, else 0).
    bos_id: the token an empty prompt starts from (default: eos_id).
    window: context tokens kept when a full context slides past block_size (default block_size // 2;
        block_size - 1 re-prefills at every token, as nanoGPT's crop). Checked against the model when decoding,
        as are the token ids against its vocabulary.
    cache_kind: "dense", "int8", "turbo3", ... (`jaxgpt.decode.cache_kinds`). cache_dtype: the float dtype of
        a "dense" cache (default: the model's compute dtype), stored as its name.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    bos_id: int | None = None
    window: int | None = None
    cache_kind: str = DENSE
    cache_dtype: str | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if not _is_real(t) or not 0 <= t < math.inf:
            raise ValueError(f"temperature={t!r} is not valid; use 0 (greedy) or a positive number")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise ValueError(f"top_k={self.top_k!r} is not valid; use a positive integer or None (no top-k)")
        if self.top_p is not None and (not _is_real(self.top_p) or not 0 < self.top_p <= 1):
            raise ValueError(f"top_p={self.top_p!r} is not valid; use a value in (0, 1] or None (no top-p)")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed={self.seed!r} is not valid; use an integer, or None when decoding greedily")
        for name in ("eos_id", "pad_id", "bos_id"):
            tok = getattr(self, name)
            if tok is not None and (not _is_int(tok) or tok < 0):
                raise ValueError(f"{name}={tok!r} is not a token id; use a non-negative integer or None")
        spec = parse_kind(self.cache_kind, self.cache_dtype)  # unknown kinds and dtypes raise here
        if self.cache_dtype is not None:
            object.__setattr__(self, "cache_dtype", spec.dtype)

    @property
    def greedy(self) -> bool:
        """Temperature 0: every step takes the most likely token."""
        return self.temperature == 0

    def replace(self, **changes: Any) -> DecodeOptions:
        """A copy with `changes` applied, checked again."""
        return dataclasses.replace(self, **changes)
