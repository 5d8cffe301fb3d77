"""Rotary position embeddings (RoFormer), applied to queries and keys only.

Positions are explicit integers, so a KV-cache decode step passes its own offset. The rotation pairs
dimension i with i + D/2 (the "rotate_half" layout of GPT-NeoX and Llama), so results match
transformers' `LlamaRotaryEmbedding` + `apply_rotary_pos_emb`.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

Scaling = tuple[float, float, float, int] | None  # llama3: (factor, low_freq_factor, high_freq_factor, context)


def inverse_frequencies(head_dim: int, theta: float, scaling: Scaling = None) -> jax.Array:
    """The rotation frequencies [D/2] (float32): theta^(-2i/D), and with Llama 3.1's scaling the low frequencies
    (wavelengths over context / low_freq_factor) divided by `factor`, those between the two bounds smoothed."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # [D/2]
    if scaling is None:
        return inv_freq
    factor, low, high, context = scaling
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= context / high) & (wavelen <= context / low)
    return jnp.where(medium, smoothed, scaled)


@partial(jax.jit, static_argnames=("head_dim", "theta", "scaling"))
def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float = 10000.0,
                 scaling: Scaling = None) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables for integer positions [B, T] -> ([B, T, D], [B, T, D]) in float32."""
    inv_freq = inverse_frequencies(head_dim, theta, scaling)  # [D/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)  # [B, T, D]
    return jnp.cos(angles), jnp.sin(angles)


def _rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


@partial(jax.jit, static_argnames=("theta", "scaling"))
def apply_rope(x: jax.Array, positions: jax.Array, theta: float = 10000.0, scaling: Scaling = None) -> jax.Array:
    """Rotate x [B, T, H, D] by its positions [B, T] (or [T]); returns x's shape and dtype.

    The rotation is computed in float32 and cast back, so bf16 inputs keep accurate angles.
    """
    if positions.ndim == 1:
        positions = jnp.broadcast_to(positions, x.shape[:2])
    cos, sin = rope_cos_sin(positions, x.shape[-1], theta, scaling)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # [B, T, 1, D]
    xf = x.astype(jnp.float32)
    return (xf * cos + _rotate_half(xf) * sin).astype(x.dtype)
