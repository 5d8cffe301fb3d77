"""scan_layers and remat change how the step runs, never its numbers: logits and gradients equal the unrolled
model's (float32, 1e-6) on fresh random params and tokens, with a cache, LoRA, int8 weights and a Hugging Face
round trip; and the layout converters of jaxgpt.layers. Every model run is jitted (eager flax runs op by op)."""

from __future__ import annotations

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import layers, lora
from jaxgpt.config import GPTConfig
from jaxgpt.kv_cache import init_cache
from jaxgpt.model import GPT, init_params
from jaxgpt.quantize import QuantConfig, quantize

TOL = 1e-6  # float32: the scan and remat only reorder when the same ops run
BASE = GPTConfig(vocab_size=61, block_size=16, n_layer=2, n_head=2, n_embd=16)
REMATS = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
# representative switch combinations (each against its own unrolled model); the cheap axes are crossed below
SWITCHES = [
    dict(),
    dict(pos_embedding="rope", norm="rmsnorm", bias=False, tie_embeddings=False),
    dict(pos_embedding="sinusoidal", norm_position="post", attention="manual"),
    dict(pos_embedding="none", attention="manual"),
]


def _params(cfg: GPTConfig, seed: int):
    """Random params (not the init: LayerNorm scales of one would hide a swapped layer)."""
    shapes = jax.eval_shape(lambda: init_params(cfg, seed))
    leaves, treedef = jax.tree.flatten(shapes)

    @jax.jit
    def draw(key):
        keys = jax.random.split(key, len(leaves))
        return [0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]

    return jax.tree.unflatten(treedef, draw(jax.random.PRNGKey(seed + 100)))


def _tokens(cfg: GPTConfig, seed: int, batch: int = 2, T: int = 12) -> jax.Array:
    return jax.random.randint(jax.random.PRNGKey(seed), (batch, T), 0, cfg.vocab_size)


@functools.lru_cache(maxsize=None)
def _logits_and_grads(cfg: GPTConfig, seed: int):
    """Logits and the gradient of a loss that weighs every logit differently (a mean: cross-entropy's scale)."""
    params, tokens = _params(cfg, seed), _tokens(cfg, seed)

    def loss(p):
        logits = GPT(cfg).apply({"params": p}, tokens)
        return (logits * jnp.cos(jnp.arange(logits.size).reshape(logits.shape))).mean(), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits, grads


