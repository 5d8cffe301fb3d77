"""The modern switches (gated MLPs, grouped-query attention, head_size, QK-norm, soft-capping, separate q/k/v,
q/k/v biases) against an independent float64 NumPy forward, and through the cache, scan, remat, LoRA and int8."""

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_params

from jaxgpt import lora
from jaxgpt.decode import generation as G
from jaxgpt.decode.cache_kinds import new_cache
from jaxgpt.decode.kv_cache import cache_bytes
from jaxgpt.decode.kv_compress import compressed_cache_bytes
from jaxgpt.decode.options import DecodeOptions
from jaxgpt.nn.config import GPTConfig, llama_mlp_hidden, param_count
from jaxgpt.nn.model import GPT, init_params
from jaxgpt.nn.weights import count_params
from jaxgpt.quantize import QuantConfig, QuantizedArray, dequantize, quantize

REPO = Path(__file__).resolve().parents[1]
GQA = {"n_head": 4, "n_embd": 32, "n_kv_head": 2}  # tiny's depth and vocabulary, 4 query heads over 2 kv heads
EVERYTHING = {**GQA, "pos_embedding": "rope", "norm": "rmsnorm", "bias": False, "qkv_bias": True, "mlp": "swiglu",
              "mlp_hidden": 40, "qk_norm": True, "logit_softcap": 2.0, "fused_qkv": False, "head_size": 12,
              "tie_embeddings": False}


# ------------------------------------------------------------------------------------------------------------
# float64 NumPy reference, written from the papers (Shazeer 2020 GLU variants, GQA, Qwen3, Gemma 2)


