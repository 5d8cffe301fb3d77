"""Dropout with four masks per random hash.

`jax.random.bernoulli` (and so `flax.linen.Dropout`) spends one threefry2x32 hash, 64 random bits, on every
element. Here the two 32-bit words of each hash are split into four 16-bit draws, so a mask costs a quarter
of the hashing, at a little more compile time per mask (measured in docs/benchmarks.md, "Tuning notes").

P(keep) is 1 - rate rounded to a multiple of 2^-16 (0.8 -> 0.80000305) and kept values are scaled by its
exact inverse, so dropout stays unbiased. Draws are counter-based: element (i0, i1, ..., j) of a mask of
`full_shape` reads hash counter (i0, flat index of (i1, ..., j // 4)), lane j % 4, so any block of the mask
(`start`, `shape`) is the same block of the full mask -- blockwise attention gets the masks the full one
would -- and a sharded array computes only its own shard's draws.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

try:  # the threefry hash itself; jax.random.bernoulli stands in where a JAX release lacks it
    from jax.extend.random import threefry2x32_p
except ImportError:  # pragma: no cover
    threefry2x32_p = None

_LANES = 4  # 16-bit draws per hash: two 32-bit words, two halves each
_LEVELS = 1 << 16


def _raw_threefry_key(rng: jax.Array) -> jax.Array | None:
    """The uint32[2] words of a threefry key (raw or typed), None for any other kind of key."""
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        if str(jax.random.key_impl(rng)) != "threefry2x32":
            return None
        rng = jax.random.key_data(rng)
    if rng.dtype != jnp.uint32 or rng.shape != (2,):
        return None
    return rng


def keep_probability(rate: float) -> float:
    """The exact P(keep) that `keep_mask` draws with for a dropout rate: 1 - rate on a 2^-16 grid."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    return round((1.0 - rate) * _LEVELS) / _LEVELS


def keep_mask(rng: jax.Array, rate: float, shape: tuple[int, ...], *, start: tuple[int, ...] | None = None,
              full_shape: tuple[int, ...] | None = None) -> jax.Array:
    """Bool mask of `shape`, True with probability `keep_probability(rate)`: block `start` of a `full_shape` mask.

    `start[-1]` must be a multiple of 4 (a hash's four lanes lie along the last axis). With a key that is not
    threefry the mask comes from `jax.random.bernoulli` (not blockwise-consistent then).
    """
    shape = tuple(int(d) for d in shape)
    full_shape = tuple(int(d) for d in (full_shape or shape))
    start = tuple(int(s) for s in (start or (0,) * len(shape)))
    if not (len(shape) == len(full_shape) == len(start)) or not shape:
        raise ValueError(f"keep_mask: shape {shape}, start {start} and full_shape {full_shape} need the same rank >= 1")
    if any(s < 0 or s + d > f for s, d, f in zip(start, shape, full_shape)) or start[-1] % _LANES:
        raise ValueError(f"keep_mask: block {shape} at {start} is outside {full_shape} or its last start is not a "
                         f"multiple of {_LANES}")
    keep = keep_probability(rate)
    key = _raw_threefry_key(rng)
    if key is None or threefry2x32_p is None:
        return jax.random.bernoulli(rng, keep, shape)
    # hashes: one per 4 elements of the last axis; counter hi word = index along axis 0, lo word = flat rest
    groups = (*shape[:-1], -(-shape[-1] // _LANES))  # [..., ceil(S / 4)]
    full_groups = (*full_shape[:-1], -(-full_shape[-1] // _LANES))
    starts = (*start[:-1], start[-1] // _LANES)
    if math.prod(full_groups[1:]) >= 2**32:
        raise ValueError(f"keep_mask: {full_shape} has over 2^32 hashes per leading index")
    hi = lax.broadcasted_iota(jnp.uint32, groups, 0) + jnp.uint32(starts[0])
    lo = jnp.zeros(groups, jnp.uint32)
    stride = 1
    for ax in range(len(groups) - 1, 0, -1):
        lo = lo + (lax.broadcasted_iota(jnp.uint32, groups, ax) + jnp.uint32(starts[ax])) * jnp.uint32(stride)
        stride *= full_groups[ax]
    if len(groups) == 1:  # a vector: its one axis is the lanes' axis, counted in the lo word
        hi, lo = jnp.zeros(groups, jnp.uint32), hi
    w1, w2 = threefry2x32_p.bind(key[0], key[1], hi, lo)
    threshold = jnp.uint32(round(keep * _LEVELS))
    lanes = (w1 & 0xFFFF, w1 >> 16, w2 & 0xFFFF, w2 >> 16)
    mask = jnp.stack([lane < threshold for lane in lanes], axis=-1)  # [..., ceil(S / 4), 4]
    return mask.reshape(*groups[:-1], groups[-1] * _LANES)[..., :shape[-1]]


def dropout(x: jax.Array, rate: float, rng: jax.Array | None, deterministic: bool = False, *,
            start: tuple[int, ...] | None = None, full_shape: tuple[int, ...] | None = None) -> jax.Array:
    """Inverted dropout of x with `keep_mask` (x as block `start` of a `full_shape` array); identity when
    deterministic, rate 0 or no rng."""
    if deterministic or rate == 0.0 or rng is None:
        return x
    mask = keep_mask(rng, rate, x.shape, start=start, full_shape=full_shape)
    return jnp.where(mask, x / jnp.asarray(keep_probability(rate), x.dtype), jnp.zeros((), x.dtype))
