"""The KV cache: a plain pytree passed into the model and returned updated, never hidden state.

Layout per layer: keys and values in fixed buffers [B, S, Hkv, D] (batch, max_len, key/value heads, head_dim;
Hkv = `GPTConfig.kv_heads`, fewer than the query heads under grouped-query attention). This is the [B, T, N, H]
layout `jax.nn.dot_product_attention` takes, so reads need no transpose; bytes and
semantics are the same as [B, H, S, D]. Buffers never change shape: a step writes with
`lax.dynamic_update_slice` at each row's own offset, so a decode loop compiles once.

A layer entry is any pytree with two methods, which is how compressed caches plug in:
  write(k, v, starts) -> new entry    k, v: [B, T, Hkv, D]; starts: [B] int32 first position of each row
  read(dtype) -> (k, v)               dense [B, S, Hkv, D] for attention
`init_cache` builds the uncompressed entries (LayerKV); `jaxgpt.decode.kv_compress` holds int8 / TurboQuant
ones in the same KVCache; `jaxgpt.decode.cache_kinds.new_cache` builds either from a kind string.

Writes past the end of the buffer cannot raise inside jit (lax.dynamic_update_slice clamps the offset), so
callers size the buffer for the whole sequence up front: `jaxgpt.decode.generation` uses prompt + new tokens.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxgpt.nn.config import GPTConfig


def write_rows(buf: jax.Array, new: jax.Array, starts: jax.Array) -> jax.Array:
    """Write new [B, T, ...] into buf [B, S, ...] at per-row offsets starts [B].

    A write past the buffer's end raises (dynamic_update_slice would clamp it onto earlier positions): always
    when it is longer than the buffer, and when the offsets are concrete (outside jit), also past the end.
    """
    T, S = new.shape[1], buf.shape[1]
    if T > S:
        raise ValueError(f"KV cache write of {T} positions does not fit a buffer of max_len "
                         f"{S}; create the cache with max_len >= prompt + new tokens")
    if not isinstance(starts, jax.core.Tracer) and int(np.max(np.asarray(starts))) + T > S:
        raise ValueError(f"KV cache write of {T} positions at offset {int(np.max(np.asarray(starts)))} runs past "
                         f"max_len {S}; create the cache with max_len >= prompt + new tokens")

    def one(b, n, s):
        return lax.dynamic_update_slice_in_dim(b, n.astype(b.dtype), s, axis=0)

    return jax.vmap(one)(buf, new, starts)


@flax.struct.dataclass
class LayerKV:
    """Uncompressed keys and values of one layer, [B, S, Hkv, D] each."""

    k: jax.Array
    v: jax.Array

    def write(self, k: jax.Array, v: jax.Array, starts: jax.Array) -> "LayerKV":
        return LayerKV(k=write_rows(self.k, k, starts), v=write_rows(self.v, v, starts))

    def read(self, dtype: Any) -> tuple[jax.Array, jax.Array]:
        return self.k.astype(dtype), self.v.astype(dtype)


@flax.struct.dataclass
class KVCache:
    """Per-layer entries plus each row's current length (tokens written so far)."""

    layers: tuple[Any, ...]
    lengths: jax.Array  # [B] int32

    @property
    def max_len(self) -> int:
        return jax.tree.leaves(self.layers[0])[0].shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes held by all arrays of the cache (including lengths)."""
        return sum(x.nbytes for x in jax.tree.leaves(self))


def init_cache(config: GPTConfig, batch: int, max_len: int, dtype: Any = jnp.float32) -> KVCache:
    """An empty cache for `batch` rows of up to `max_len` positions."""
    if batch <= 0 or max_len <= 0:
        raise ValueError(f"init_cache: batch={batch} and max_len={max_len} must both be positive")
    shape = (batch, max_len, config.kv_heads, config.head_dim)  # [B, S, Hkv, D]
    layers = tuple(
        LayerKV(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype)) for _ in range(config.n_layer)
    )
    return KVCache(layers=layers, lengths=jnp.zeros((batch,), jnp.int32))


def cache_bytes(config: GPTConfig, batch: int, max_len: int, dtype: Any = jnp.float32) -> int:
    """Bytes of the key/value buffers: layers x 2 x batch x max_len x kv_heads x head_dim x bytes per value
    (n_embd in place of kv_heads x head_dim for GPT-2; a quarter of it with n_head / 4 kv heads).

    Excludes the [B] int32 lengths (KVCache.nbytes counts them).
    """
    per_token = config.kv_heads * config.head_dim  # K or V values per token and layer
    return config.n_layer * 2 * batch * max_len * per_token * jnp.dtype(dtype).itemsize