def np_attention(q, k, v, keep=None, keep_prob=1.0, mask=None):
    """float64 softmax attention, q [B, T, H, D], k/v [B, S, Hkv, D]: each kv head repeated for its H / Hkv
    query heads (head h reads kv head h // (H / Hkv)); mask [B, 1, T, S] (None: causal); keep drops probs."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    rep = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)  # [B, S, H, D]
    s = np.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
    T, S = q.shape[1], k.shape[1]
    allowed = np.tril(np.ones((T, S), bool)) if mask is None else np.asarray(mask)
    s = np.where(allowed, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if keep is not None:
        p = np.where(np.asarray(keep), p / keep_prob, 0.0)
    return np.einsum("bhts,bshd->bthd", p, v)


def np_act(kind, x):
    if kind == "swiglu":
        return x / (1.0 + np.exp(-x))
    if kind == "relu2":
        return np.maximum(x, 0.0) ** 2
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))  # gelu, geglu


def np_forward(cfg: GPTConfig, p, tokens: np.ndarray) -> np.ndarray:
    """Pre-norm model with every switch of the modern block; positions learned or rope."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    B, T = tokens.shape
    H, Hkv, D = cfg.n_head, cfg.n_kv_head or cfg.n_head, cfg.head_size or cfg.n_embd // cfg.n_head
    pos = np.arange(T)

    def rms(x, scale):
        return x / np.sqrt((x**2).mean(-1, keepdims=True) + cfg.layer_norm_eps) * scale

    def norm(x, q):
        if cfg.norm == "rmsnorm":
            return rms(x, q["scale"])
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        y = (x - mu) / np.sqrt(var + cfg.layer_norm_eps) * q["scale"]
        return y + q["bias"] if cfg.bias else y

    def lin(x, q, bias=cfg.bias):
        return x @ q["kernel"] + (q["bias"] if bias else 0.0)

    def rope(x):  # x [B, T, heads, D]; pairs (i, i + D/2)
        inv = 1.0 / cfg.rope_theta ** (np.arange(0, D, 2) / D)
        a = pos[:, None] * inv[None]  # [T, D/2]
        cos, sin = np.cos(a)[None, :, None], np.sin(a)[None, :, None]
        x1, x2 = x[..., : D // 2], x[..., D // 2 :]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    def attn(x, a):
        qkv_bias = cfg.bias or cfg.qkv_bias
        if cfg.fused_qkv:
            q, k, v = np.split(lin(x, a["c_attn"], qkv_bias), [H * D, (H + Hkv) * D], -1)
        else:
            q, k, v = (lin(x, a[n], qkv_bias) for n in ("c_q", "c_k", "c_v"))
        q, k, v = q.reshape(B, T, H, D), k.reshape(B, T, Hkv, D), v.reshape(B, T, Hkv, D)
        if cfg.qk_norm:
            q, k = rms(q, a["q_norm"]["scale"]), rms(k, a["k_norm"]["scale"])
        if cfg.pos_embedding == "rope":
            q, k = rope(q), rope(k)
        return lin(np_attention(q, k, v).reshape(B, T, H * D), a["c_proj"])

    def mlp(x, m):
        if cfg.mlp in ("swiglu", "geglu"):
            h = np_act(cfg.mlp, lin(x, m["c_gate"])) * lin(x, m["c_fc"])
        else:
            h = np_act(cfg.mlp, lin(x, m["c_fc"]))
        return lin(h, m["c_proj"])

    x = p["wte"]["embedding"][tokens]
    if cfg.pos_embedding == "learned":
        x = x + p["wpe"]["embedding"][pos]
    for i in range(cfg.n_layer):
        h = p[f"h_{i}"]
        x = x + attn(norm(x, h["ln_1"]), h["attn"])
        x = x + mlp(norm(x, h["ln_2"]), h["mlp"])
    x = norm(x, p["ln_f"])
    logits = x @ (p["wte"]["embedding"].T if cfg.tie_embeddings else p["lm_head"]["kernel"])
    return cfg.logit_softcap * np.tanh(logits / cfg.logit_softcap) if cfg.logit_softcap else logits


CASES = {
    "swiglu": {"mlp": "swiglu", "mlp_hidden": 40},
    "geglu": {"mlp": "geglu", "bias": False},
    "relu2": {"mlp": "relu2", "mlp_hidden": 24},
    "gqa-manual": {**GQA, "attention": "manual", "pos_embedding": "rope"},
    "mqa-xla": {**GQA, "n_kv_head": 1},
    "qk_norm-rope": {"qk_norm": True, "pos_embedding": "rope", "norm": "rmsnorm"},
    "head_size-unfused-qkv_bias": {"head_size": 12, "fused_qkv": False, "bias": False, "qkv_bias": True},
    "softcap": {"logit_softcap": 0.5},
    "everything": EVERYTHING,
}


def _logits(cfg, params, tokens, **kw):
    return np.asarray(jax.jit(lambda p, t: GPT(cfg).apply({"params": p}, t, **kw))(params, tokens))


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_switch_matches_a_float64_numpy_forward(name):
    cfg = GPTConfig.preset("tiny", **CASES[name])
    params = random_params(cfg, seed=1, std=0.3)  # every leaf random, biases and norm scales too
    tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(3), (2, 13), 0, cfg.vocab_size))
    out, ref = _logits(cfg, params, tokens), np_forward(cfg, params, tokens)
    assert np.abs(ref).max() > 0.3  # activations are not tiny
    if cfg.logit_softcap:
        assert np.abs(ref).max() > 0.5 * cfg.logit_softcap  # the cap bends the logits
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())  # float32 vs float64


