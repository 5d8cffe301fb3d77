"""jaxgpt.nn.stacking: per-layer trees stacked along a leading layer axis and back, checked against NumPy's np.stack
and indexing of the same fresh random leaves, on model-shaped params, hand-built trees and an optax Adam state."""

from __future__ import annotations

from typing import Any

import chex
import jax
import numpy as np
import optax
import pytest
from helpers import random_params

from jaxgpt.nn import stacking as layers
from jaxgpt.nn.config import GPTConfig

BASE = GPTConfig(vocab_size=61, block_size=16, n_layer=2, n_head=2, n_embd=16)


def _params(cfg: GPTConfig, seed: int) -> Any:
    """Random params (not the init: LayerNorm scales of one would hide a swapped layer)."""
    return random_params(cfg, seed, std=0.3, norm_scales="same")


def _block(rng: np.random.Generator) -> dict:
    """A small block-shaped tree of fresh random leaves."""
    return {"attn": {"kernel": rng.standard_normal((3, 5)).astype(np.float32),
                     "bias": rng.standard_normal(5).astype(np.float32)},
            "ln": {"scale": rng.standard_normal(3).astype(np.float32)}}


# ---------------------------------------------------------------------------------------------------------
# stack / unstack and the layout of whole params


def test_stack_unstack_layers_round_trip():
    params = jax.device_get(_params(BASE, 13))
    stacked = jax.device_get(layers.stack_layers(params))
    assert sorted(stacked) == ["h", "ln_f", "wpe", "wte"]
    chex.assert_shape(stacked["h"]["attn"]["c_attn"]["kernel"], (2, 16, 48))
    np.testing.assert_array_equal(stacked["h"]["mlp"]["c_fc"]["kernel"][1], params["h_1"]["mlp"]["c_fc"]["kernel"])
    chex.assert_trees_all_equal(layers.unstack_layers(stacked), params)
    with pytest.raises(ValueError, match="needs unrolled params"):
        layers.stack_layers(stacked)
    with pytest.raises(ValueError, match="needs stacked params"):
        layers.unstack_layers(params)
    ragged = {**params, "h_1": {"ln_1": params["h_1"]["ln_1"]}}
    with pytest.raises(ValueError, match="differ in structure"):
        layers.stack_layers(ragged)


def test_stack_tree_leaves_non_layer_trees_alone():
    params = jax.device_get(_params(BASE, 3))
    tree = {"params": params, "other": {"x": np.ones(3)}, "n": 4}
    stacked = layers.stack_tree(tree)
    assert sorted(stacked["params"]) == ["h", "ln_f", "wpe", "wte"]
    chex.assert_trees_all_equal(stacked["other"], tree["other"])
    chex.assert_trees_all_equal(layers.unstack_tree(stacked), tree)


def test_stack_puts_tree_i_at_index_i_of_a_new_leading_axis():
    rng = np.random.default_rng(0)
    blocks = [_block(rng) for _ in range(4)]
    stacked = jax.device_get(layers.stack(blocks))
    want = {"attn": {"kernel": np.stack([b["attn"]["kernel"] for b in blocks]),
                     "bias": np.stack([b["attn"]["bias"] for b in blocks])},
            "ln": {"scale": np.stack([b["ln"]["scale"] for b in blocks])}}
    chex.assert_trees_all_equal(stacked, want)
    chex.assert_shape(stacked["attn"]["kernel"], (4, 3, 5))


def test_stack_then_unstack_returns_the_same_layers_in_order():
    rng = np.random.default_rng(1)
    blocks = [_block(rng) for _ in range(3)]
    back = jax.device_get(layers.unstack(layers.stack(blocks), 3))
    assert isinstance(back, tuple) and len(back) == 3
    for got, want in zip(back, blocks):
        chex.assert_trees_all_equal(got, want)


