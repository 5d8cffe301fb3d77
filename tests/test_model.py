"""The model: every switch combination runs, and matches an independent float64 NumPy forward pass."""

import itertools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_params

from jaxgpt import GPT, GPTConfig

ALL = list(itertools.product(["learned", "sinusoidal", "rope", "none"], ["layernorm", "rmsnorm"], ["pre", "post"],
                             [True, False], [True, False]))


# ------------------------------------------------------------------------------------------------------------
# float64 NumPy reference, written from the papers (GPT-2, RoFormer, RMSNorm), independent of the Flax code


def np_attention(q, k, v, keep=None, keep_prob=1.0):
    """float64 causal softmax attention, q/k/v [B, T, H, D]; `keep` [B, H, T, T] drops probabilities."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    s = np.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
    T = q.shape[1]
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if keep is not None:
        p = np.where(np.asarray(keep), p / keep_prob, 0.0)
    return np.einsum("bhts,bshd->bthd", p, v)


def np_forward(cfg: GPTConfig, p, tokens: np.ndarray) -> np.ndarray:
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    B, T = tokens.shape
    C, H = cfg.n_embd, cfg.n_head
    D = C // H
    pos = np.arange(T)

    def norm(x, q):
        if cfg.norm == "rmsnorm":
            return x / np.sqrt((x**2).mean(-1, keepdims=True) + cfg.layer_norm_eps) * q["scale"]
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        y = (x - mu) / np.sqrt(var + cfg.layer_norm_eps) * q["scale"]
        return y + q["bias"] if cfg.bias else y

    def lin(x, q):
        return x @ q["kernel"] + (q["bias"] if cfg.bias else 0.0)

    def rope(x):  # x [B, T, H, D]; pairs (i, i + D/2)
        inv = 1.0 / cfg.rope_theta ** (np.arange(0, D, 2) / D)
        a = pos[:, None] * inv[None]  # [T, D/2]
        cos, sin = np.cos(a)[None, :, None], np.sin(a)[None, :, None]
        x1, x2 = x[..., : D // 2], x[..., D // 2 :]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    def gelu(x):
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    def attn(x, q):
        qkv = lin(x, q["c_attn"])
        qq, kk, vv = (t.reshape(B, T, H, D) for t in np.split(qkv, 3, -1))
        if cfg.pos_embedding == "rope":
            qq, kk = rope(qq), rope(kk)
        return lin(np_attention(qq, kk, vv).reshape(B, T, C), q["c_proj"])

    x = p["wte"]["embedding"][tokens]
    if cfg.pos_embedding == "learned":
        x = x + p["wpe"]["embedding"][pos]
    elif cfg.pos_embedding == "sinusoidal":
        pe = np.zeros((T, C))
        div = 10000.0 ** (np.arange(0, C, 2) / C)
        pe[:, 0::2], pe[:, 1::2] = np.sin(pos[:, None] / div), np.cos(pos[:, None] / div)
        x = x + 0.02 * np.sqrt(2.0) * pe  # RMS 0.02, like GPT-2's learned tables at init
    for i in range(cfg.n_layer):
        h = p[f"h_{i}"]
        mlp = lambda y: lin(gelu(lin(y, h["mlp"]["c_fc"])), h["mlp"]["c_proj"])  # noqa: E731
        if cfg.norm_position == "pre":
            x = x + attn(norm(x, h["ln_1"]), h["attn"])
            x = x + mlp(norm(x, h["ln_2"]))
        else:
            x = norm(x + attn(x, h["attn"]), h["ln_1"])
            x = norm(x + mlp(x), h["ln_2"])
    if cfg.norm_position == "pre":
        x = norm(x, p["ln_f"])
    head = p["wte"]["embedding"].T if cfg.tie_embeddings else p["lm_head"]["kernel"]
    return x @ head


@pytest.mark.parametrize("pos,norm,place,tie,bias", ALL[::2] + ALL[1::8])
def test_matches_numpy_float64(pos, norm, place, tie, bias):
    cfg = GPTConfig.preset("tiny", pos_embedding=pos, norm=norm, norm_position=place, tie_embeddings=tie, bias=bias)
    params = random_params(cfg, std=0.1)  # every leaf random: biases and norm params too, not the init's 0 and 1
    tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(3), (2, 13), 0, cfg.vocab_size))
    out = GPT(cfg).apply({"params": params}, jnp.asarray(tokens))
    chex.assert_shape(out, (2, 13, cfg.vocab_size))
    assert out.dtype == jnp.float32
    ref = np_forward(cfg, params, tokens)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=1e-4)  # float32 vs float64


@pytest.mark.parametrize("pos,norm,place,tie,bias", ALL)
def test_every_combination_runs(pos, norm, place, tie, bias):
    cfg = GPTConfig.preset("tiny", pos_embedding=pos, norm=norm, norm_position=place, tie_embeddings=tie, bias=bias,
                           dropout=0.1)
    params = GPT(cfg).init(jax.random.PRNGKey(1), jnp.zeros((1, 4), jnp.int32))["params"]  # eager too
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 9), 0, cfg.vocab_size)
    model = GPT(cfg)
    # eager (op-by-op) on purpose: 64 configurations share compiled ops instead of 64 whole-model compiles
    out = model.apply({"params": params}, tokens, deterministic=False, rngs={"dropout": jax.random.PRNGKey(5)})
    chex.assert_shape(out, (2, 9, cfg.vocab_size))
    chex.assert_tree_all_finite(out)
    assert ("wpe" in params) == (pos == "learned")
    assert ("lm_head" in params) == (not tie)
    assert ("ln_f" in params) == (place == "pre")


class ModelTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_causal(self):
        """Changing token t never changes logits before t."""
        cfg = GPTConfig.preset("tiny", pos_embedding="rope")
        params = random_params(cfg)
        fwd = self.variant(lambda p, t: GPT(cfg).apply({"params": p}, t))
        t1 = jax.random.randint(jax.random.PRNGKey(0), (1, 12), 0, cfg.vocab_size)
        t2 = t1.at[0, 7].set((t1[0, 7] + 1) % cfg.vocab_size)
        a, b = fwd(params, t1), fwd(params, t2)
        chex.assert_trees_all_close(a[:, :7], b[:, :7], atol=1e-6)
        assert float(jnp.abs(a[:, 7:] - b[:, 7:]).max()) > 1e-4

    @chex.variants(with_jit=True, without_jit=True)
    def test_dropout_uses_rng(self):
        cfg = GPTConfig.preset("tiny", dropout=0.2)
        params = random_params(cfg)
        t = jax.random.randint(jax.random.PRNGKey(0), (2, 8), 0, cfg.vocab_size)
        f = self.variant(lambda p, t, k: GPT(cfg).apply({"params": p}, t, deterministic=False, rngs={"dropout": k}))
        a, a2, b = f(params, t, jax.random.PRNGKey(1)), f(params, t, jax.random.PRNGKey(1)), f(params, t, jax.random.PRNGKey(2))
        chex.assert_trees_all_equal(a, a2)
        assert float(jnp.abs(a - b).max()) > 1e-3
        det = GPT(cfg).apply({"params": params}, t)  # deterministic: no dropout, no rng needed
        det2 = GPT(cfg.replace(dropout=0.0)).apply({"params": params}, t)
        chex.assert_trees_all_close(det, det2, atol=1e-6)


@pytest.mark.parametrize("impl", ["manual", "xla"])
def test_attention_impls_agree(impl):
    cfg = GPTConfig.preset("tiny", attention=impl)
    params = random_params(cfg, std=0.1)
    t = jax.random.randint(jax.random.PRNGKey(0), (2, 10), 0, cfg.vocab_size)
    ref = np_forward(cfg, params, np.asarray(t))
    np.testing.assert_allclose(np.asarray(GPT(cfg).apply({"params": params}, t)), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rate", [0.0, 0.2])
def test_blockwise_causal_attention_matches_float64(rate):
    """The manual path runs in query blocks of ATTENTION_BLOCK (T=300: blocks of 128, 128, 44), each against
    the keys up to its last row; with dropout each block draws its part of the full [B, H, T, T] mask."""
    from jaxgpt.nn.dropout import keep_mask, keep_probability
    from jaxgpt.nn.model import ATTENTION_BLOCK, dot_product_attention

    B, T, H, D = 2, 300, 2, 8
    assert T > 2 * ATTENTION_BLOCK
    q, k, v = (jax.random.normal(key, (B, T, H, D)) for key in jax.random.split(jax.random.PRNGKey(4), 3))
    rng = jax.random.PRNGKey(9) if rate else None
    out = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, None, impl="manual", dropout_rate=rate,
                                                        dropout_rng=rng))(q, k, v)
    keep = keep_mask(rng, rate, (B, H, T, T)) if rate else None
    ref = np_attention(q, k, v, keep, keep_probability(rate))
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5, rtol=1e-5)  # float32 vs float64


def test_bf16_compute_close_to_f32():
    cfg = GPTConfig.preset("tiny")
    params = random_params(cfg)
    t = jax.random.randint(jax.random.PRNGKey(0), (2, 10), 0, cfg.vocab_size)
    f32 = GPT(cfg).apply({"params": params}, t)
    bf16 = GPT(cfg.replace(dtype="bfloat16")).apply({"params": params}, t)
    assert bf16.dtype == jnp.float32  # logits are always float32
    np.testing.assert_allclose(np.asarray(bf16), np.asarray(f32), atol=5e-2)  # bf16 has ~3 significant digits
    assert jax.tree.leaves(params)[0].dtype == jnp.float32  # master weights stay float32


def test_too_long_sequence_error():
    cfg = GPTConfig.preset("tiny")
    params = random_params(cfg)
    with pytest.raises(ValueError, match="exceeds block_size"):
        GPT(cfg).apply({"params": params}, jnp.zeros((1, cfg.block_size + 1), jnp.int32))
