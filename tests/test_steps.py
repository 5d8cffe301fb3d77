"""jaxgpt.train.steps, the pure pieces of training: the schedule against optax's own linear and cosine schedules
joined at the warmup, the optimizer against AdamW with clipping written in float64 NumPy, the weight-decay mask by
hand, the loss and one train step against float64 NumPy and jax.grad on each micro-batch, the state layout against
np.stack, and compile_quietly against JAX's compile events. A tiny model and fresh random params and tokens
throughout; the full step against transformers and torch's AdamW is in test_train.py."""

from __future__ import annotations

from types import SimpleNamespace

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import random_params

from jaxgpt.nn.config import GPTConfig
from jaxgpt.nn.model import GPT
from jaxgpt.train import steps

CFG = GPTConfig(vocab_size=37, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
ONE = CFG.replace(n_layer=1)  # for what compiles a model: one block is enough


def _optim(**changes) -> SimpleNamespace:
    """The optimizer settings make_optimizer and lr_schedule read (the training config's names)."""
    o = dict(learning_rate=3e-3, decay_lr=True, warmup_iters=4, lr_decay_iters=20, min_lr=3e-4, weight_decay=0.1,
             beta1=0.9, beta2=0.95, eps=1e-8, grad_clip=1.0, optimizer="adamw", muon_lr=0.02, muon_momentum=0.95,
             muon_weight_decay=0.0)
    return SimpleNamespace(**{**o, **changes})


def _tokens(seed: int, *shape: int) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, shape), jnp.int32)


def _ce64(logits: np.ndarray, targets: np.ndarray) -> float:
    """Mean cross entropy in float64 NumPy."""
    lg = np.asarray(logits, np.float64)
    m = lg.max(-1, keepdims=True)
    logz = np.log(np.exp(lg - m).sum(-1)) + m[..., 0]
    return float(np.mean(logz - np.take_along_axis(lg, np.asarray(targets)[..., None], -1)[..., 0]))


# ---------------------------------------------------------------------------------------------------------
# Schedule and optimizer


@pytest.mark.parametrize("lr,min_lr,warmup,decay", [(6e-4, 6e-5, 10, 100), (1e-2, 0.0, 1, 7), (3e-3, 1e-3, 0, 50)])
def test_lr_schedule_is_optax_linear_warmup_joined_to_cosine_decay(lr, min_lr, warmup, decay):
    sched = steps.lr_schedule(_optim(learning_rate=lr, min_lr=min_lr, warmup_iters=warmup, lr_decay_iters=decay))
    warm = optax.linear_schedule(lr / (warmup + 1), lr, max(warmup, 1))  # lr (it + 1) / (warmup + 1)
    cosine = optax.cosine_decay_schedule(lr, decay - warmup, alpha=min_lr / lr)  # then min_lr for good
    ref = optax.join_schedules([warm, cosine], [warmup])
    its = sorted({0, 1, warmup - 1, warmup, warmup + 1, (warmup + decay) // 2, decay - 1, decay, decay + 1, 5 * decay}
                 - {-1})
    got = np.asarray(jax.vmap(sched)(jnp.asarray(its, jnp.int32)))
    want = np.asarray([ref(i) for i in its])
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-9)
    assert got[-1] == pytest.approx(min_lr, abs=1e-9) and got.max() == pytest.approx(lr, rel=1e-6)


def test_lr_schedule_without_decay_is_optax_constant_and_a_decay_before_warmup_is_refused():
    sched = steps.lr_schedule(_optim(decay_lr=False, learning_rate=7e-4))
    its = jnp.asarray([0, 3, 10**6], jnp.int32)
    np.testing.assert_allclose(np.asarray(sched(its)), [optax.constant_schedule(7e-4)(i) for i in its], rtol=1e-7)
    with pytest.raises(ValueError, match="lr_decay_iters=5 must be larger than warmup_iters=5"):
        steps.lr_schedule(_optim(warmup_iters=5, lr_decay_iters=5))


def test_decay_mask_is_two_d_weights_only_and_skips_the_layer_axis_of_stacked_leaves():
    rng = np.random.default_rng(3)

    def z(shape):  # the mask depends on the shapes only
        return rng.standard_normal(shape)

    params = {"wte": {"embedding": z((5, 4))}, "ln_f": {"scale": z(4), "bias": z(4)},
              "h_0": {"mlp": {"c_fc": {"kernel": z((4, 8)), "bias": z(8)}}},
              "h": {"mlp": {"c_fc": {"kernel": z((3, 4, 8)), "bias": z((3, 8))}}, "ln_1": {"scale": z((3, 4))}}}
    assert steps.decay_mask(params) == {
        "wte": {"embedding": True}, "ln_f": {"scale": False, "bias": False},
        "h_0": {"mlp": {"c_fc": {"kernel": True, "bias": False}}},
        "h": {"mlp": {"c_fc": {"kernel": True, "bias": False}}, "ln_1": {"scale": False}}}


