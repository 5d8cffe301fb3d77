"""jaxgpt.quantize: int8/int4 weights as a pytree map, checked against a float64 NumPy reference."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from helpers import random_params as shared_random_params
from jax import lax

from jaxgpt.decode.kv_cache import init_cache
from jaxgpt.io.checkpoint import pytree_bytes_on_disk, restore_pytree, save_pytree
from jaxgpt.nn.config import GPTConfig
from jaxgpt.nn.model import GPT
from jaxgpt.quantize import (
    QuantConfig,
    QuantizedArray,
    check_float_checkpoint,
    dequantize,
    fake_quantize,
    hlo_float_buffers,
    load_quantized,
    pack_int4,
    quantize,
    quantize_array,
    save_quantized,
    selected_paths,
    size_report,
    unpack_int4,
)

TINY = GPTConfig.preset("tiny")  # V=97, T=32, 2 layers, 2 heads, C=16


def random_params(cfg: GPTConfig, seed: int = 0):
    """Params of `cfg` with every leaf fresh random: weights ~ N(0, 0.02), norm scales ~ U(0.5, 1.5)."""
    return shared_random_params(cfg, seed, std=0.02, norm_scales="uniform")


@pytest.fixture(scope="module")
def params():
    return random_params(TINY)


def reference(w: np.ndarray, bits: int, granularity: str, group_size: int):
    """float64 NumPy symmetric round-to-nearest: w [K, N] kernel -> (q [N, K], step [N, K]) in [N, K] layout."""
    wn = np.asarray(w, np.float64).T  # [N, K]
    N, K = wn.shape
    qmax = 2 ** (bits - 1) - 1
    if granularity == "per_channel":
        amax = np.abs(wn).max(axis=1, keepdims=True)
        step = np.broadcast_to(amax / qmax, (N, K))
    elif granularity == "per_tensor":
        step = np.full((N, K), np.abs(wn).max() / qmax)
    else:
        amax = np.abs(wn.reshape(N, K // group_size, group_size)).max(axis=-1)
        step = np.repeat(amax / qmax, group_size, axis=1)
    q = np.clip(np.round(wn / step), -qmax, qmax)
    return q, step, wn


CASES = [(8, "per_channel", 0), (8, "per_tensor", 0), (8, "group", 16), (4, "per_channel", 0), (4, "group", 16)]


class QuantizeArrayTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*CASES)
    def test_matches_float64_reference_within_half_step(self, bits, granularity, group_size):
        w = jax.random.normal(jax.random.PRNGKey(bits + group_size), (64, 48), jnp.float32) * 0.05  # [in, out]
        fn = self.variant(quantize_array, static_argnames=("bits", "granularity", "group_size", "transposed"))
        qa = fn(w, bits=bits, granularity=granularity, group_size=group_size or 128)
        q_ref, step, wn = reference(np.asarray(w), bits, granularity, group_size)

        chex.assert_shape(qa.int_values(), (48, 64))
        assert qa.shape == (64, 48) and qa.dtype == jnp.float32
        q = np.asarray(qa.int_values(), np.float64)
        # the integers agree with the float64 reference except at rounding ties (float32 vs float64 division)
        diff = np.abs(q - q_ref)
        assert diff.max() <= 1
        ties = np.abs(np.abs(wn / step - np.floor(wn / step)) - 0.5) < 1e-4
        assert np.all(ties[diff > 0])
        # round-to-nearest: every dequantized value within half a step of the weight
        err = np.abs(np.asarray(qa.dequantize(), np.float64).T - wn)
        assert np.all(err <= 0.5 * step * (1 + 1e-5) + 1e-12), (err / step).max()
        assert (err / step).max() > 0.4  # the bound is tight, i.e. the test can fail

    @chex.variants(with_jit=True, without_jit=True)
    def test_dequantize_is_scale_times_int(self):
        w = jax.random.normal(jax.random.PRNGKey(3), (32, 24)) * 0.1
        qa = quantize_array(w)
        out = self.variant(lambda a: a.dequantize())(qa)
        expect = np.asarray(qa.int_values(), np.float64).T * np.asarray(qa.scales, np.float64).T
        chex.assert_trees_all_close(np.asarray(out, np.float64), expect, rtol=1e-6, atol=0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_int4_pack_roundtrip(self):
        q = jax.random.randint(jax.random.PRNGKey(4), (5, 12), -8, 8).astype(jnp.int8)
        packed = self.variant(pack_int4)(q)
        chex.assert_shape(packed, (5, 6))
        chex.assert_trees_all_equal(self.variant(unpack_int4)(packed), q)

    def test_all_zero_channel(self):
        w = jax.random.normal(jax.random.PRNGKey(5), (16, 8)).at[:, 3].set(0.0)
        qa = quantize_array(w)
        assert np.all(np.isfinite(np.asarray(qa.scales)))
        chex.assert_trees_all_equal(qa.dequantize()[:, 3], jnp.zeros(16))

    def test_embedding_layout(self):
        e = jax.random.normal(jax.random.PRNGKey(6), (20, 16))  # [V, C]
        qa = quantize_array(e, transposed=False)
        chex.assert_shape(qa.scales, (20, 1))  # one scale per row: natural for lookup and the tied head
        ids = jnp.array([[3, 19, 0], [7, 7, 1]])
        chex.assert_trees_all_close(qa.embed(ids, jnp.float32), jnp.take(qa.dequantize(), ids, axis=0), atol=0)
        x = jax.random.normal(jax.random.PRNGKey(7), (2, 3, 16))
        chex.assert_trees_all_close(qa.attend(x, jnp.float32), x @ qa.dequantize().T, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# The pytree map and its filter


def kernel_paths(cfg: GPTConfig) -> list[str]:
    out = []
    for i in range(cfg.n_layer):
        out += [f"h_{i}/attn/c_attn/kernel", f"h_{i}/attn/c_proj/kernel", f"h_{i}/mlp/c_fc/kernel",
                f"h_{i}/mlp/c_proj/kernel"]
    return sorted(out)


def test_default_filter_is_every_block_kernel(params):
    p = params
    assert sorted(selected_paths(p, QuantConfig())) == kernel_paths(TINY)
    assert sorted(selected_paths(p, QuantConfig(embeddings=True))) == sorted(
        kernel_paths(TINY) + ["wte/embedding", "wpe/embedding"])
    untied = TINY.replace(tie_embeddings=False)
    pu = random_params(untied)
    assert "lm_head/kernel" not in selected_paths(pu, QuantConfig())
    assert "lm_head/kernel" in selected_paths(pu, QuantConfig(lm_head=True))


def test_norms_and_biases_untouched(params):
    p = params
    qp = quantize(p, QuantConfig(embeddings=True))
    dq = dequantize(qp)
    flat_p = dict(jax.tree_util.tree_flatten_with_path(p)[0])
    for path, leaf in jax.tree_util.tree_flatten_with_path(qp, is_leaf=lambda x: isinstance(x, QuantizedArray))[0]:
        name = "/".join(k.key for k in path)
        if "ln_" in name or name.endswith("bias"):
            assert leaf is flat_p[path], name  # the very same array object
    for path, leaf in jax.tree_util.tree_flatten_with_path(dq)[0]:
        name = "/".join(k.key for k in path)
        if "ln_" in name or name.endswith("bias"):
            np.testing.assert_array_equal(np.asarray(leaf), np.asarray(flat_p[path]), err_msg=name)


def test_custom_filter_honoured(params):
    p = params
    qcfg = QuantConfig(include=("*/mlp/*/kernel",), exclude=("h_1/*",))
    qp = quantize(p, qcfg)
    got = sorted("/".join(k.key for k in path) for path, x in
                 jax.tree_util.tree_flatten_with_path(qp, is_leaf=lambda x: isinstance(x, QuantizedArray))[0]
                 if isinstance(x, QuantizedArray))
    assert got == ["h_0/mlp/c_fc/kernel", "h_0/mlp/c_proj/kernel"]
    assert isinstance(qp["h_1"]["mlp"]["c_fc"]["kernel"], jax.Array)
    assert isinstance(qp["h_0"]["attn"]["c_attn"]["kernel"], jax.Array)


def test_fake_quantize_norms_per_tensor(params):
    p = params
    fq = fake_quantize(p, QuantConfig(include=("*ln_*",), granularity="per_tensor"))
    for name in ("scale", "bias"):
        x, y = np.asarray(p["h_0"]["ln_1"][name], np.float64), np.asarray(fq["h_0"]["ln_1"][name], np.float64)
        step = np.abs(x).max() / 127
        assert 0 < np.abs(x - y).max() <= 0.5 * step * (1 + 1e-5)
    assert fq["h_0"]["attn"]["c_attn"]["kernel"] is p["h_0"]["attn"]["c_attn"]["kernel"]


# ---------------------------------------------------------------------------------------------------------
# The model on quantized params


QCFGS = {
    "int8_channel": QuantConfig(),
    "int8_tensor_emb": QuantConfig(granularity="per_tensor", embeddings=True),
    "int4_group_emb": QuantConfig(bits=4, granularity="group", group_size=8, embeddings=True),
}

apply_tiny = jax.jit(lambda p, t: GPT(TINY).apply({"params": p}, t))  # [B, T] -> [B, T, V]


@pytest.mark.parametrize("name", sorted(QCFGS))
def test_forward_equals_dequantized_forward(params, name):
    qp = quantize(params, QCFGS[name])
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 16), 0, TINY.vocab_size)  # 32 rows: GEMV per row
    lq, ld = apply_tiny(qp, tokens), apply_tiny(dequantize(qp), tokens)
    chex.assert_shape(lq, (2, 16, TINY.vocab_size))
    chex.assert_trees_all_close(lq, ld, rtol=1e-5, atol=1e-5)
    # and quantization did change the weights (the comparison is not float vs float)
    assert float(jnp.max(jnp.abs(dequantize(qp)["h_0"]["mlp"]["c_fc"]["kernel"]
                                 - params["h_0"]["mlp"]["c_fc"]["kernel"]))) > 1e-6


def test_forward_many_rows_equals_dequantized_forward(params):
    qp = quantize(params, QuantConfig(embeddings=True))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 32), 0, TINY.vocab_size)  # 128 rows: one GEMM
    chex.assert_trees_all_close(apply_tiny(qp, tokens), apply_tiny(dequantize(qp), tokens), rtol=1e-5, atol=1e-5)
    lf = apply_tiny(params, tokens)  # int8 stays close to the float model
    assert float(jnp.max(jnp.abs(apply_tiny(qp, tokens) - lf))) < 0.02 * float(jnp.max(jnp.abs(lf)))


def test_untied_rmsnorm_model_with_quantized_head():
    cfg = TINY.replace(tie_embeddings=False, norm="rmsnorm", pos_embedding="rope", bias=False)
    p = random_params(cfg)
    qp = quantize(p, QuantConfig(lm_head=True, embeddings=True))
    assert isinstance(qp["lm_head"]["kernel"], QuantizedArray)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 8), 0, cfg.vocab_size)
    chex.assert_trees_all_close(_logits(cfg, qp, tokens), _logits(cfg, dequantize(qp), tokens), rtol=1e-5, atol=1e-5)


def _logits(cfg, params, tokens):
    return jax.jit(lambda p, t: GPT(cfg).apply({"params": p}, t))(params, tokens)


def _decode(cfg, params, prompt, steps):
    """Greedy decode in a jitted lax.scan with the KV cache; returns per-step logits [steps, B, V]."""
    model = GPT(cfg)

    @jax.jit
    def run(params, prompt):
        cache = init_cache(cfg, prompt.shape[0], prompt.shape[1] + steps)
        logits, cache = model.apply({"params": params}, prompt, cache=cache)

        def step(carry, _):
            tok, cache = carry
            logits, cache = model.apply({"params": params}, tok[:, None], cache=cache)
            return (jnp.argmax(logits[:, -1], -1), cache), logits[:, -1]

        _, out = lax.scan(step, (jnp.argmax(logits[:, -1], -1), cache), None, length=steps)
        return out

    return run(params, prompt), run


def test_decode_loop_on_quantized_params_without_float_weight_copies(params):
    cfg, p = TINY, params
    qp = quantize(p, QuantConfig(embeddings=True))
    prompt = jax.random.randint(jax.random.PRNGKey(2), (1, 4), 0, cfg.vocab_size)
    out_q, run = _decode(cfg, qp, prompt, 6)
    out_d, _ = _decode(cfg, dequantize(qp), prompt, 6)
    chex.assert_trees_all_close(out_q, out_d, rtol=1e-5, atol=1e-5)

    weight_shapes = {s for x in jax.tree.leaves(p) if x.ndim == 2 for s in (x.shape, x.shape[::-1])}
    hlo = run.lower(qp, prompt).compile().as_text()  # prefill (4 rows, row-wise GEMV) + the decode loop
    assert not [s for _, s, _ in hlo_float_buffers(hlo) if s in weight_shapes]

    # the detector does see a float copy when one is written (the [in, out] int8 layout on CPU)
    q = jax.random.randint(jax.random.PRNGKey(3), (16, 64), -127, 128).astype(jnp.int8)
    naive = jax.jit(lambda x, q: lax.scan(lambda c, _: (jnp.tanh(c @ q.astype(jnp.float32))[:, :16], None),
                                          x, None, length=3)[0])
    text = naive.lower(jnp.ones((1, 16)), q).compile().as_text()
    if jax.default_backend() == "cpu":  # hoisted out of the loop: written once per call
        assert ((16, 64), False) in [(s, in_loop) for _, s, in_loop in hlo_float_buffers(text)]


# ---------------------------------------------------------------------------------------------------------
# Sizes, save / load


def test_size_report(params):
    p = params
    rep = size_report(quantize(p, QuantConfig()))
    K_N = [(16, 48), (16, 16), (16, 64), (64, 16)] * TINY.n_layer
    expect_q = sum(k * n + 4 * n for k, n in K_N)  # int8 values + one float32 scale per output column
    assert rep["quantized_bytes"] == expect_q
    assert rep["quantized_float_bytes"] == sum(4 * k * n for k, n in K_N)
    total_float = sum(x.nbytes for x in jax.tree.leaves(p))
    assert rep["float_total_bytes"] == total_float
    assert rep["total_bytes"] == total_float - rep["quantized_float_bytes"] + expect_q
    rep4 = size_report(quantize(p, QuantConfig(bits=4, granularity="group", group_size=8)))
    assert rep4["quantized_bytes"] == sum(k * n // 2 + 4 * n * k // 8 for k, n in K_N)


def test_save_load_roundtrip(tmp_path):
    p = random_params(GPTConfig.preset("nano"))  # big enough that array bytes, not metadata, fill the files
    qcfg = QuantConfig(bits=4, granularity="group", group_size=32, embeddings=True)
    qp = quantize(p, qcfg)
    nbytes = save_quantized(tmp_path / "q", qp, qcfg)
    back = load_quantized(tmp_path / "q")
    assert jax.tree.structure(back) == jax.tree.structure(qp)  # same static metadata too
    chex.assert_trees_all_equal(back, qp)
    assert back["h_0"]["attn"]["c_attn"]["kernel"].values.dtype == jnp.int8
    save_pytree(tmp_path / "f", p)
    float_disk = pytree_bytes_on_disk(tmp_path / "f")
    assert nbytes == pytree_bytes_on_disk(tmp_path / "q") < 0.4 * float_disk  # int4 really is smaller on disk
    with pytest.raises(ValueError, match="holds float params"):
        load_quantized(tmp_path / "f")
    with pytest.raises(ValueError, match="holds quantized params"):
        check_float_checkpoint(tmp_path / "q")
    check_float_checkpoint(tmp_path / "f")
    with pytest.raises(ValueError):  # restoring it as float params does not silently succeed
        restore_pytree(tmp_path / "q", p)


def test_save_never_overwrites_by_accident(tmp_path, params):
    p = params
    qp = quantize(p)
    save_quantized(tmp_path / "q", qp)
    with pytest.raises(FileExistsError):
        save_quantized(tmp_path / "q", quantize(p, QuantConfig(granularity="per_tensor")))
    chex.assert_trees_all_equal(load_quantized(tmp_path / "q"), qp)
    qp2 = quantize(p, QuantConfig(granularity="per_tensor"))
    save_quantized(tmp_path / "q", qp2, force=True)
    chex.assert_trees_all_equal(load_quantized(tmp_path / "q"), qp2)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["q"]  # no temporary folders left behind
    with pytest.raises(ValueError, match="no QuantizedArray"):
        save_quantized(tmp_path / "f", p)


# ---------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_errors(params):
    p = params
    with pytest.raises(ValueError, match="bits=3 is not supported"):
        QuantConfig(bits=3)
    with pytest.raises(ValueError, match="granularity"):
        QuantConfig(granularity="per_row")
    with pytest.raises(ValueError, match="include"):
        QuantConfig(include="h_0/*")
    with pytest.raises(ValueError, match="selects no weights"):
        quantize(p, QuantConfig(include=("nothing/*",)))
    with pytest.raises(ValueError, match="selects no weights"):
        quantize(p, QuantConfig(exclude=("*",)))
    with pytest.raises(ValueError, match="only 2-D"):
        quantize(p, QuantConfig(include=("h_0/ln_1/scale",)))
    with pytest.raises(ValueError, match="group_size=12 does not divide"):
        quantize(p, QuantConfig(granularity="group", group_size=12))
    with pytest.raises(ValueError, match="already quantized"):
        quantize(quantize(p))
    with pytest.raises(ValueError, match="bits=5"):
        quantize_array(p["h_0"]["mlp"]["c_fc"]["kernel"], bits=5)
    with pytest.raises(ValueError, match="not an embedding|embedding table"):
        quantize_array(p["wte"]["embedding"], transposed=False).matmul(jnp.ones((1, 16)), jnp.float32)


def test_quant_config_dict_roundtrip():
    q = QuantConfig(bits=4, granularity="group", group_size=64, include=("a/*",), exclude=("b",))
    assert QuantConfig.from_dict(q.to_dict()) == q
    with pytest.raises(ValueError, match="unknown fields"):
        QuantConfig.from_dict({"bitz": 8})