def test_qwen3_style_block_matches_transformers_qwen3():
    """transformers' Qwen3ForCausalLM with the same weights: RMSNorm, SwiGLU, GQA (repeat_kv's head order),
    QK-norm before RoPE (rotate_half layout, theta 1e6), head_dim != n_embd / n_head, an untied head."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = GPTConfig.preset("tiny", style="qwen3", **GQA, head_size=12)
    assert (cfg.kv_heads, cfg.mlp_width, cfg.qk_norm, cfg.rope_theta, cfg.fused_qkv) == (2, 96, True, 1e6, False)
    params = random_params(cfg, seed=9, std=0.3)
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_width,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.layer_norm_eps,
        tie_word_embeddings=False, attention_bias=False)).eval()
    names = {"self_attn.q_proj": "attn/c_q", "self_attn.k_proj": "attn/c_k", "self_attn.v_proj": "attn/c_v",
             "self_attn.o_proj": "attn/c_proj", "mlp.gate_proj": "mlp/c_gate", "mlp.up_proj": "mlp/c_fc",
             "mlp.down_proj": "mlp/c_proj"}
    state = {"model.embed_tokens.weight": params["wte"]["embedding"], "model.norm.weight": params["ln_f"]["scale"],
             "lm_head.weight": params["lm_head"]["kernel"].T}
    for i in range(cfg.n_layer):
        h, pre = params[f"h_{i}"], f"model.layers.{i}."
        state |= {pre + t + ".weight": h[m.split("/")[0]][m.split("/")[1]]["kernel"].T for t, m in names.items()}
        state |= {pre + "input_layernorm.weight": h["ln_1"]["scale"],
                  pre + "post_attention_layernorm.weight": h["ln_2"]["scale"],
                  pre + "self_attn.q_norm.weight": h["attn"]["q_norm"]["scale"],
                  pre + "self_attn.k_norm.weight": h["attn"]["k_norm"]["scale"]}
    missing, unexpected = hf.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in state.items()}, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(2), (2, 13), 0, cfg.vocab_size))
    with torch.no_grad():
        want = hf(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(_logits(cfg, params, tokens), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("impl,hkv,rate,masked", [("manual", 2, 0.0, False), ("manual", 1, 0.2, False),
                                                  ("xla", 2, 0.0, False), ("manual", 2, 0.0, True),
                                                  ("xla", 1, 0.0, True)])
def test_grouped_query_attention_matches_numpy_with_repeated_kv_heads(impl, hkv, rate, masked):
    """T = 150 runs the manual path in two query blocks; with dropout each block draws its part of the full
    [B, H, T, T] mask; masked: the cached path's [B, 1, T, S] mask with rows at different offsets."""
    from jaxgpt.nn.dropout import keep_mask, keep_probability
    from jaxgpt.nn.model import ATTENTION_BLOCK, dot_product_attention

    B, T, H, D = 2, 150, 4, 8
    S = T + 6 if masked else T
    assert T > ATTENTION_BLOCK
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(4), 3)
    q = jax.random.normal(kq, (B, T, H, D))
    k, v = jax.random.normal(kk, (B, S, hkv, D)), jax.random.normal(kv, (B, S, hkv, D))
    mask = None
    if masked:
        positions = jnp.arange(T)[None, :] + jnp.array([[0], [5]])  # [B, T]: row 1 starts at offset 5
        mask = jnp.arange(S)[None, None, None, :] <= positions[:, None, :, None]  # [B, 1, T, S]
    rng = jax.random.PRNGKey(9) if rate else None
    out = jax.jit(lambda q, k, v, m: dot_product_attention(q, k, v, m, impl=impl, dropout_rate=rate,
                                                           dropout_rng=rng))(q, k, v, mask)
    keep = keep_mask(rng, rate, (B, H, T, T)) if rate else None
    ref = np_attention(q, k, v, keep, keep_probability(rate), mask)
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5, rtol=1e-5)  # float32 vs float64


def test_soft_capping_is_cap_times_tanh_of_the_uncapped_logits():
    cfg = GPTConfig.preset("tiny")
    params = random_params(cfg, seed=2, std=0.5)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 9), 0, cfg.vocab_size)
    raw = _logits(cfg, params, tokens).astype(np.float64)
    cap = 0.5 * float(np.abs(raw).max())  # the largest logits are bent hard
    capped = _logits(cfg.replace(logit_softcap=cap), params, tokens)
    np.testing.assert_allclose(capped, cap * np.tanh(raw / cap), rtol=1e-6, atol=1e-6 * cap)
    assert np.abs(capped).max() < cap


