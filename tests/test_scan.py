"""scan_layers and remat change how the step runs, never its numbers: logits and gradients equal the unrolled
model's (float32, 1e-6) on fresh random params and tokens, across the architecture switches and every remat
policy, with a KV cache, LoRA, int8/int4 weights and a Hugging Face round trip (jaxgpt.nn.stacking's layout
converters on their own: test_stacking.py).

Compiling is what these tests cost, so: one tiny config; a set of switch combinations in which every value of
every switch, every remat policy and both layouts appear (remat and scan never change the numbers, so one
combination per policy suffices); logits and gradients from one compiled function; and XLA:CPU's fast-compile settings
(helpers.FAST_COMPILE). Every model run is jitted (eager flax runs op by op)."""

from __future__ import annotations

import functools
import re
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_params

from jaxgpt import lora
from jaxgpt.decode.kv_cache import init_cache
from jaxgpt.io.hf import export_hf_gpt2, load_hf_gpt2
from jaxgpt.nn import config as config_lib
from jaxgpt.nn import stacking as layers
from jaxgpt.nn.config import GPTConfig
from jaxgpt.nn.model import GPT
from jaxgpt.quantize import QuantConfig, quantize
from jaxgpt.train import steps
from jaxgpt.train.config import OptimConfig

TOL = 1e-6  # float32: the scan and remat only reorder when the same ops run
BASE = GPTConfig(vocab_size=61, block_size=16, n_layer=2, n_head=2, n_embd=16)
# XLA:CPU without LLVM optimisation and with its classic per-op emitters compiles these small programs several
# times faster. Both sides of every comparison are compiled alike, so what is compared is unchanged.
# How each remat policy reads in the program (jax.checkpoint's policy), so a test can see it is the one applied.
POLICY_NAMES = {"full": "nothing_saveable", "dots_saveable": "DotsSaveable(only_if_no_batch_dims=False)",
                "dots_with_no_batch_dims_saveable": "DotsSaveable(only_if_no_batch_dims=True)"}
LORA_ALL = lora.LoraConfig(rank=2, alpha=3.0, targets=("attn/c_attn/q", "attn/c_attn/v", "mlp/c_fc"))
LORA_ONE = lora.LoraConfig(rank=2, alpha=3.0, targets=("h_1/attn/c_attn",))


class Case(NamedTuple):
    switches: dict[str, Any]  # the architecture, for both models
    run: dict[str, Any]  # how the compared model runs (the reference: unrolled, no remat)
    adapters: lora.LoraConfig | None  # adapters (activation-space, lora.wrap) with gradients for them too
    scans: bool  # whether the compared model really runs a lax.scan
    hf: bool = False  # the compared model reads its params back from Hugging Face files (the unrolled layout)


CASES = {
    "gpt2-scan-full-hf": Case({}, dict(scan_layers=True, remat="full"), None, True, hf=True),
    # adapters on every layer stack and scan with the blocks
    "rope-rmsnorm-untied-nobias-lora-scan-dots": Case(
        dict(pos_embedding="rope", norm="rmsnorm", bias=False, tie_embeddings=False),
        dict(scan_layers=True, remat="dots_saveable"), LORA_ALL, True),
    "sinusoidal-post-nobias-manual-scan-dotsnobatch": Case(
        dict(pos_embedding="sinusoidal", norm_position="post", bias=False, attention="manual"),
        dict(scan_layers=True, remat="dots_with_no_batch_dims_saveable"), None, True),
    "nopos-rmsnorm-post-untied-manual-scan": Case(
        dict(pos_embedding="none", norm="rmsnorm", norm_position="post", tie_embeddings=False, attention="manual"),
        dict(scan_layers=True), None, True),
    # adapters on one layer only: the blocks differ, so the model runs them unrolled, each under nn.remat
    "gpt2-lora-one-layer-unrolled-remat": Case({}, dict(scan_layers=True, remat="dots_saveable"), LORA_ONE, False),
}


def _params(cfg: GPTConfig, seed: int) -> Any:
    """Random params (not the init: LayerNorm scales of one would hide a swapped layer)."""
    return random_params(cfg, seed, std=0.3, norm_scales="same")


def _adapters(params: Any, lcfg: lora.LoraConfig, seed: int) -> Any:
    """Random A and B (B != 0, unlike init_lora's, so the adapters change the output), drawn in NumPy."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: lora.init_lora(0, params, lcfg))
    return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), shapes)


def _tokens(cfg: GPTConfig, seed: int, batch: int = 2, T: int = 12) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, T)), jnp.int32)


def _how_it_runs(program: Any) -> dict[str, Any]:
    """What a traced program does: how many lax.scans run over the n_layer blocks (quantized matmuls scan over
    rows, with another length), whether it rematerialises, and with which of the config's policies."""
    text = str(program)
    return {"layer_scans": re.findall(r"\blength=(\d+)\b", text).count(str(BASE.n_layer)),
            "remat": "remat" in text, "policies": sorted(r for r, name in POLICY_NAMES.items() if name in text)}


