"""Activation-space LoRA (lora.wrap, LoraWeight) against the weight-space reference (lora.apply_lora), on
float32, bfloat16 and quantized bases; what XLA compiles for its train step; multi-host adapter exports.

Run as a script (`python tests/test_lora_activation.py multihost OUTDIR`) it is one process of a two-process
CPU run (see test_exports_gather_adapters_sharded_over_two_processes).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import random_params, xla_env

from jaxgpt import lora, quantize
from jaxgpt import sharding as sh
from jaxgpt.nn.config import GPTConfig
from jaxgpt.nn.model import GPT, init_params

TOL = 1e-5  # float32: activation space vs weight space
# One block: every test here is about one kernel's product, and a second block only adds compile time.


def _params(cfg: GPTConfig, seed: int = 0, std: float = 0.1) -> dict:
    """Random params of cfg's shapes (NumPy draws, nothing compiled): norm scales around 1, the rest around 0."""
    return random_params(cfg, seed, std)


def _random_adapters(params, lcfg, seed, std=0.1):
    """init_lora's tree with fresh normal A and B (NumPy draws, nothing compiled)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(std * rng.standard_normal(x.shape), jnp.float32),
                        jax.eval_shape(lambda: lora.init_lora(seed, params, lcfg)))


def _loss_fn(cfg: GPTConfig, lcfg: lora.LoraConfig, transform):
    """(next-token loss, logits [B, T - 1, V]) of the model on transform(params, adapters, lcfg)."""
    def loss(adapters, params, batch):
        logits = GPT(cfg).apply({"params": transform(params, adapters, lcfg)}, batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean(), logits

    return loss


def _tokens(seed: int, shape: tuple[int, int]) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, 97, shape), jnp.int32)


# ---------------------------------------------------------------------------------------------------------
# Activation space equals weight space


@pytest.mark.parametrize("targets,rslora,param_dtype", [
    (("all",), False, "float32"),  # whole kernels, LoRA
    (("attn/c_attn/q", "attn/c_attn/v", "mlp/c_fc"), True, "bfloat16"),  # slices and a whole kernel, RsLoRA
])
def test_wrap_logits_and_grads_equal_weight_space(targets, rslora, param_dtype):
    """The bfloat16 base's reference is weight space on the same values upcast to float32 (the model computes
    in float32): apply_lora on the bfloat16 base would round W + A B back to bfloat16."""
    cfg = GPTConfig.preset("tiny", n_layer=1, param_dtype=param_dtype)
    cfg32 = cfg.replace(param_dtype="float32")
    base = _params(cfg)
    lcfg = lora.LoraConfig(rank=3, alpha=7.0, targets=targets, rank_stabilized=rslora)
    ad = _random_adapters(base, lcfg, 1)
    toks = _tokens(2, (2, 18))  # logits of 17 positions

    @jax.jit
    def both(ad, base, toks):
        base32 = jax.tree.map(lambda x: x.astype(jnp.float32), base)
        got = jax.value_and_grad(_loss_fn(cfg, lcfg, lora.wrap), has_aux=True)(ad, base, toks)
        want = jax.value_and_grad(_loss_fn(cfg32, lcfg, lora.apply_lora), has_aux=True)(ad, base32, toks)
        plain = GPT(cfg32).apply({"params": base32}, toks[:, :-1])
        as_float = jax.tree.map(lambda x: x.dequantize(jnp.float32) if isinstance(x, lora.LoraWeight) else
                                x.astype(jnp.float32), lora.wrap(base, ad, lcfg),
                                is_leaf=lambda x: isinstance(x, lora.LoraWeight))
        return got, want, plain, as_float, lora.merge(base32, ad, lcfg)

    ((got_l, logits), got_g), ((want_l, want), want_g), plain, as_float, merged = \
        jax.device_get(both(ad, base, toks))
    np.testing.assert_allclose(got_l, want_l, rtol=TOL)
    chex.assert_trees_all_close(got_g, want_g, atol=TOL, rtol=TOL)
    assert min(np.abs(g).max() for g in jax.tree.leaves(got_g)) > 1e-3  # every A and B gets a gradient
    np.testing.assert_allclose(logits, want, atol=TOL, rtol=0)
    assert np.abs(want - plain).max() > 1e-2  # the adapters matter
    wrapped = lora.wrap(base, ad, lcfg)
    assert wrapped["h_0"]["attn"]["c_attn"]["kernel"].base is base["h_0"]["attn"]["c_attn"]["kernel"]  # no copy
    chex.assert_trees_all_close(as_float, merged, atol=1e-6, rtol=0)


def test_wrap_bad_input():
    cfg = GPTConfig.preset("tiny", n_layer=1)
    base = _params(cfg)
    lcfg = lora.LoraConfig(rank=2, alpha=5.0, targets=("attn/c_attn/v",))
    ad = _random_adapters(base, lcfg, 0)
    wrapped = lora.wrap(base, ad, lcfg)
    assert lora.is_wrapped(wrapped) and not lora.is_wrapped(base)
    with pytest.raises(ValueError, match="already carries LoRA adapters; wrap or merge the base params"):
        lora.wrap(wrapped, ad, lcfg)
    with pytest.raises(ValueError, match="already carries LoRA adapters"):
        lora.merge(wrapped, ad, lcfg)
    with pytest.raises(ValueError, match="has rank 2 but LoraConfig.rank is 3"):
        lora.wrap(base, ad, lcfg.replace(rank=3))
    with pytest.raises(ValueError, match="params hold LoRA-wrapped weights"):
        quantize.quantize(wrapped)  # would leave the wrapped kernels in float
    table = jax.eval_shape(lambda: quantize.quantize(base, quantize.QuantConfig(include=("wte/embedding",))))
    with pytest.raises(ValueError, match="wte/kernel"):
        lora.wrap(table, {"wte": {"A": np.ones((97, 2)), "B": np.ones((2, 16))}}, lcfg)


# ---------------------------------------------------------------------------------------------------------
# Training on a bfloat16 or quantized base


def _fine_tune(cfg, base, lcfg, transform, steps, lr, toks):
    """(first loss, loss after `steps` adamw steps on the adapters, adapters); traceable (one scan). The scan
    runs steps + 1 times so that the last loss is one of its values (no separate forward to compile): the
    adapters returned have had that one extra update."""
    loss = _loss_fn(cfg, lcfg, transform)
    opt = optax.adamw(lr)
    ad0 = lora.init_lora(0, jax.eval_shape(lambda: base), lcfg)

    def step(carry, _):
        ad, st = carry
        (value, _), g = jax.value_and_grad(loss, has_aux=True)(ad, base, toks)
        upd, st = opt.update(g, st, ad)
        return (optax.apply_updates(ad, upd), st), value

    (ad, _), values = jax.lax.scan(step, (ad0, opt.init(ad0)), None, length=steps + 1)
    return values[0], values[steps], ad


def test_bfloat16_base_trains_like_float32_where_weight_space_lags():
    """30 adamw steps at lr 3e-5 on weights of std 0.5: the adapters' product stays below bfloat16's rounding
    step of W, so weight space (W + A B rounded to bfloat16) loses about half the loss decrease; activation
    space keeps the float32 base's decrease within 2% (it differs only by the base's own rounding)."""
    cfg32 = GPTConfig.preset("tiny", n_layer=1)
    cfg16 = cfg32.replace(param_dtype="bfloat16")
    base32 = _params(cfg32, seed=3, std=0.5)
    lcfg = lora.LoraConfig(rank=4, alpha=8.0, targets=("all",))
    runs = {"f32": (cfg32, lora.wrap), "bf16": (cfg16, lora.wrap), "bf16 weight space": (cfg16, lora.apply_lora)}

    @jax.jit
    def drops(base32, toks):
        base16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), base32)
        out = {}
        for name, (cfg, transform) in runs.items():
            first, last, _ = _fine_tune(cfg, base32 if cfg is cfg32 else base16, lcfg, transform, 30, 3e-5, toks)
            out[name] = first - last
        return out

    drop = {k: float(v) for k, v in drops(base32, _tokens(4, (4, 17))).items()}
    assert drop["f32"] > 0.01, drop
    assert abs(drop["bf16"] - drop["f32"]) <= 0.02 * drop["f32"], drop
    assert drop["bf16 weight space"] < 0.75 * drop["f32"], drop


def test_qlora_int8_trains_and_merged_export_matches_unmerged():
    """Adapters trained on an int8 base; merged (dequantized) they give the unmerged model's logits. Also an
    int4 base, and the quantize helpers on wrapped params."""
    cfg = GPTConfig.preset("tiny", n_layer=1)
    float_base = _params(cfg, seed=5)
    lcfg = lora.LoraConfig(rank=2, alpha=6.0, targets=("attn/c_attn/q", "attn/c_attn/v", "mlp/c_fc"),
                           rank_stabilized=True)
    toks = _tokens(6, (5, 17))  # 80 rows: the quantized product's GEMM path

    @jax.jit
    def run(float_base, toks):  # quantized here too: one compiled program for the whole test
        qbase = quantize.quantize(float_base)
        q4 = quantize.quantize(float_base, quantize.QuantConfig(bits=4, granularity="group", group_size=8))
        first, last, ad = _fine_tune(cfg, qbase, lcfg, lora.wrap, 12, 3e-2, toks)
        apply = lambda p: GPT(cfg).apply({"params": p}, toks)  # noqa: E731
        wrapped, merged = lora.wrap(qbase, ad, lcfg), lora.merge(qbase, ad, lcfg)
        logits = {"unmerged": apply(wrapped), "merged": apply(merged),
                  "int4 unmerged": apply(lora.wrap(q4, ad, lcfg)),
                  "int4 merged": apply(lora.merge(q4, ad, lcfg))}
        float_merged = {"of merged": quantize.dequantize(merged),
                        "of base": lora.merge(quantize.dequantize(qbase), ad, lcfg)}
        float_leaf = quantize.dequantize(wrapped)["h_0"]["attn"]["c_attn"]["kernel"]
        return qbase, first, last, ad, logits, merged, float_merged, (float_leaf, float_leaf.dequantize())

    qbase, first, last, ad, logits, merged, float_merged, (float_leaf, float_kernel) = run(float_base, toks)
    assert float(last) < float(first) - 0.05, (first, last)
    np.testing.assert_allclose(logits["merged"], logits["unmerged"], atol=TOL, rtol=0)
    np.testing.assert_allclose(logits["int4 merged"], logits["int4 unmerged"], atol=TOL, rtol=0)
    wrapped = lora.wrap(qbase, ad, lcfg)
    leaf = wrapped["h_0"]["attn"]["c_attn"]["kernel"]
    assert isinstance(leaf.base, quantize.QuantizedArray) and leaf.parts == (0, 2)
    # merge: adapted kernels dequantized and merged; the others stay int8
    assert merged["h_0"]["attn"]["c_attn"]["kernel"].dtype == jnp.float32
    assert isinstance(merged["h_0"]["attn"]["c_proj"]["kernel"], quantize.QuantizedArray)
    chex.assert_trees_all_close(float_merged["of merged"], float_merged["of base"], atol=1e-6, rtol=0)
    assert quantize.is_quantized(wrapped)  # the quantize helpers see through the LoRA leaves
    assert isinstance(float_leaf, lora.LoraWeight) and not isinstance(float_leaf.base, quantize.QuantizedArray)
    chex.assert_trees_all_close(float_kernel, merged["h_0"]["attn"]["c_attn"]["kernel"], atol=1e-6, rtol=0)
    report, q_report = quantize.size_report(wrapped), quantize.size_report(qbase)
    assert report["quantized_bytes"] == q_report["quantized_bytes"]
    assert report["other_bytes"] == q_report["other_bytes"] + sum(x.nbytes for x in jax.tree.leaves(ad))


# ---------------------------------------------------------------------------------------------------------
# What the compiled train step writes


def test_train_step_writes_no_float_copy_of_an_adapted_kernel():
    """Weight space writes W + A B (and its [in, out] gradient) for every adapted kernel; activation space
    writes neither. Shapes chosen so that no activation shares a kernel's shape. Only lowered and compiled,
    on abstract values, under the suite's fast-compile settings (helpers.FAST_COMPILE): weight space still
    writes its copies there, so the count tells the two apart."""
    cfg = GPTConfig.preset("tiny", n_layer=1, n_embd=24, vocab_size=61)
    base = jax.eval_shape(lambda: init_params(cfg, 0))
    lcfg = lora.LoraConfig(rank=2, alpha=4.0, targets=("all",))
    ad = jax.eval_shape(lambda: lora.init_lora(0, base, lcfg))
    opt = optax.adamw(1e-3)
    toks = jax.ShapeDtypeStruct((2, 6), jnp.int32)  # B * T = 10 rows: no [in, out] kernel shape
    kernels = {s for s in lora._kernels(base).values()}
    kernels |= {s[::-1] for s in kernels}
    counts = {}
    for name, transform in (("activation", lora.wrap), ("weight", lora.apply_lora)):
        loss = _loss_fn(cfg, lcfg, transform)

        def step(ad, st, params, batch, loss=loss):
            (value, _), g = jax.value_and_grad(loss, has_aux=True)(ad, params, batch)
            upd, st = opt.update(g, st, ad)
            return optax.apply_updates(ad, upd), st, value

        lowered = jax.jit(step).lower(ad, jax.eval_shape(opt.init, ad), base, toks)
        hlo = lowered.compile().as_text()
        counts[name] = sum(shape in kernels for _, shape, _ in quantize.hlo_float_buffers(hlo))
    assert counts["activation"] == 0 and counts["weight"] >= 4, counts  # 4 adapted kernels


# ---------------------------------------------------------------------------------------------------------
# Sharding and multi-host exports


def test_tree_shardings_on_wrapped_params():
    cfg = GPTConfig.preset("tiny", n_layer=1)
    base = _params(cfg)
    lcfg = lora.LoraConfig(rank=2, alpha=5.0, targets=("attn/c_attn/q", "mlp/c_fc"))
    wrapped = lora.wrap(jax.jit(quantize.quantize)(base), _random_adapters(base, lcfg, 0), lcfg)
    shardings = sh.tree_shardings(wrapped, sh.make_mesh(), min_size=1)
    placed = jax.device_put(wrapped, shardings)
    chex.assert_trees_all_equal_structs(placed, wrapped)
    chex.assert_trees_all_equal(placed, wrapped)
    assert "h_0/attn/c_attn/kernel/A/0" in sh.spec_summary(placed)


def _export_adapters() -> tuple[dict, lora.LoraConfig]:
    """The adapters the two processes export: q, v and c_fc of a one-block tiny model, drawn over its two
    kernels' shapes (no model to trace in the worker processes)."""
    c = GPTConfig.preset("tiny").n_embd
    kernels = {"h_0": {"attn": {"c_attn": {"kernel": jax.ShapeDtypeStruct((c, 3 * c), jnp.float32)}},
                       "mlp": {"c_fc": {"kernel": jax.ShapeDtypeStruct((c, 4 * c), jnp.float32)}}}}
    lcfg = lora.LoraConfig(rank=2, alpha=5.0, targets=("attn/c_attn/q", "attn/c_attn/v", "mlp/c_fc"))
    return _random_adapters(kernels, lcfg, 7), lcfg