def test_separate_q_k_v_equal_the_fused_kernel_they_concatenate_to():
    cfg = GPTConfig.preset("tiny", **GQA, pos_embedding="rope", qkv_bias=True, bias=False)
    unfused = random_params(cfg.replace(fused_qkv=False), seed=4, std=0.3)

    def fused_attn(a):
        parts = [a[n] for n in ("c_q", "c_k", "c_v")]
        c_attn = {k: jnp.concatenate([q[k] for q in parts], axis=-1) for k in ("kernel", "bias")}
        return {"c_attn": c_attn, "c_proj": a["c_proj"]}

    fused = {k: ({**v, "attn": fused_attn(v["attn"])} if k.startswith("h_") else v) for k, v in unfused.items()}
    assert fused["h_0"]["attn"]["c_attn"]["kernel"].shape == (32, (4 + 2 * 2) * 8)  # [C, (H + 2 Hkv) D]
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 11), 0, cfg.vocab_size)
    want = _logits(cfg.replace(fused_qkv=False), unfused, tokens)
    # the same sums in float32 GEMMs of other shapes: equal up to rounding
    np.testing.assert_allclose(_logits(cfg, fused, tokens), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_scan_layers_and_remat_give_the_unrolled_logits_and_gradients_with_every_switch_on():
    cfg = GPTConfig.preset("tiny", **EVERYTHING)
    params = random_params(cfg, seed=5, std=0.3)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 12), 0, cfg.vocab_size)

    def loss_and_grad(c):
        def loss(p):
            return jnp.mean(GPT(c).apply({"params": p}, tokens) ** 2)

        return jax.jit(jax.value_and_grad(loss))(params)

    ref = loss_and_grad(cfg)
    for variant in (cfg.replace(scan_layers=True), cfg.replace(remat="full"),
                    cfg.replace(scan_layers=True, remat="dots_saveable")):
        got = loss_and_grad(variant)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, ref)
    np.testing.assert_allclose(_logits(cfg.replace(scan_layers=True), params, tokens), _logits(cfg, params, tokens),
                               rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# Decoding with n_kv_head heads in the cache

PROMPTS = [[5, 17, 3], [40, 2, 9, 66, 1, 12, 30], [88]]
N = 9


def test_gqa_cached_greedy_decode_follows_the_uncached_argmax_chain_and_int8_stays_close():
    cfg = GPTConfig.preset("tiny", **{**GQA, "n_kv_head": 1}, pos_embedding="rope", qk_norm=True, mlp="swiglu")
    params = random_params(cfg, seed=6, std=0.3)
    opts = DecodeOptions(temperature=0)
    out = G.generate(params, cfg, PROMPTS, N, opts, return_logits=True)
    rows = [p + np.asarray(out.tokens[b, :-1]).tolist() for b, p in enumerate(PROMPTS)]
    padded = np.zeros((3, max(map(len, rows))), np.int32)
    for b, r in enumerate(rows):
        padded[b, :len(r)] = r
    full = _logits(cfg, params, padded)  # no cache
    for b, p in enumerate(PROMPTS):  # the logits that chose token i sit at position len(p) - 1 + i
        chain = full[b, len(p) - 1:len(p) - 1 + N]
        np.testing.assert_array_equal(out.tokens[b], chain.argmax(-1))
        np.testing.assert_allclose(out.logits[b], chain, atol=1e-5, rtol=0)
    int8 = G.generate(params, cfg, PROMPTS, N, opts.replace(cache_kind="int8"), return_logits=True)
    assert not np.array_equal(int8.logits, out.logits)  # the int8 entries were really used
    np.testing.assert_array_equal(int8.tokens, out.tokens)  # the same greedy chain, so the logits compare
    dense = np.asarray(out.logits)
    spread = np.linalg.norm(dense - dense.mean(-1, keepdims=True))
    assert np.linalg.norm(int8.logits - dense) / spread < 0.03  # test_kv_compress's int8 bound (relative error)


@pytest.mark.parametrize("kind", ["dense", "int8", "turbo3", "turbo2.5-prod", "uniform3"])
def test_caches_hold_kv_heads_and_their_bytes_shrink_with_them(kind):
    mha = GPTConfig.preset("tiny", **{**GQA, "n_kv_head": 0})
    gqa = mha.replace(n_kv_head=1)
    B, S = 2, 64
    cache = jax.eval_shape(lambda: new_cache(kind, gqa, B, S))
    heads = {x.shape[2] for layer in cache.layers for x in jax.tree.leaves(layer) if x.ndim >= 4 and x.shape[1] == S}
    assert heads == {1}  # [B, S, Hkv, ...] buffers
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
    assert nbytes == compressed_cache_bytes(gqa, B, S, kind)
    assert compressed_cache_bytes(mha, B, S, kind) > 2.5 * nbytes  # 4 heads -> 1; rotations do not shrink
    if kind == "dense":
        assert cache_bytes(gqa, B, S) == nbytes - 4 * B == 2 * 2 * B * S * 1 * 8 * 4  # L, k and v, Hkv, D, float32
        assert cache_bytes(mha, B, S) == 4 * cache_bytes(gqa, B, S)


# ------------------------------------------------------------------------------------------------------------
# LoRA and int8 weights on the new kernels


def test_lora_on_c_q_c_k_and_c_gate_wraps_to_the_merged_logits():
    cfg = GPTConfig.preset("tiny", **GQA, fused_qkv=False, mlp="swiglu", bias=False)
    params = random_params(cfg, seed=7, std=0.3)
    lcfg = lora.LoraConfig(rank=2, alpha=4.0, targets=("attn/c_q", "attn/c_k", "mlp/c_gate"))
    adapters = lora.init_lora(1, params, lcfg)
    assert adapters["h_1"]["attn"]["c_k"]["B"].shape == (2, 2 * 8)  # [r, Hkv D]
    rng = np.random.default_rng(0)  # B is 0 at init: draw it, so the adapters change the logits
    adapters = jax.tree.map(lambda x: jnp.asarray(rng.normal(0.0, 0.3, x.shape), x.dtype), adapters)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 10), 0, cfg.vocab_size)
    wrapped = _logits(cfg, lora.wrap(params, adapters, lcfg), tokens)
    merged = _logits(cfg, lora.merge(params, adapters, lcfg), tokens)
    np.testing.assert_allclose(wrapped, merged, rtol=1e-5, atol=1e-5)
    assert np.abs(wrapped - _logits(cfg, params, tokens)).max() > 1e-2
    everything = lora.resolve_targets(params, lora.LoraConfig(rank=2, targets=("all",)))
    assert {t.path[1:] for t in everything} == {("attn", n) for n in ("c_q", "c_k", "c_v", "c_proj")} | {
        ("mlp", n) for n in ("c_gate", "c_fc", "c_proj")}