def _value_and_grad(cfg: GPTConfig, tokens: jax.Array, lcfg: lora.LoraConfig | None):
    """(params, adapters) -> ((loss, logits), (d params, d adapters)) for a loss that weighs every logit
    differently (a mean: cross-entropy's scale)."""

    def loss(params, adapters):
        p = params if lcfg is None else lora.wrap(params, adapters, lcfg)
        logits = GPT(cfg).apply({"params": p}, tokens)  # [B, T, V]
        return (logits * jnp.cos(jnp.arange(logits.size).reshape(logits.shape))).mean(), logits

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


@pytest.mark.parametrize("name", CASES)
def test_scan_and_remat_match_unrolled(name, tmp_path):
    """Logits and gradients (params and adapters) equal the unrolled, non-remat model's; and the compiled program
    really scans (or not) and applies the remat policy the config names."""
    case = CASES[name]
    seed = list(CASES).index(name)
    cfg = BASE.replace(**case.switches)
    got_cfg = cfg.replace(**case.run)
    params, tokens = _params(cfg, seed), _tokens(cfg, seed)
    adapters = None if case.adapters is None else _adapters(params, case.adapters, seed + 50)
    got_params = params
    if case.hf:
        export_hf_gpt2(got_cfg, params, tmp_path)
        loaded_cfg, got_params = load_hf_gpt2(str(tmp_path), scan_layers=True, remat=got_cfg.remat)
        assert loaded_cfg == got_cfg

    runs = {}
    for key, c, p in (("ref", cfg, params), ("got", got_cfg, got_params)):
        traced = _value_and_grad(c, tokens, case.adapters).trace(p, adapters)
        runs[key] = _how_it_runs(traced.jaxpr), traced.lower().compile()(p, adapters)
    (ref_how, ref), (got_how, got) = runs["ref"], runs["got"]
    remat = got_cfg.remat
    assert ref_how == {"layer_scans": 0, "remat": False, "policies": []}
    assert got_how == {"layer_scans": 2 if case.scans else 0,  # the forward scan and its transpose
                       "remat": remat != "none", "policies": [remat] if remat != "none" else []}
    chex.assert_trees_all_close(got, ref, atol=TOL, rtol=TOL)


def test_every_switch_value_and_policy_is_covered():
    """CASES stays representative: each value of each switch, each remat policy, both layouts."""
    runs = [BASE.replace(**c.switches, **c.run) for c in CASES.values()]
    for field, values in (("pos_embedding", config_lib.POS_EMBEDDINGS), ("norm", config_lib.NORMS),
                          ("norm_position", config_lib.NORM_POSITIONS), ("tie_embeddings", (True, False)),
                          ("bias", (True, False)), ("remat", config_lib.REMATS)):
        assert {getattr(r, field) for r in runs} >= set(values), field
    assert {c.scans for c in CASES.values()} == {True, False}
    assert {r.attention for r in runs} == {"xla", "manual"}  # cudnn needs a GPU


def test_cached_decode_matches_unrolled():
    """Prefill then decode with the per-layer cache stacked through the scan: the logits and the cache equal
    the unrolled model's, and the cached logits equal an uncached run over the whole sequence. Params that
    arrive stacked (a scanned run's train state, as its side evaluations pass them) scan as they are."""
    cfg = BASE.replace(pos_embedding="rope")
    params, tokens = _params(cfg, 10), _tokens(cfg, 10, T=9)

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def run(c: GPTConfig, whole: bool, params: Any):
        cache = init_cache(c, 2, 12)
        logits0, cache = GPT(c).apply({"params": params}, tokens[:, :6], cache=cache)  # prefill
        logits1, cache = GPT(c).apply({"params": params}, tokens[:, 6:], cache=cache)  # 3 more
        return (logits0, logits1, cache) + ((GPT(c).apply({"params": params}, tokens),) if whole else ())

    ref = run(cfg, True, params)
    for c, p in ((cfg.replace(scan_layers=True, remat="full"), params), (cfg, layers.stack_layers(params))):
        traced = run.trace(c, False, p)
        assert _how_it_runs(traced.jaxpr)["layer_scans"] == 2  # prefill and decode scan
        got = traced.lower().compile()(p)
        assert isinstance(got[2].layers, tuple) and len(got[2].layers) == cfg.n_layer
        chex.assert_trees_all_close(got, ref[:3], atol=TOL, rtol=TOL)
        chex.assert_trees_all_close(jnp.concatenate(got[:2], axis=1), ref[3], atol=1e-5, rtol=1e-5)