def _adamw64(params, grads_seq, o):
    """Clip by global norm, then AdamW with decoupled weight decay on 2-D leaves and nanoGPT's schedule, in float64."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    out = []
    for t, g in enumerate(grads_seq):
        g = {k: np.asarray(x, np.float64) for k, x in g.items()}
        norm = np.sqrt(sum((x ** 2).sum() for x in g.values()))
        if norm > o.grad_clip:
            g = {k: x * o.grad_clip / norm for k, x in g.items()}
        if t < o.warmup_iters:
            lr = o.learning_rate * (t + 1) / (o.warmup_iters + 1)
        else:
            ratio = min((t - o.warmup_iters) / (o.lr_decay_iters - o.warmup_iters), 1.0)
            lr = o.min_lr + 0.5 * (1 + np.cos(np.pi * ratio)) * (o.learning_rate - o.min_lr)
        for k in p:
            m[k] = o.beta1 * m[k] + (1 - o.beta1) * g[k]
            v[k] = o.beta2 * v[k] + (1 - o.beta2) * g[k] ** 2
            adam = (m[k] / (1 - o.beta1 ** (t + 1))) / (np.sqrt(v[k] / (1 - o.beta2 ** (t + 1))) + o.eps)
            decay = o.weight_decay * p[k] if p[k].ndim >= 2 else 0.0
            p[k] = p[k] - lr * (adam + decay)
        out.append((norm, {k: x.copy() for k, x in p.items()}))
    return out


def test_make_optimizer_is_clipping_then_adamw_with_decay_on_two_d_weights():
    o = _optim(warmup_iters=2, lr_decay_iters=5, weight_decay=0.3, grad_clip=1.5, learning_rate=1e-2, min_lr=1e-3)
    rng = np.random.default_rng(0)
    params = {"kernel": rng.standard_normal((4, 3)).astype(np.float32),
              "bias": rng.standard_normal(3).astype(np.float32),
              "embedding": rng.standard_normal((5, 3)).astype(np.float32)}
    grads_seq = [{k: (s * rng.standard_normal(x.shape)).astype(np.float32) for k, x in params.items()}
                 for s in (2.0, 0.1, 1.0, 0.05, 3.0, 0.5, 0.2)]  # some clipped, some not
    want = _adamw64(params, grads_seq, o)
    assert {n > o.grad_clip for n, _ in want} == {True, False}
    tx = steps.make_optimizer(o)
    p = jax.tree.map(jnp.asarray, params)
    state = tx.init(p)
    update = jax.jit(tx.update)
    for g, (_, ref) in zip(grads_seq, want):
        updates, state = update(jax.tree.map(jnp.asarray, g), state, p)
        p = optax.apply_updates(p, updates)
        for k in ref:
            np.testing.assert_allclose(np.asarray(p[k]), ref[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_make_optimizer_without_clipping_leaves_large_gradients_whole():
    """Adam's first step does not see a gradient's scale, so several steps of very different sizes."""
    o = _optim(grad_clip=0.0, warmup_iters=0, lr_decay_iters=10, weight_decay=0.0)
    rng = np.random.default_rng(1)
    params = {"kernel": rng.standard_normal((4, 3)).astype(np.float32)}
    grads_seq = [{"kernel": (s * rng.standard_normal((4, 3))).astype(np.float32)} for s in (50.0, 0.5, 5.0)]
    want = _adamw64(params, grads_seq, _optim(**{**vars(o), "grad_clip": np.inf}))
    tx = steps.make_optimizer(o)
    p, state = params, tx.init(params)
    for g, (_, ref) in zip(grads_seq, want):
        updates, state = tx.update(g, state, p)
        p = optax.apply_updates(p, updates)
        np.testing.assert_allclose(np.asarray(p["kernel"]), ref["kernel"], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Loss and steps


def test_cross_entropy_of_bfloat16_logits_is_computed_in_float32():
    rng = np.random.default_rng(2)
    logits = jnp.asarray(4 * rng.standard_normal((3, 5, 50)), jnp.bfloat16)
    targets = rng.integers(0, 50, (3, 5))
    got = steps.cross_entropy(logits, jnp.asarray(targets))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), _ce64(np.asarray(logits, np.float64), targets), rtol=1e-6)


def test_eval_step_and_loss_fn_are_the_models_cross_entropy_with_combine_applied():
    params = random_params(ONE, 3, std=0.3)
    x, y = _tokens(4, 2, 8), _tokens(5, 2, 8)
    logits = jax.jit(lambda p, t: GPT(ONE).apply({"params": p}, t))(params, x)
    want = _ce64(np.asarray(logits), np.asarray(y))
    np.testing.assert_allclose(float(steps.make_eval_step(ONE)(params, x, y)), want, rtol=1e-5)
    # trainable = the blocks, frozen = the rest: combine must put them back together
    trainable = {k: v for k, v in params.items() if k.startswith("h_")}
    frozen = {k: v for k, v in params.items() if not k.startswith("h_")}
    split_eval = steps.make_eval_step(ONE, combine=lambda t, f: {**f, **t})
    np.testing.assert_allclose(float(split_eval(trainable, x, y, frozen)), want, rtol=1e-5)


def test_a_train_step_averages_the_micro_batches_and_applies_the_update():
    """SGD with lr 0.5: new params = params - 0.5 * mean of the micro-batch gradients (each from jax.grad alone)."""
    params = random_params(ONE, 6, std=0.3)
    x, y = _tokens(7, 2, 2, 8), _tokens(8, 2, 2, 8)  # [A, B, T], A = 2 micro-batches
    loss_fn = steps.make_loss_fn(ONE)
    value_and_grad = jax.jit(jax.value_and_grad(loss_fn), static_argnums=5)  # deterministic: no dropout
    losses, grads = zip(*[value_and_grad(params, None, x[a], y[a], jax.random.PRNGKey(0), True) for a in range(2)])
    mean_grad = jax.tree.map(lambda a, b: (np.asarray(a, np.float64) + np.asarray(b, np.float64)) / 2, *grads)
    tx = optax.sgd(0.5)
    step = steps.make_train_step(ONE, tx, donate=False)
    state, m = step(steps.init_state(params, tx), (x, y), jax.random.PRNGKey(0))
    assert int(state.step) == 1 and bool(m["finite"])
    np.testing.assert_allclose(float(m["loss"]), np.mean(np.asarray(losses, np.float64)), rtol=1e-5)
    norm = np.sqrt(sum((g ** 2).sum() for g in jax.tree.leaves(mean_grad)))
    np.testing.assert_allclose(float(m["grad_norm"]), norm, rtol=1e-5)
    want = jax.tree.map(lambda p, g: np.asarray(p, np.float64) - 0.5 * g, params, mean_grad)
    chex.assert_trees_all_close(jax.tree.map(np.asarray, state.params), want, atol=1e-5)

    poisoned = jax.tree.map(lambda p: p, params)
    poisoned["wte"] = {"embedding": params["wte"]["embedding"].at[0, 0].set(jnp.inf)}
    _, m = step(steps.init_state(poisoned, tx), (x, y), jax.random.PRNGKey(0))
    assert not bool(m["finite"])


def test_init_state_and_the_full_training_split():
    params = random_params(CFG, 9)
    tx = optax.adam(1e-3)
    state = steps.init_state(params, tx)
    assert state.step.dtype == jnp.int32 and int(state.step) == 0 and state.params is params
    chex.assert_trees_all_equal(state.opt_state, tx.init(params))
    assert steps.no_split(params) == (params, None)
    assert steps.identity_combine(params, {"other": 1}) is params


# ---------------------------------------------------------------------------------------------------------
# State layout and compiling


def test_state_layout_is_stacked_only_for_a_scanned_model_in_full_training():
    params = random_params(CFG, 10)
    scanned = CFG.replace(scan_layers=True)
    assert steps.StateLayout.of(scanned, steps.identity_combine, params).stacked
    assert not steps.StateLayout.of(CFG, steps.identity_combine, params).stacked
    assert not steps.StateLayout.of(scanned, lambda t, f: t, params).stacked  # adapters (LoRA's combine)
    ragged = {**params, "h_1": {k: v for k, v in params["h_1"].items() if k != "ln_2"}}
    assert not steps.StateLayout.of(scanned, steps.identity_combine, ragged).stacked  # blocks that differ


def test_state_layout_inward_stacks_params_and_moments_and_outward_undoes_it():
    params = random_params(CFG, 11)
    tx = optax.adam(1e-3)
    state = steps.init_state(params, tx)
    state = state.replace(opt_state=(state.opt_state[0]._replace(mu=random_params(CFG, 12)),) + state.opt_state[1:])
    layout = steps.StateLayout(stacked=True)
    inner = layout.inward(state)
    for got, src in ((inner.params, state.params), (inner.opt_state[0].mu, state.opt_state[0].mu)):
        assert sorted(got) == ["h", "ln_f", "wpe", "wte"]
        want = np.stack([np.asarray(src[f"h_{i}"]["attn"]["c_attn"]["kernel"]) for i in range(CFG.n_layer)])
        np.testing.assert_array_equal(np.asarray(got["h"]["attn"]["c_attn"]["kernel"]), want)
    chex.assert_trees_all_equal(layout.outward(inner), state)
    flat = steps.StateLayout(stacked=False)
    assert flat.inward(state) is state and flat.outward(state) is state


def test_compile_quietly_compiles_for_the_later_call_and_swallows_errors():
    names = []

    def listen(name, secs, **kw):
        names.append(name)

    f = jax.jit(lambda a: jnp.tanh(a) * 3.0)
    x = jnp.asarray(np.random.default_rng(13).standard_normal(7), jnp.float32)
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        steps.compile_quietly(f, x)
        compiled = names.count("/jax/core/compile/backend_compile_duration")
        names.clear()
        np.testing.assert_allclose(np.asarray(f(x)), np.tanh(np.asarray(x, np.float64)) * 3.0, rtol=1e-6)
        recompiled = names.count("/jax/core/compile/backend_compile_duration")
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert compiled >= 1 and recompiled == 0
    steps.compile_quietly(f, "not an array")  # the call itself would raise; compiling ahead does not