def test_lora_refuses_q_k_v_slices_of_a_grouped_query_fused_kernel():
    cfg = GPTConfig.preset("tiny", **GQA)
    params = jax.eval_shape(lambda: init_params(cfg, 0))
    with pytest.raises(ValueError, match="fused_qkv=False") as e:
        lora.resolve_targets(params, lora.LoraConfig(rank=2, targets=("attn/c_attn/q",)))
    assert "\n" not in str(e.value)


def test_int8_weights_of_a_swiglu_gqa_model_stay_within_the_quantize_tolerance():
    cfg = GPTConfig.preset("tiny", **{**GQA, "n_kv_head": 1}, fused_qkv=False, mlp="swiglu", qk_norm=True)
    params = random_params(cfg, seed=8)
    qp = quantize(params, QuantConfig())
    for name in ("attn/c_q", "attn/c_k", "attn/c_v", "mlp/c_gate", "mlp/c_fc"):
        assert isinstance(qp["h_0"][name.split("/")[0]][name.split("/")[1]]["kernel"], QuantizedArray), name
    assert not isinstance(qp["h_0"]["attn"]["q_norm"]["scale"], QuantizedArray)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 32), 0, cfg.vocab_size)
    lq, lf = _logits(cfg, qp, tokens), _logits(cfg, params, tokens)
    np.testing.assert_allclose(lq, _logits(cfg, dequantize(qp), tokens), rtol=1e-5, atol=1e-5)
    assert np.abs(lq - lf).max() < 0.02 * np.abs(lf).max()  # test_quantize's bound for the float model
    assert np.abs(lq - lf).max() > 0  # the int8 weights were used


# ------------------------------------------------------------------------------------------------------------
# Config: defaults, counts, presets, errors


@pytest.mark.parametrize("name", ["swiglu", "head_size-unfused-qkv_bias", "everything", "mqa-xla", "relu2"])
def test_param_count_counts_every_switch(name):
    cfg = GPTConfig.preset("tiny", **CASES[name])
    assert param_count(cfg)["total"] == count_params(jax.eval_shape(lambda: init_params(cfg, 0)))


def test_gpt2_defaults_are_unchanged_and_old_config_dicts_still_load():
    old = {k: v for k, v in GPTConfig().to_dict().items()
           if k not in ("mlp", "mlp_hidden", "n_kv_head", "head_size", "qk_norm", "logit_softcap", "fused_qkv",
                        "qkv_bias")}
    cfg = GPTConfig.from_dict(old)
    assert cfg == GPTConfig() and cfg.kv_heads == 12 and cfg.head_dim == 64 and cfg.mlp_width == 3072
    assert param_count(cfg)["total"] == 124_439_808  # GPT-2 124M
    shapes = jax.eval_shape(lambda: init_params(GPTConfig.preset("tiny"), 0))
    assert set(shapes["h_0"]["attn"]) == {"c_attn", "c_proj"} and set(shapes["h_0"]["mlp"]) == {"c_fc", "c_proj"}