def _check_same(cfg: GPTConfig, seed: int) -> None:
    ref = _logits_and_grads(cfg.replace(remat="none", scan_layers=False), seed)
    chex.assert_trees_all_close(_logits_and_grads(cfg, seed), ref, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("remat,scan", [c for c in itertools.product(REMATS[:3], [False, True]) if c != ("none", False)]
                         + [(REMATS[3], True)])
def test_remat_and_scan_match_unrolled(remat, scan):
    _check_same(BASE.replace(remat=remat, scan_layers=scan), seed=0)


@pytest.mark.parametrize("i", range(1, len(SWITCHES)))
def test_switches_scanned_with_remat_match_unrolled(i):
    _check_same(BASE.replace(remat="dots_saveable", scan_layers=True, **SWITCHES[i]), seed=10 + i)


def test_scan_really_scans_and_remat_really_remats():
    tokens = _tokens(BASE, 0)
    params = init_params(BASE, 0)

    def jaxpr(cfg):
        return str(jax.make_jaxpr(jax.grad(lambda p: GPT(cfg).apply({"params": p}, tokens).sum()))(params))

    plain, scanned, remat = jaxpr(BASE), jaxpr(BASE.replace(scan_layers=True)), jaxpr(BASE.replace(remat="full"))
    assert "scan" not in plain and "scan" in scanned
    assert "remat" not in plain and "remat" in remat


def test_cached_decode_matches_unrolled():
    cfg = BASE.replace(pos_embedding="rope")
    params, tokens = _params(cfg, 3), _tokens(cfg, 3, T=9)

    @functools.partial(jax.jit, static_argnums=0)
    def run(c):
        cache = init_cache(c, 2, 12)
        logits0, cache = GPT(c).apply({"params": params}, tokens[:, :6], cache=cache)  # prefill
        logits1, cache = GPT(c).apply({"params": params}, tokens[:, 6:], cache=cache)  # 3 more
        return logits0, logits1, cache, GPT(c).apply({"params": params}, tokens)

    ref, got = run(cfg), run(cfg.replace(scan_layers=True, remat="full"))
    assert isinstance(got[2].layers, tuple) and len(got[2].layers) == cfg.n_layer
    chex.assert_trees_all_close(got, ref, atol=TOL, rtol=TOL)
    whole = got[3]  # and the cache is right: the same logits as without one
    chex.assert_trees_all_close(jnp.concatenate(got[:2], axis=1), whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("targets", [("attn/c_attn/q", "attn/c_attn/v", "mlp/c_fc"), ("h_1/attn/c_attn",)])
def test_lora_scanned_matches_unrolled(targets):
    """Adapters on every layer stack and scan; on one layer only the blocks differ and run unrolled."""
    params = _params(BASE, 4)
    lcfg = lora.LoraConfig(rank=2, alpha=3.0, targets=targets)
    adapters = jax.tree.map(lambda a: a + 0.1, lora.init_lora(jax.random.PRNGKey(1), params, lcfg))  # B != 0
    tokens = _tokens(BASE, 4)

    def loss(a, cfg):
        return GPT(cfg).apply({"params": lora.apply_lora(params, a, lcfg)}, tokens).std()

    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    ref = value_and_grad(adapters, BASE)
    got = value_and_grad(adapters, BASE.replace(scan_layers=True, remat="dots_saveable"))
    chex.assert_trees_all_close(got, ref, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_scanned_matches_unrolled(bits):
    q = quantize(_params(BASE, 5), QuantConfig(bits=bits))
    tokens = _tokens(BASE, 5)
    run = jax.jit(lambda p, c: GPT(c).apply({"params": p}, tokens), static_argnums=1)
    ref, got = run(q, BASE), run(q, BASE.replace(scan_layers=True))
    chex.assert_trees_all_close(got, ref, atol=TOL, rtol=TOL)


def test_hf_round_trip_scanned(tmp_path):
    """Hugging Face files hold the unrolled layout; a scanned model reads them back unchanged."""
    from jaxgpt.checkpoint import export_hf_gpt2, load_hf_gpt2

    cfg = BASE.replace(scan_layers=True, remat="full")
    params, tokens = _params(cfg, 6), _tokens(cfg, 6)
    export_hf_gpt2(cfg, params, tmp_path / "hf")
    cfg2, params2 = load_hf_gpt2(str(tmp_path / "hf"))
    run = jax.jit(lambda p, c: GPT(c).apply({"params": p}, tokens), static_argnums=1)
    chex.assert_trees_all_close(run(params2, cfg2.replace(scan_layers=True)), run(params, BASE), atol=TOL, rtol=TOL)


def test_dropout_scanned_draws_per_layer_masks():
    """Dropout runs under the scan (its own masks: layer i folds i into the key), reproducible per key."""
    cfg = BASE.replace(dropout=0.2, scan_layers=True, attention="manual")
    params, tokens = _params(cfg, 7), _tokens(cfg, 7)

    @jax.jit
    def run(key):
        return (GPT(cfg).apply({"params": params}, tokens, deterministic=False, rngs={"dropout": key}),
                GPT(cfg).apply({"params": params}, tokens))

    (a, clean), (b, _), (c, _) = run(jax.random.PRNGKey(0)), run(jax.random.PRNGKey(0)), run(jax.random.PRNGKey(1))
    chex.assert_trees_all_equal(a, b)
    assert float(jnp.abs(a - c).max()) > 1e-3
    assert float(jnp.abs(a - clean).max()) > 1e-3


def test_stack_unstack_layers_round_trip():
    params = jax.device_get(_params(BASE, 8))
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


@pytest.mark.parametrize("field,value", [("remat", "some"), ("scan_layers", 1)])
def test_bad_config(field, value):
    with pytest.raises(ValueError, match=f"GPTConfig.{field}"):
        GPTConfig(**{field: value})


def test_old_config_dict_loads_with_defaults():
    d = BASE.to_dict()
    del d["remat"], d["scan_layers"]  # a config.json written before these fields
    cfg = GPTConfig.from_dict(d)
    assert (cfg.remat, cfg.scan_layers) == ("none", False)
