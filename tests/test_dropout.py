"""jaxgpt.nn.dropout: four 16-bit draws per threefry hash, blockwise-consistent masks, unbiased dropout."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.nn.dropout import dropout, keep_mask, keep_probability


def test_keep_probability_is_on_the_16_bit_grid():
    assert keep_probability(0.2) == 52429 / 65536
    assert keep_probability(0.0) == 1.0
    assert abs(keep_probability(0.1) - 0.9) < 2**-17
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="dropout rate"):
            keep_probability(bad)


@pytest.mark.parametrize("rate", [0.1, 0.2, 0.5])
def test_keep_rate_and_independence(rate):
    m = np.asarray(keep_mask(jax.random.PRNGKey(11), rate, (256, 1024)), np.float64)  # 262,144 draws
    p = keep_probability(rate)
    sigma = np.sqrt(p * (1 - p) / m.size)
    assert abs(m.mean() - p) < 5 * sigma, (m.mean(), p)
    # the four lanes of one hash sit side by side on the last axis; neighbours, lanes and rows must not correlate
    c = m - m.mean()
    for a, b in [(c[:, 0::4], c[:, 1::4]), (c[:, 1::4], c[:, 2::4]), (c[:, 0::4], c[:, 3::4]),
                 (c[:, 3::4], c[:, 4::4][:, :255]), (c[:-1], c[1:])]:
        a, b = a[..., :b.shape[-1]], b[..., :a.shape[-1]]
        corr = (a * b).mean() / (a.std() * b.std())
        assert abs(corr) < 5 / np.sqrt(a.size), corr


def test_blocks_are_blocks_of_the_full_mask():
    full_shape = (2, 3, 37, 41)  # ragged last axis: 41 = 10 hashes of 4 + 1
    blocks = [((0, 0, 5, 0), (2, 3, 20, 25)), ((1, 2, 30, 8), (1, 1, 7, 33)), ((0, 1, 0, 40), (2, 2, 37, 1))]

    @jax.jit
    def masks(key):  # one compile for the full mask and its blocks
        return keep_mask(key, 0.3, full_shape), [keep_mask(key, 0.3, shape, start=start, full_shape=full_shape)
                                                 for start, shape in blocks]

    full, parts = masks(jax.random.PRNGKey(3))
    for (start, shape), part in zip(blocks, parts):
        np.testing.assert_array_equal(np.asarray(part), np.asarray(full)[tuple(slice(s, s + d)
                                                                               for s, d in zip(start, shape))])
    key = jax.random.PRNGKey(3)
    np.testing.assert_array_equal(np.asarray(keep_mask(key, 0.3, (500,), start=(500,), full_shape=(1000,))),
                                  np.asarray(keep_mask(key, 0.3, (1000,)))[500:])


def test_bad_blocks_are_refused():
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="multiple of 4"):
        keep_mask(key, 0.2, (4, 4), start=(0, 2), full_shape=(4, 8))
    with pytest.raises(ValueError, match="outside"):
        keep_mask(key, 0.2, (4, 8), start=(1, 0), full_shape=(4, 8))
    with pytest.raises(ValueError, match="same rank"):
        keep_mask(key, 0.2, (4, 8), start=(0,), full_shape=(4, 8))


def test_keys_raw_typed_and_other_impls():
    raw, typed = jax.random.PRNGKey(7), jax.random.key(7)
    a, b = keep_mask(raw, 0.2, (64, 64)), keep_mask(typed, 0.2, (64, 64))
    chex.assert_trees_all_equal(a, b)  # the same threefry key words, raw or typed
    c = keep_mask(jax.random.PRNGKey(8), 0.2, (64, 64))
    differ = float(jnp.mean(a != c))
    assert 0.25 < differ < 0.39, differ  # independent masks differ with probability 2 p (1 - p) = 0.32
    rbg = keep_mask(jax.random.key(7, impl="rbg"), 0.2, (256, 256))  # not threefry: jax.random.bernoulli
    assert abs(float(rbg.mean()) - 0.8) < 0.01


class DropoutTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_inverted_dropout(self):
        x = jax.random.normal(jax.random.PRNGKey(1), (64, 512)) + 3.0
        f = self.variant(lambda x, k: dropout(x, 0.25, k))
        y = np.asarray(f(x, jax.random.PRNGKey(2)))
        mask = np.asarray(keep_mask(jax.random.PRNGKey(2), 0.25, x.shape))
        p = keep_probability(0.25)
        np.testing.assert_array_equal(y[~mask], 0.0)
        np.testing.assert_allclose(y[mask], np.asarray(x)[mask] / p, rtol=1e-6)  # float32 scaling
        ones = np.asarray(f(jnp.ones((512, 512)), jax.random.PRNGKey(3)), np.float64)
        assert abs(ones.mean() - 1.0) < 5 * np.sqrt((1 - p) / p / ones.size)  # unbiased

    def test_identity_cases(self):
        x = jax.random.normal(jax.random.PRNGKey(1), (8, 12))
        for y in (dropout(x, 0.5, jax.random.PRNGKey(0), deterministic=True), dropout(x, 0.0, jax.random.PRNGKey(0)),
                  dropout(x, 0.5, None)):
            chex.assert_trees_all_equal(y, x)

    def test_bf16_stays_bf16(self):
        x = jax.random.normal(jax.random.PRNGKey(1), (8, 16)).astype(jnp.bfloat16)
        assert dropout(x, 0.1, jax.random.PRNGKey(0)).dtype == jnp.bfloat16
