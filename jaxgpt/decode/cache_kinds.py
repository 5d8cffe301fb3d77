"""Cache kinds: `parse_kind` reads a kind string, `new_cache` builds the empty KV cache it names.

    "dense"                      float keys and values in the cache dtype (default: the model's compute dtype)
    "float32" "bfloat16" "float16"   dense, in that dtype
    "int8"                       int8 values with a float16 scale per (token, head)
    "turbo{b}" "turbo{b}-prod"   TurboQuant at b bits per value, b in 1, 1.5, ..., 4 (`jaxgpt.decode.kv_compress`)
    "uniform{b}"                 the per-coordinate uniform baseline at b bits per value

This is the only module that reads kind strings. It loads JAX only when a cache is built, so decoding
options can check a kind without JAX.
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxgpt.nn.config import GPTConfig

if TYPE_CHECKING:
    from jaxgpt.decode.kv_cache import KVCache

DENSE = "dense"
FLOAT_DTYPES = ("float32", "bfloat16", "float16")
KIND_HELP = ("dense | float32 | bfloat16 | float16 | int8 | turbo{b} | turbo{b}-prod | uniform{b}, "
             "b in 1, 1.5, 2, 2.5, 3, 3.5, 4")


@dataclasses.dataclass(frozen=True)
class CacheKind:
    """A parsed cache kind."""

    family: str  # "dense" | "int8" | "turbo" | "uniform"
    dtype: str | None = None  # dense: its float dtype (None: the model's compute dtype)
    bits: float | None = None  # turbo / uniform: bits per value
    prod: bool = False  # turbo: keys by TurboQuant_prod


def dtype_name(dtype: Any) -> str:
    """A float dtype (name, NumPy or JAX dtype) -> its name, one of FLOAT_DTYPES."""
    try:
        name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    except TypeError:
        name = None
    if name not in FLOAT_DTYPES:
        raise ValueError(f"cache dtype {dtype!r} is not valid; use one of {', '.join(FLOAT_DTYPES)}")
    return name


def parse_kind(kind: str, dtype: Any = None) -> CacheKind:
    """'turbo3.5-prod' -> CacheKind('turbo', bits=3.5, prod=True); 'bfloat16' -> CacheKind('dense', 'bfloat16').

    dtype: the float dtype of a "dense" cache; the other kinds fix their own and take none.
    """
    if dtype is not None and kind != DENSE:
        raise ValueError(f"cache dtype {dtype!r} applies to the 'dense' cache kind only, not {kind!r}; "
                         "drop the dtype or use the dense kind")
    if kind == DENSE:
        return CacheKind(DENSE, None if dtype is None else dtype_name(dtype))
    if kind in FLOAT_DTYPES:
        return CacheKind(DENSE, kind)
    if kind == "int8":
        return CacheKind("int8")
    m = re.fullmatch(r"(turbo|uniform)([1-4](?:\.5)?)(-prod)?", str(kind))
    if m is None or (m.group(3) and m.group(1) != "turbo") or m.group(2) == "4.5":
        raise ValueError(f"unknown KV-cache kind {kind!r}; use one of {KIND_HELP}")
    return CacheKind(m.group(1), bits=float(m.group(2)), prod=bool(m.group(3)))


def new_cache(kind: str, model_cfg: GPTConfig, batch: int, max_len: int, dtype: Any = None,
              seed: int = 0) -> KVCache:
    """An empty cache of `kind` for `batch` rows of up to `max_len` positions.

    dtype: the float dtype of a "dense" cache (default: the model's compute dtype).
    seed: draws the rotations and QJL matrices of the TurboQuant kinds.
    """
    spec = parse_kind(kind, dtype)
    if batch <= 0 or max_len <= 0:
        raise ValueError(f"new_cache: batch={batch} and max_len={max_len} must both be positive")
    if spec.family == DENSE:
        import jax.numpy as jnp

        from jaxgpt.decode.kv_cache import init_cache

        return init_cache(model_cfg, batch, max_len, jnp.dtype(spec.dtype or model_cfg.compute_dtype))
    from jaxgpt.decode.kv_compress import init_compressed_cache

    return init_compressed_cache(model_cfg, batch, max_len, spec, seed)