def test_quantized_scanned_matches_unrolled():
    """Quantized kernels (int8, packed int4) stack and scan with the blocks. Both widths run in one program
    per layout, quantized inside it (quantize compiles per weight shape when called on its own)."""
    params, tokens = _params(BASE, 11), _tokens(BASE, 11)

    def run(p, c):
        return {bits: GPT(c).apply({"params": quantize(p, QuantConfig(bits=bits))}, tokens) for bits in (8, 4)}

    ref, got = (jax.jit(run, static_argnums=1).trace(params, c) for c in (BASE, BASE.replace(scan_layers=True)))
    assert [_how_it_runs(t.jaxpr)["layer_scans"] for t in (ref, got)] == [0, 2]  # both widths really scan
    chex.assert_trees_all_close(got.lower().compile()(params), ref.lower().compile()(params), atol=TOL, rtol=TOL)


def test_dropout_scanned_draws_per_layer_masks():
    """Dropout runs under the scan (its own masks: layer i folds i into the key), reproducible per key, and
    the key changes the output (so dropout is applied)."""
    cfg = BASE.replace(dropout=0.2, scan_layers=True, attention="manual")
    params, tokens = _params(cfg, 12), _tokens(cfg, 12)
    traced = jax.jit(lambda key: GPT(cfg).apply({"params": params}, tokens, deterministic=False,
                                             rngs={"dropout": key})).trace(jax.random.PRNGKey(0))
    assert _how_it_runs(traced.jaxpr)["layer_scans"] == 1
    run = traced.lower().compile()
    a, b, c = run(jax.random.PRNGKey(0)), run(jax.random.PRNGKey(0)), run(jax.random.PRNGKey(1))
    chex.assert_trees_all_equal(a, b)
    assert float(jnp.abs(a - c).max()) > 1e-3


@pytest.mark.parametrize("field,value", [("remat", "some"), ("scan_layers", 1)])
def test_bad_config(field, value):
    with pytest.raises(ValueError, match=f"GPTConfig.{field}"):
        GPTConfig(**{field: value})


def test_old_config_dict_loads_with_defaults():
    d = BASE.to_dict()
    del d["remat"], d["scan_layers"]  # a config.json written before these fields
    cfg = GPTConfig.from_dict(d)
    assert (cfg.remat, cfg.scan_layers) == ("none", False)


# ---------------------------------------------------------------------------------------------------------
# The trainer's stacked train state (jaxgpt.train.steps.StateLayout)


def _optimizer() -> Any:
    """AdamW with clipping, weight decay on and Adam's eps at 1e-4: the gradient of the key bias is zero up to
    rounding, and with eps 1e-8 Adam would turn that rounding noise into lr-sized steps of either sign."""
    from jaxgpt.train import config as train_config

    c = train_config.base_config()
    c.update(learning_rate=1e-2, warmup_iters=1, lr_decay_iters=10, weight_decay=0.5, grad_clip=0.05, eps=1e-4)
    return steps.make_optimizer(OptimConfig.of(c))


def test_stacked_train_state_round_trips_and_steps_like_the_unrolled_one():
    """A scanned model's train state held stacked ([L, ...] params and AdamW moments) takes the same steps as
    the unrolled model's unrolled state (weight decay still skips the stacked biases and norms)."""
    cfg = BASE.replace(n_layer=3)
    scanned = cfg.replace(scan_layers=True, remat="full")
    tx = _optimizer()
    params = _params(cfg, 21)
    state = steps.init_state(params, tx)
    layout = steps.StateLayout.of(scanned, steps.identity_combine, params)
    assert layout.stacked and not steps.StateLayout.of(cfg, steps.identity_combine, params).stacked
    assert not steps.StateLayout.of(scanned, lambda t, f: t, params).stacked  # LoRA's combine: unrolled
    stacked = layout.inward(state)
    mu = stacked.opt_state[1][0].mu
    assert sorted(mu) == ["h", "ln_f", "wpe", "wte"]
    chex.assert_shape(mu["h"]["mlp"]["c_fc"]["kernel"], (3, 16, 64))
    chex.assert_trees_all_equal(layout.outward(stacked), state)
    mask = steps.decay_mask(stacked.params)
    assert mask["h"]["mlp"]["c_fc"]["kernel"] and not mask["h"]["mlp"]["c_fc"]["bias"]
    assert not mask["h"]["ln_1"]["scale"] and mask["wte"]["embedding"]

    ref_step = steps.make_train_step(cfg, tx, donate=False)  # unrolled model, no remat, unrolled state
    step = steps.make_train_step(scanned, tx, donate=False)
    rng = np.random.default_rng(5)
    for _ in range(3):
        batch = tuple(jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 3, 12)), jnp.int32) for _ in range(2))
        state, m_ref = ref_step(state, batch, jax.random.PRNGKey(0))
        stacked, m = step(stacked, batch, jax.random.PRNGKey(0))
        np.testing.assert_allclose(m["loss"], m_ref["loss"], rtol=TOL)
    moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)))
    assert moved > 1e-2
    chex.assert_trees_all_close(layout.outward(stacked), state, atol=1e-6, rtol=1e-6)
