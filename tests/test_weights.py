"""jaxgpt.nn.weights, the weight-leaf protocol and params path helpers: the array products against float64 NumPy,
a weight leaf written here in plain NumPy (a scaled matrix) to show that its own products are the ones used, a
quantized leaf kept whole when walking params (counted by hand), and path names against a plain-Python walk."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxgpt.nn import weights
from jaxgpt.quantize import quantize_array


class Scaled:
    """A weight leaf of the protocol written here: it stands for scale * w (w [in, out] or a table [V, C])."""

    def __init__(self, w: np.ndarray, scale: float) -> None:
        self.w, self.scale = w, scale
        self.shape, self.dtype = w.shape, w.dtype

    def dequantize(self, dtype: Any | None = None) -> jax.Array:
        return jnp.asarray(self.scale * self.w, dtype or self.dtype)

    def matmul(self, x: jax.Array, dtype: Any) -> jax.Array:
        return jnp.asarray(x, dtype) @ self.dequantize(dtype)

    def embed(self, ids: jax.Array, dtype: Any) -> jax.Array:
        return self.dequantize(dtype)[ids]

    def attend(self, x: jax.Array, dtype: Any) -> jax.Array:
        return jnp.asarray(x, dtype) @ self.dequantize(dtype).T


class NoAttend:
    """Has most of the protocol, not all of it."""

    shape = (2, 2)

    def matmul(self, x, dtype): ...

    def embed(self, ids, dtype): ...

    def dequantize(self, dtype=None): ...


def _normal(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# Products of plain arrays


def test_matmul_of_an_array_contracts_the_last_axis_of_x_with_the_first_of_w():
    rng = np.random.default_rng(0)
    x, w = _normal(rng, 2, 3, 5), _normal(rng, 5, 7)
    want = np.einsum("btk,kn->btn", x.astype(np.float64), w.astype(np.float64))
    for wt in (w, jnp.asarray(w)):  # a NumPy or a JAX array
        got = weights.matmul(jnp.asarray(x), wt, jnp.float32)
        assert got.shape == (2, 3, 7) and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_matmul_computes_in_the_dtype_it_is_given():
    rng = np.random.default_rng(1)
    x, w = _normal(rng, 4, 16), _normal(rng, 16, 8)
    got = weights.matmul(jnp.asarray(x), jnp.asarray(w), jnp.bfloat16)
    assert got.dtype == jnp.bfloat16
    want = x.astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=0.1 * np.abs(want).max())
    assert not np.allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-5)  # bfloat16 really ran


def test_embed_of_an_array_takes_the_rows_of_the_ids():
    rng = np.random.default_rng(2)
    table, ids = _normal(rng, 11, 6), rng.integers(0, 11, (3, 4))
    got = weights.embed(jnp.asarray(table), jnp.asarray(ids), jnp.float32)
    assert got.shape == (3, 4, 6)
    np.testing.assert_array_equal(np.asarray(got), table[ids])
    assert weights.embed(jnp.asarray(table), jnp.asarray(ids), jnp.bfloat16).dtype == jnp.bfloat16


def test_attend_of_an_array_multiplies_by_the_table_transposed():
    rng = np.random.default_rng(3)
    x, table = _normal(rng, 2, 5, 6), _normal(rng, 11, 6)
    got = weights.attend(jnp.asarray(x), jnp.asarray(table), jnp.float32)
    want = x.astype(np.float64) @ table.astype(np.float64).T
    assert got.shape == (2, 5, 11)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Weight leaves


def test_a_weight_leaf_brings_its_own_products():
    rng = np.random.default_rng(4)
    w, table = _normal(rng, 5, 7), _normal(rng, 11, 5)
    kernel, embedding = Scaled(w, 3.0), Scaled(table, -0.5)
    x, ids = _normal(rng, 2, 5), rng.integers(0, 11, (2, 3))
    w64, t64 = 3.0 * w.astype(np.float64), -0.5 * table.astype(np.float64)
    np.testing.assert_allclose(np.asarray(weights.matmul(jnp.asarray(x), kernel, jnp.float32)), x @ w64, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(weights.embed(embedding, jnp.asarray(ids), jnp.float32)), t64[ids],
                               rtol=1e-6)
    np.testing.assert_allclose(np.asarray(weights.attend(jnp.asarray(x), embedding, jnp.float32)), x @ t64.T,
                               rtol=1e-5, atol=1e-6)


def test_is_weight_leaf_holds_for_the_protocol_and_never_for_arrays():
    rng = np.random.default_rng(5)
    w = _normal(rng, 8, 6)
    assert weights.is_array(w) and weights.is_array(jnp.asarray(w))
    assert not weights.is_weight_leaf(w) and not weights.is_weight_leaf(jnp.asarray(w))
    assert weights.is_weight_leaf(Scaled(w, 2.0)) and not weights.is_array(Scaled(w, 2.0))
    assert weights.is_weight_leaf(quantize_array(jnp.asarray(w)))
    for other in (NoAttend(), {"kernel": w}, 1.5, None):
        assert not weights.is_weight_leaf(other), other


def test_dense_gives_the_float_weight_a_leaf_stands_for():
    rng = np.random.default_rng(6)
    w = _normal(rng, 16, 12)  # a Dense kernel [in, out]
    assert weights.dense(w) is w
    np.testing.assert_allclose(np.asarray(weights.dense(Scaled(w, 2.0))), 2.0 * w, rtol=1e-6)
    got = np.asarray(weights.dense(quantize_array(jnp.asarray(w))), np.float64)
    # int8 per output channel: every value within half a step (max |w[:, n]| / 127) of the weight
    half_step = np.abs(w.astype(np.float64)).max(axis=0) / 127 / 2
    assert got.shape == w.shape
    assert np.all(np.abs(got - w) <= half_step * (1 + 1e-5))
    assert not np.array_equal(got, w)  # it is the quantized weight, not the original
    assert weights.dense(quantize_array(jnp.asarray(w)), jnp.bfloat16).dtype == jnp.bfloat16


# ---------------------------------------------------------------------------------------------------------
# Walking params


def _tree(rng: np.random.Generator) -> dict:
    return {"h_0": {"attn": {"c_attn": {"kernel": quantize_array(jnp.asarray(_normal(rng, 16, 24))),
                                        "bias": _normal(rng, 24)}},
                    "ln_1": {"scale": _normal(rng, 16)}},
            "wte": {"embedding": _normal(rng, 11, 16)}}


def test_leaves_and_count_params_keep_weight_leaves_whole():
    rng = np.random.default_rng(7)
    tree = _tree(rng)
    got = weights.leaves(tree)
    q = tree["h_0"]["attn"]["c_attn"]["kernel"]
    assert len(got) == 4 and any(x is q for x in got)
    assert weights.count_params(tree) == 16 * 24 + 24 + 16 + 11 * 16  # the kernel counts as its 16 x 24 weight
    # walked without the protocol, the quantized kernel splits into int8 values [24, 16] and scales [24, 1]
    assert sum(x.size for x in jax.tree.leaves(tree)) == weights.count_params(tree) + 24


def test_path_str_names_dict_keys_attributes_and_indices():
    rng = np.random.default_rng(8)
    state = optax.ScaleByAdamState(count=np.int32(1), mu={"w": _normal(rng, 2)}, nu=[_normal(rng, 2)])
    names = [weights.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path({"opt": state})[0]]
    assert names == ["opt/count", "opt/mu/w", "opt/nu/0"]
    assert weights.path_str(("h_3", "mlp", "c_fc")) == "h_3/mlp/c_fc"


def test_flatten_with_paths_matches_a_plain_python_walk():
    rng = np.random.default_rng(9)
    tree = _tree(rng)

    def walk(node: Any, prefix: str) -> list[tuple[str, Any]]:
        if not isinstance(node, dict):
            return [(prefix, node)]
        return [item for k in sorted(node) for item in walk(node[k], f"{prefix}/{k}" if prefix else k)]

    want = walk(tree, "")
    got = weights.flatten_with_paths(tree)
    assert [n for n, _ in got] == [n for n, _ in want] == ["h_0/attn/c_attn/bias", "h_0/attn/c_attn/kernel",
                                                           "h_0/ln_1/scale", "wte/embedding"]
    assert all(a is b for (_, a), (_, b) in zip(got, want))


def test_get_path_walks_the_keys_and_names_the_first_missing_one():
    rng = np.random.default_rng(10)
    tree = _tree(rng)
    assert weights.get_path(tree, ("h_0", "ln_1", "scale")) is tree["h_0"]["ln_1"]["scale"]
    assert weights.get_path(tree, ("h_0", "attn")) is tree["h_0"]["attn"]
    with pytest.raises(KeyError, match="h_0/mlp"):
        weights.get_path(tree, ("h_0", "mlp", "c_fc", "kernel"))
    with pytest.raises(KeyError, match="wte/embedding/x"):  # a leaf has no keys
        weights.get_path(tree, ("wte", "embedding", "x"))


def test_set_path_copies_only_the_dicts_along_the_path():
    rng = np.random.default_rng(11)
    tree = _tree(rng)
    old, new_leaf = tree["h_0"]["ln_1"]["scale"], _normal(rng, 16)
    out = weights.set_path(tree, ("h_0", "ln_1", "scale"), new_leaf)
    assert out["h_0"]["ln_1"]["scale"] is new_leaf and tree["h_0"]["ln_1"]["scale"] is old  # the input is unchanged
    assert out is not tree and out["h_0"] is not tree["h_0"] and out["h_0"]["ln_1"] is not tree["h_0"]["ln_1"]
    assert out["wte"] is tree["wte"] and out["h_0"]["attn"] is tree["h_0"]["attn"]  # off the path: shared
    grown = weights.set_path(tree, ("lm_head", "kernel"), new_leaf)  # missing dicts are created
    assert grown["lm_head"] == {"kernel": new_leaf} and "lm_head" not in tree