def worker_multihost(outdir: Path) -> None:
    """One of two processes with one CPU device each: adapters sharded over both, then both exports."""
    assert sh.maybe_initialize_distributed() is True
    ad, lcfg = _export_adapters()
    mesh = sh.make_mesh(data=1, fsdp=2)
    sharded = sh.shard_params(ad, sh.tree_shardings(ad, mesh, min_size=1))
    q_a = sharded["h_0"]["attn"]["c_attn"]["q"]["A"]
    assert not q_a.is_fully_addressable and tuple(q_a.sharding.spec) == ("fsdp",)
    lora.save_adapters(outdir / "adapters", sharded, lcfg)
    lora.save_peft(outdir / "peft", sharded, lcfg)
    (outdir / f"done_{jax.process_index()}").write_text("ok")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_exports_gather_adapters_sharded_over_two_processes(tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COORDINATOR")}
    env.update(JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               XLA_FLAGS=xla_env(1)["XLA_FLAGS"])
    procs = [subprocess.Popen([sys.executable, __file__, "multihost", str(tmp_path)], env={**env, "JAX_PROCESS_ID": str(i)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    base = jax.eval_shape(lambda: init_params(GPTConfig.preset("tiny", n_layer=1), 0))
    want, lcfg = _export_adapters()
    got, got_cfg = lora.load_adapters(tmp_path / "adapters", base)
    assert got_cfg == lcfg
    chex.assert_trees_all_equal(got, want)
    got, got_cfg = lora.load_peft(tmp_path / "peft", base)
    assert got_cfg == lcfg
    chex.assert_trees_all_equal(got, want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters", "done_0", "done_1", "peft"]  # no temp folders


if __name__ == "__main__":
    if sys.argv[1] == "multihost":
        worker_multihost(Path(sys.argv[2]))
    else:
        raise SystemExit(f"unknown worker {sys.argv[1]!r}; use multihost")
