"""KV cache: sizes, per-row writes against NumPy, and the model's cached forward against a full forward."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.decode.kv_cache import KVCache, LayerKV, cache_bytes, init_cache
from jaxgpt.nn.config import GPTConfig
from jaxgpt.nn.model import GPT, init_params


@pytest.mark.parametrize("preset,batch,max_len,dtype", [
    ("tiny", 3, 11, jnp.float32), ("nano", 2, 64, jnp.bfloat16), ("tiny", 1, 1, jnp.float16)])
def test_cache_bytes_equals_real_nbytes(preset, batch, max_len, dtype):
    cfg = GPTConfig.preset(preset)
    cache = init_cache(cfg, batch, max_len, dtype)
    kv = sum(x.nbytes for layer in cache.layers for x in (layer.k, layer.v))
    assert cache_bytes(cfg, batch, max_len, dtype) == kv
    assert cache.nbytes == kv + cache.lengths.nbytes
    assert cache.max_len == max_len
    chex.assert_shape(cache.layers[0].k, (batch, max_len, cfg.n_head, cfg.head_dim))
    assert cache.layers[0].k.dtype == dtype and cache.lengths.dtype == jnp.int32


def test_cache_bytes_gpt2_memory_wall():
    """layers x 2 x batch x max_len x n_embd x bytes, checked on the abstract cache (nothing allocated)."""
    for preset, layers, embd in (("gpt2", 12, 768), ("gpt2-xl", 48, 1600)):
        cfg = GPTConfig.preset(preset)
        for dtype, size in ((jnp.float32, 4), (jnp.bfloat16, 2)):
            shapes = jax.eval_shape(lambda: init_cache(cfg, 8, 1024, dtype))
            real = sum(np.prod(x.shape) * x.dtype.itemsize for layer in shapes.layers for x in (layer.k, layer.v))
            assert cache_bytes(cfg, 8, 1024, dtype) == real == layers * 2 * 8 * 1024 * embd * size


class LayerWriteTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_layer_write_matches_numpy(self):
        rng = np.random.default_rng(0)
        B, S, T, H, D = 3, 9, 4, 2, 5
        k0, v0 = rng.normal(size=(2, B, S, H, D)).astype(np.float32)
        k, v = rng.normal(size=(2, B, T, H, D)).astype(np.float32)
        starts = np.array([0, 5, 2], np.int32)

        @self.variant
        def write(layer, k, v, starts):
            return layer.write(k, v, starts).read(jnp.float32)

        got_k, got_v = write(LayerKV(jnp.asarray(k0), jnp.asarray(v0)), k, v, starts)
        want_k, want_v = k0.astype(np.float64), v0.astype(np.float64)
        for b, s in enumerate(starts):
            want_k[b, s:s + T], want_v[b, s:s + T] = k[b], v[b]
        chex.assert_trees_all_close((got_k, got_v), (want_k, want_v), atol=0, rtol=0)


def test_bad_cache_arguments():
    cfg = GPTConfig.preset("tiny")
    with pytest.raises(ValueError, match="batch=0"):
        init_cache(cfg, 0, 8)
    layer = init_cache(cfg, 1, 4).layers[0]
    k = jnp.ones((1, 5, cfg.n_head, cfg.head_dim))
    with pytest.raises(ValueError, match="max_len 4"):
        layer.write(k, k, jnp.zeros((1,), jnp.int32))


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_model_cache_ragged_multi_token_steps(pos):
    """Prefill, then chunks of 2 tokens written at each row's own offset: logits equal a full forward per row."""
    cfg = GPTConfig.preset("tiny", pos_embedding=pos)
    model = GPT(cfg)
    params = init_params(cfg, 1)
    rng = np.random.default_rng(2)
    seqs = rng.integers(0, cfg.vocab_size, size=(2, 11)).astype(np.int32)
    lengths = np.array([5, 3], np.int32)  # row 1's prompt is 3 tokens, padded to 5 with junk
    apply = jax.jit(lambda p, t, c: model.apply({"params": p}, t, cache=c))
    logits, cache = apply(params, seqs[:, :5], init_cache(cfg, 2, 11))
    cache = cache.replace(lengths=jnp.asarray(lengths))
    steps = [logits]
    for _ in range(3):  # feed each row's next 2 tokens
        pos_now = np.asarray(cache.lengths)
        chunk = np.stack([seqs[b, pos_now[b]:pos_now[b] + 2] for b in range(2)])
        logits, cache = apply(params, chunk, cache)
        steps.append(logits)
    np.testing.assert_array_equal(cache.lengths, lengths + 6)
    full = np.asarray(jax.jit(lambda p, t: model.apply({"params": p}, t))(params, seqs))  # [2, 11, V], causal
    for b in range(2):
        got = np.concatenate([steps[0][b, :lengths[b]]] + [s[b] for s in steps[1:]])  # [lengths[b] + 6, V]
        np.testing.assert_allclose(got, full[b, :lengths[b] + 6], atol=1e-5, rtol=0)


def test_cache_is_a_pytree_of_arrays():
    """The cache flows through jit and tree utilities as a plain pytree (no hidden state)."""
    cfg = GPTConfig.preset("tiny")
    cache = init_cache(cfg, 2, 6)
    leaves, treedef = jax.tree.flatten(cache)
    assert len(leaves) == 2 * cfg.n_layer + 1
    again = jax.tree.unflatten(treedef, leaves)
    assert isinstance(again, KVCache) and isinstance(again.layers[0], LayerKV)