def test_llama_and_qwen3_styles_at_gpt2_shape():
    llama = GPTConfig.preset("gpt2", style="llama")
    assert llama == GPTConfig.preset("llama-style")
    assert (llama.n_layer, llama.n_head, llama.n_embd, llama.kv_heads, llama.mlp_width) == (12, 12, 768, 3, 2048)
    assert (llama.pos_embedding, llama.norm, llama.bias, llama.tie_embeddings, llama.fused_qkv, llama.mlp) == (
        "rope", "rmsnorm", False, False, False, "swiglu")
    qwen3 = GPTConfig.preset("qwen3-style")
    assert qwen3 == llama.replace(qk_norm=True, rope_theta=1e6)
    assert GPTConfig.preset("gpt2-xl", style="llama").kv_heads == 5  # 25 heads: the largest divisor <= 6
    assert GPTConfig.preset("tiny", style="llama", n_head=8, n_embd=64).kv_heads == 2  # from the overridden shape
    assert llama_mlp_hidden(4096) == 11008  # Llama 7B
    assert llama_mlp_hidden(8192, 4096, 1.3) == 28672  # Llama 3 70B


@pytest.mark.parametrize("overrides,field", [
    ({"n_head": 4, "n_embd": 32, "n_kv_head": 3}, "n_kv_head=3 does not divide n_head=4"),
    ({"n_kv_head": 4}, "n_kv_head=4 does not divide n_head=2"),
    ({"mlp": "swish"}, "mlp='swish'"),
    ({"mlp_hidden": -8}, "mlp_hidden=-8"),
    ({"head_size": 2.5}, "head_size=2.5"),
    ({"n_kv_head": -1}, "n_kv_head=-1"),
    ({"qk_norm": "yes"}, "qk_norm='yes'"),
    ({"fused_qkv": 1}, "fused_qkv=1"),
    ({"qkv_bias": None}, "qkv_bias=None"),
    ({"logit_softcap": -30.0}, "logit_softcap=-30.0"),
    ({"logit_softcap": float("inf")}, "logit_softcap=inf"),
    ({"pos_embedding": "rope", "head_size": 7}, "rope needs an even head_dim"),
])
def test_bad_switches_are_refused_in_one_line_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match="GPTConfig") as e:
        GPTConfig.preset("tiny", **overrides)
    assert field in str(e.value) and "\n" not in str(e.value)


def test_unknown_style_is_refused():
    with pytest.raises(ValueError, match="unknown style 'mistral'; use one of gpt2, llama, qwen3"):
        GPTConfig.preset("gpt2", style="mistral")


def test_head_size_lets_n_embd_and_n_head_disagree():
    cfg = GPTConfig.preset("tiny", n_embd=20, n_head=3, head_size=8)  # q is [20, 24]
    shapes = jax.eval_shape(lambda: init_params(cfg, 0))
    assert shapes["h_0"]["attn"]["c_attn"]["kernel"].shape == (20, 72)
    assert shapes["h_0"]["attn"]["c_proj"]["kernel"].shape == (24, 20)


def test_style_configs_train_like_the_cpu_recipe(monkeypatch):
    from jaxgpt.train.config import load_config_file
    from jaxgpt.train.run import model_config

    monkeypatch.syspath_prepend(str(REPO))  # as for `python train.py`: `from configs import ...`
    base = load_config_file(str(REPO / "configs" / "shakespeare_char_cpu.py"))
    for name, qk in (("llama_style", False), ("qwen3_style", True)):
        c = load_config_file(str(REPO / "configs" / f"{name}.py"))
        assert (c.batch_size, c.max_iters, c.learning_rate) == (base.batch_size, base.max_iters, base.learning_rate)
        m = model_config(c.model.to_dict(), False, vocab_size=65)
        assert (m.n_layer, m.n_embd, m.block_size, m.mlp, m.qk_norm, m.fused_qkv) == (4, 128, 64, "swiglu", qk, False)