def test_stack_layers_keeps_every_other_key_and_stacks_h_0_to_h_n_in_numeric_order():
    """With 11 blocks, h_10 sorts before h_2 as a string: the stacked axis must still follow the layer number."""
    rng = np.random.default_rng(2)
    params = {f"h_{i}": _block(rng) for i in range(11)}
    params["wte"] = {"embedding": rng.standard_normal((7, 3)).astype(np.float32)}
    stacked = jax.device_get(layers.stack_layers(params))
    assert sorted(stacked) == ["h", "wte"]
    np.testing.assert_array_equal(stacked["wte"]["embedding"], params["wte"]["embedding"])
    for i in range(11):
        np.testing.assert_array_equal(stacked["h"]["attn"]["kernel"][i], params[f"h_{i}"]["attn"]["kernel"])
    chex.assert_trees_all_equal(jax.device_get(layers.unstack_layers(stacked)), params)


# ---------------------------------------------------------------------------------------------------------
# Predicates


def test_same_structure_needs_one_structure_and_one_shape_per_leaf():
    rng = np.random.default_rng(3)
    a, b = _block(rng), _block(rng)
    assert layers.same_structure([a, b, a])
    assert not layers.same_structure([])
    assert not layers.same_structure([a, None])
    wider = {**b, "attn": {**b["attn"], "kernel": rng.standard_normal((3, 6)).astype(np.float32)}}
    assert not layers.same_structure([a, wider])  # one structure, another shape
    fewer = {"attn": b["attn"]}
    assert not layers.same_structure([a, fewer])  # another structure


def test_layer_count_counts_the_keys_h_and_a_number_only():
    tree = {"h_0": 1, "h_1": 2, "h_12": 3, "wte": 4, "h": 5, "h_x": 6, "hh_2": 7, "h_3a": 8, "ln_f": 9}
    assert layers.layer_count(tree) == 3
    assert layers.layer_count({"wte": 1}) == 0


def test_is_unrolled_and_is_stacked_tell_the_two_layouts_apart():
    rng = np.random.default_rng(4)
    unrolled = {"h_0": _block(rng), "h_1": _block(rng), "wte": rng.standard_normal(2)}
    stacked = layers.stack_layers(unrolled)
    assert layers.is_unrolled(unrolled) and not layers.is_stacked(unrolled)
    assert layers.is_stacked(stacked) and not layers.is_unrolled(stacked)
    for other in ({"wte": 1}, ["h_0"], "h", None):
        assert not layers.is_unrolled(other) and not layers.is_stacked(other)


def test_in_stacked_is_true_exactly_for_leaves_under_the_key_h():
    rng = np.random.default_rng(5)
    tree = {"h": _block(rng), "h_0": _block(rng), "wte": {"embedding": rng.standard_normal(3)},
            "mu": {"h": {"k": rng.standard_normal(2)}}}
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    for path, _ in flat:
        names = [k.key for k in path]
        assert layers.in_stacked(path) == ("h" in names), names
    assert sum(layers.in_stacked(p) for p, _ in flat) == 4  # h's 3 leaves and mu/h/k


# ---------------------------------------------------------------------------------------------------------
# Whole states


def test_stack_tree_stacks_the_params_inside_an_adam_state():
    """Each params-shaped dict inside the optimizer state (Adam's mu and nu) is stacked like the params, and
    unstack_tree gives the state back; the step count passes through."""
    rng = np.random.default_rng(6)

    def params() -> dict:
        return {"h_0": _block(rng), "h_1": _block(rng), "h_2": _block(rng),
                "wpe": {"embedding": rng.standard_normal((4, 3)).astype(np.float32)}}

    state = optax.ScaleByAdamState(count=np.int32(7), mu=params(), nu=params())
    stacked = jax.device_get(layers.stack_tree(state))
    assert isinstance(stacked, optax.ScaleByAdamState) and stacked.count == 7
    for got, src in ((stacked.mu, state.mu), (stacked.nu, state.nu)):
        assert sorted(got) == ["h", "wpe"]
        want = np.stack([src[f"h_{i}"]["ln"]["scale"] for i in range(3)])
        np.testing.assert_array_equal(got["h"]["ln"]["scale"], want)
        np.testing.assert_array_equal(got["wpe"]["embedding"], src["wpe"]["embedding"])
    chex.assert_trees_all_equal(jax.device_get(layers.unstack_tree(stacked)), state)
