"""RoPE against transformers' Llama rotary embedding, plus the relative-position property."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.nn.rope import apply_rope, rope_cos_sin


@pytest.mark.parametrize("theta", [10000.0, 500.0])
def test_matches_transformers_llama(theta):
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import (
        LlamaRotaryEmbedding,
        apply_rotary_pos_emb,
    )

    B, T, H, D = 2, 7, 4, 16
    rng = np.random.default_rng(0)
    q = rng.standard_normal((B, T, H, D)).astype(np.float32)
    k = rng.standard_normal((B, T, H, D)).astype(np.float32)
    pos = np.stack([np.arange(T), np.arange(T) + 11])  # per-row offsets, as a cache decode step passes

    cfg = LlamaConfig(hidden_size=H * D, num_attention_heads=H, rope_theta=theta)
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": theta}
    rot = LlamaRotaryEmbedding(cfg)
    qt, kt = torch.tensor(q).transpose(1, 2), torch.tensor(k).transpose(1, 2)  # HF: [B, H, T, D]
    cos, sin = rot(qt, torch.tensor(pos))
    ref_q, ref_k = apply_rotary_pos_emb(qt, kt, cos, sin)
    ref_q, ref_k = ref_q.transpose(1, 2).numpy(), ref_k.transpose(1, 2).numpy()

    out_q = np.asarray(apply_rope(jnp.asarray(q), jnp.asarray(pos), theta))
    out_k = np.asarray(apply_rope(jnp.asarray(k), jnp.asarray(pos), theta))
    np.testing.assert_allclose(out_q, ref_q, atol=1e-5)  # tolerance: 1e-5 absolute in float32
    np.testing.assert_allclose(out_k, ref_k, atol=1e-5)


class RelativeTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_dot_depends_only_on_offset(self):
        """q(m)·k(n) after rotation is a function of m - n only."""
        D = 32
        key = jax.random.PRNGKey(1)
        q = jax.random.normal(key, (1, 1, 1, D))
        k = jax.random.normal(jax.random.fold_in(key, 1), (1, 1, 1, D))

        @self.variant
        def score(m, n):
            qm = apply_rope(q, jnp.array([[m]]))
            kn = apply_rope(k, jnp.array([[n]]))
            return jnp.sum(qm * kn)

        base = [score(m, m - 3) for m in (3, 10, 50, 400)]
        chex.assert_trees_all_close(*base, atol=1e-4)  # float32 angles at position 400: ~1e-5 error
        assert abs(float(score(10, 7)) - float(score(10, 2))) > 1e-3  # and it does depend on the offset

    @chex.variants(with_jit=True, without_jit=True)
    def test_norm_preserved_and_identity_at_zero(self):
        x = jax.random.normal(jax.random.PRNGKey(2), (2, 5, 3, 8))
        pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
        y = self.variant(apply_rope)(x, pos)
        chex.assert_shape(y, (2, 5, 3, 8))
        chex.assert_trees_all_close(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
        chex.assert_trees_all_close(y[:, 0], x[:, 0], atol=1e-6)  # position 0 rotates by 0
        assert float(jnp.abs(y[:, 1:] - x[:, 1:]).max()) > 1e-2


def test_cos_sin_float64_reference():
    pos = np.array([[0, 3, 17, 255]])
    cos, sin = rope_cos_sin(jnp.asarray(pos), 8, 10000.0)
    inv = 1.0 / (10000.0 ** (np.arange(0, 8, 2, dtype=np.float64) / 8))
    ang = pos[..., None] * inv
    ang = np.concatenate([ang, ang], -1)
    np.testing.assert_allclose(np.asarray(cos), np.cos(ang), atol=2e-5)
    np.testing.assert_allclose(np.asarray(sin), np.sin(ang), atol=2e-5)
