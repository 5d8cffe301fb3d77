"""Compressed KV-cache entries: reads against a float64 NumPy reference, bytes, and decoding through GPT."""

from __future__ import annotations

import math
import zlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from jaxgpt.decode import kv_compress as kc
from jaxgpt.decode import turboquant as tq
from jaxgpt.decode.cache_kinds import new_cache
from jaxgpt.decode.kv_cache import KVCache
from jaxgpt.nn.config import GPTConfig
from jaxgpt.nn.model import GPT, init_params

CFG = GPTConfig(vocab_size=128, block_size=32, n_layer=2, n_head=2, n_embd=128)  # head_dim 64, as GPT-2
TIE = 1e-5  # inputs this close to a rounding boundary may round either way in float32; the reference skips them


# ---------------------------------------------------------------------------------------------------------
# float64 reference of every codec, using the entry's own constants


def f16(x: np.ndarray) -> np.ndarray:
    return np.minimum(x, 65504.0).astype(np.float16).astype(np.float64)


def ref_codec(codec, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x_hat, clear) for x [..., d] in float64; clear is False for vectors with a near-tie."""
    if isinstance(codec, kc.UniformCodec):
        top = 2**codec.bits - 1
        m = np.abs(x).max(-1, keepdims=True)
        t = (x / m + 1) * top / 2
        clear = np.all(np.abs(t - np.floor(t) - 0.5) > TIE, -1)
        return (np.clip(np.round(t), 0, top) * 2 / top - 1) * f16(m), clear
    if isinstance(codec, tq.ProdCodec):
        norms = np.linalg.norm(x, axis=-1, keepdims=True)
        u = x / norms
        if codec.mse is None:
            u_hat, clear = np.zeros_like(u), np.ones(x.shape[:-1], bool)
        else:
            u_hat, clear = ref_codec(codec.mse, u)
        r = u - u_hat
        s = np.asarray(codec.sketch, np.float64)
        proj = r @ s.T
        z = np.where(proj >= 0, 1.0, -1.0)
        qjl = math.sqrt(math.pi / 2) / codec.d * f16(norms * np.linalg.norm(r, axis=-1, keepdims=True)) * (z @ s)
        return f16(norms) * u_hat + qjl, clear & np.all(np.abs(proj) > TIE, -1)
    rot = np.asarray(codec.rotation, np.float64)  # TurboQuant_mse
    cb = tq.lloyd_max_codebook(codec.d, codec.bits)
    thr = np.array(cb.thresholds)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    y = (x / norms) @ rot.T
    clear = np.all(np.min(np.abs(y[..., None] - thr), -1) > TIE, -1)
    return (np.array(cb.centroids)[np.searchsorted(thr, y)] @ rot) * f16(norms), clear


def ref_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scale = f16(np.abs(x).max(-1, keepdims=True) / 127)
    t = x / scale
    clear = np.all(np.abs(t - np.floor(t) - 0.5) > TIE, -1)
    return np.clip(np.round(t), -127, 127) * scale, clear


def ref_tensor(coded: kc.CodedTensor, x: np.ndarray, perm: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Reconstruct x [T, H, D] of one row through the coded tensor's parts, in channel order perm [H, D]."""
    if perm is not None:
        x = np.take_along_axis(x, perm[None], -1)
    outs, clear, lo = [], np.ones(x.shape[:-1], bool), 0
    for codec in coded.codecs:
        hat, ok = ref_codec(codec, x[..., lo:lo + codec.d])
        outs.append(hat)
        clear &= ok
        lo += codec.d
    out = np.concatenate(outs, -1)
    if perm is not None:
        out = np.take_along_axis(out, np.argsort(perm, -1)[None], -1)
    return out, clear


def ref_order(x: np.ndarray, n_hi: int) -> np.ndarray:
    """Outlier channels [H, D] of one row's prefill x [T, H, D]: largest energy first half, each sorted."""
    order = np.argsort(-np.sum(x**2, 0), -1, kind="stable")
    return np.concatenate([np.sort(order[:, :n_hi], -1), np.sort(order[:, n_hi:], -1)], -1)


# ---------------------------------------------------------------------------------------------------------
# Reads of written entries


class EntryTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("int8", "turbo1")
    def test_reads_match_float64_reference(self, kind):
        self.check_reads(kind)

    @chex.variants(with_jit=True)
    @parameterized.parameters("turbo3-prod", "turbo2.5", "turbo1.5-prod", "uniform2.5")
    def test_more_kinds_match_float64_reference(self, kind):
        self.check_reads(kind)

    def check_reads(self, kind):
        B, S, H, D = 2, 12, CFG.n_head, CFG.head_dim
        entry = new_cache(kind, CFG, B, S, seed=3).layers[0]
        rng = np.random.default_rng(zlib.crc32(kind.encode()))
        scale = np.exp(rng.normal(size=D))  # uneven channel scales, so the outlier split matters
        # (prefill at 0, then writes at uneven row offsets; row 1's last write restarts it at 0)
        writes = [(5, [0, 0]), (1, [5, 3]), (1, [6, 0])]
        step = self.variant(lambda e, k, v, s: e.write(k, v, s))
        stored = {r: {} for r in range(B)}  # row -> position -> (k, v) float64, the row's live positions
        ever = {r: set() for r in range(B)}  # row -> positions ever written
        first = {r: None for r in range(B)}  # row -> (k, v) of its latest write at 0, for the channel order
        for t, starts in writes:
            k = rng.standard_normal((B, t, H, D)) * scale * 3
            v = rng.standard_normal((B, t, H, D)) * scale
            entry = step(entry, k.astype(np.float32), v.astype(np.float32), jnp.asarray(starts, jnp.int32))
            for r in range(B):
                if starts[r] == 0:  # a new sequence: older positions are past its length (masked)
                    first[r], stored[r] = (k[r], v[r]), {}
                for i in range(t):
                    stored[r][starts[r] + i] = (k[r, i], v[r, i])
                    ever[r].add(starts[r] + i)
        k_read, v_read = self.variant(lambda e: e.read(jnp.float32))(entry)
        chex.assert_shape([k_read, v_read], (B, S, H, D))

        checked = 0
        for r in range(B):
            pos = sorted(stored[r])
            for which, read in ((0, k_read), (1, v_read)):
                x = np.stack([stored[r][p][which] for p in pos])  # [P, H, D]
                if kind == "int8":
                    expect, clear = ref_int8(x)
                else:
                    coded = entry.k if which == 0 else entry.v
                    perm = None
                    if coded.perm is not None:
                        perm = ref_order(first[r][which], coded.codecs[0].d)
                        np.testing.assert_array_equal(coded.perm[r], perm)
                    expect, clear = ref_tensor(coded, x, perm)
                got = np.asarray(read[r, pos], np.float64)
                tol = 2e-4 * np.abs(x).max()  # float32 arithmetic and float16 norms rounding either way
                np.testing.assert_allclose(got[clear], expect[clear], rtol=0, atol=tol)
                checked += clear.sum()
                assert clear.mean() > 0.75
                unwritten = [p for p in range(S) if p not in ever[r]]
                np.testing.assert_array_equal(np.asarray(read[r, unwritten]), 0.0)
        assert checked > 0.75 * 2 * sum(len(stored[r]) for r in range(B)) * H


def test_outlier_split_gives_outliers_more_bits():
    # Two channels carry most of the energy: turbo2.5 puts them in the 3-bit half and beats turbo2 and
    # uniform2.5 on these vectors.
    B, T, H, D = 1, 64, CFG.n_head, CFG.head_dim
    rng = np.random.default_rng(11)
    x = rng.standard_normal((B, T, H, D))
    x[..., [5, 40]] *= 20
    errs = {}
    for kind in ("turbo2", "turbo2.5", "uniform2.5"):
        entry = new_cache(kind, CFG, B, T).layers[0]
        entry = jax.jit(lambda e, a: e.write(a, a, jnp.zeros((B,), jnp.int32)))(entry, x.astype(np.float32))
        k, _ = entry.read(jnp.float32)
        errs[kind] = float(np.sum((np.asarray(k) - x) ** 2) / np.sum(x**2))
        if kind == "turbo2.5":
            assert np.all(np.isin([5, 40], np.asarray(entry.k.perm)[..., : D // 2]))
    assert errs["turbo2.5"] < errs["turbo2"], errs
    assert errs["turbo2.5"] < errs["uniform2.5"], errs


def test_outlier_channels_come_from_each_rows_own_tokens():
    """A right-padded prefill: row 0's channel order depends on its own 5 tokens only, not on the padding
    (here loud in other channels), so it equals the order of the row written alone."""
    B, T, H, D, n = 2, 12, CFG.n_head, CFG.head_dim, 5
    rng = np.random.default_rng(12)
    x = rng.standard_normal((B, T, H, D)).astype(np.float32)
    x[0, n:, :, :8] *= 50  # row 0's padding
    write = jax.jit(lambda e, a: e.write(a, a, jnp.zeros((a.shape[0],), jnp.int32)))
    cache = kc.set_prompt_lengths(new_cache("turbo2.5", CFG, B, T), jnp.array([n, T]))
    batched = write(cache.layers[0], x)
    alone = write(new_cache("turbo2.5", CFG, 1, n).layers[0], x[:1, :n])
    np.testing.assert_array_equal(batched.k.perm[0], alone.k.perm[0])
    np.testing.assert_array_equal(batched.k.perm[0], ref_order(x[0, :n], D // 2))
    np.testing.assert_array_equal(batched.k.perm[1], ref_order(x[1], D // 2))
    np.testing.assert_array_equal(batched.k.own, kc.ALL_OWN)  # a later start-0 write (a refill) is all own
    assert not np.array_equal(ref_order(x[0], D // 2), ref_order(x[0, :n], D // 2))  # the padding would matter


def test_ragged_batch_row_equals_row_alone_with_mixed_cache():
    """Through `generate`: a row's turbo2.5 output is the same alone and beside a longer row (junk padding)."""
    from jaxgpt.decode import generation as G
    from jaxgpt.decode.options import DecodeOptions

    cfg = GPTConfig.preset("tiny", n_embd=32, n_layer=1)  # head_dim 16
    params = init_params(cfg, 0)
    prompts = np.array([[5, 17, 3, 90, 90, 90, 90, 90], [40, 2, 9, 66, 1, 12, 30, 8]], np.int32)
    opts = DecodeOptions(temperature=0, cache_kind="turbo2.5")
    alone = G.generate(params, cfg, prompts[:1, :3], 1, opts, return_logits=True)  # prefill reads back its keys
    batched = G.generate(params, cfg, prompts, 1, opts, prompt_lengths=[3, 8], return_logits=True)
    np.testing.assert_array_equal(batched.tokens[0], alone.tokens[0])
    chex.assert_trees_all_close(batched.logits[0], alone.logits[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["int8", "turbo2.5"])
def test_overlong_write_raises(kind):
    """dynamic_update_slice would clamp a write longer than the buffer onto earlier positions."""
    entry = new_cache(kind, CFG, 1, 4).layers[0]
    x = jnp.ones((1, 6, CFG.n_head, CFG.head_dim))
    with pytest.raises(ValueError, match="KV cache write of 6 positions does not fit a buffer of max_len 4"):
        jax.jit(lambda e, a, s: e.write(a, a, s))(entry, x, jnp.zeros((1,), jnp.int32))  # raised while tracing
    if kind == "int8":  # concrete offsets (outside jit) are checked too
        with pytest.raises(ValueError, match="KV cache write of 3 positions at offset 2 runs past max_len 4"):
            entry.write(x[:, :3], x[:, :3], jnp.array([2]))


# ---------------------------------------------------------------------------------------------------------
# Bytes


KINDS = ["bfloat16", "int8", "turbo4", "turbo3.5", "turbo3", "turbo3-prod", "turbo2.5", "turbo2", "turbo1",
         "uniform3", "uniform2.5"]
BITS = {"bfloat16": 16, "int8": 8.25, "turbo4": 4.25, "turbo3.5": 4.0, "turbo3": 3.25, "turbo3-prod": 3.375,
        "turbo2.5": 3.0, "turbo2": 2.25, "turbo1": 1.25, "uniform3": 3.25, "uniform2.5": 3.0}  # at head_dim 64


@pytest.mark.parametrize("kind", KINDS)
def test_bytes_are_measured_and_packed(kind):
    caches = {s: new_cache(kind, CFG, 2, s) for s in (8, 24)}
    for s, cache in caches.items():
        assert isinstance(cache, KVCache) and cache.max_len == s
        assert cache.nbytes == kc.compressed_cache_bytes(CFG, 2, s, kind)
    # what grows with the context is exactly the stated bits per value, all arrays counted
    growth = caches[24].nbytes - caches[8].nbytes
    assert kc.bits_per_value(CFG, kind) == BITS[kind]
    assert growth * 8 == BITS[kind] * CFG.n_layer * 2 * 2 * 16 * CFG.n_embd
    if kind.startswith(("turbo", "uniform")):
        dtypes = {x.dtype for x in jax.tree.leaves(caches[8].layers[0]) if x.ndim >= 3 and x.shape[1] == 8}
        assert dtypes <= {jnp.dtype(jnp.uint8), jnp.dtype(jnp.float16)}, dtypes


def test_bad_kinds_raise():
    for bad in ("turbo5", "turbo4.5", "uniform3-prod", "int4", "fp8", "turbo3.25"):
        with pytest.raises(ValueError, match="unknown KV-cache kind"):
            new_cache(bad, CFG, 1, 8)
    with pytest.raises(ValueError, match="odd"):
        new_cache("turbo2.5", GPTConfig(vocab_size=16, n_layer=1, n_head=2, n_embd=14), 1, 8)
    with pytest.raises(ValueError, match="positive"):
        new_cache("int8", CFG, 0, 8)


# ---------------------------------------------------------------------------------------------------------
# Decoding through the model


def test_gpt_decodes_through_compressed_caches():
    """Prefill 12 tokens, then 6 teacher-forced decode steps in lax.scan, vs the model without a cache."""
    params = init_params(CFG, 0)
    # GPT-2's init gives near-uniform attention; sharpen it (x5 on q, k, v) so cache errors show in the logits
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x * 5 if "c_attn" in jax.tree_util.keystr(p) and x.ndim == 2 else x, params)
    B, T0, steps = 2, 12, 6
    tokens = jax.random.randint(jax.random.PRNGKey(1), (B, T0 + steps), 0, CFG.vocab_size)
    model = GPT(CFG)

    @jax.jit
    def run(cache):
        logits, cache = model.apply({"params": params}, tokens[:, :T0], cache=cache)

        def step(c, tok):
            out, c = model.apply({"params": params}, tok[:, None], cache=c)
            return c, out[:, 0]

        cache, dec = jax.lax.scan(step, cache, tokens[:, T0:].T)
        return jnp.concatenate([logits, jnp.swapaxes(dec, 0, 1)], axis=1), cache  # [B, T0 + steps, V]

    full = np.asarray(jax.jit(lambda t: model.apply({"params": params}, t))(tokens))  # no cache: exact
    spread = np.linalg.norm(full - full.mean(-1, keepdims=True))
    rel = {}
    for kind in ("int8", "turbo4", "turbo2"):
        logits, cache = run(new_cache(kind, CFG, B, T0 + steps))
        chex.assert_shape(logits, full.shape)
        np.testing.assert_array_equal(cache.lengths, T0 + steps)
        rel[kind] = float(np.linalg.norm(logits - full) / spread)
    assert rel["int8"] < 0.03, rel  # measured 0.011
    assert rel["turbo4"] < 0.3, rel  # measured ~0.18 (sqrt(D_mse) = 9.5% error per cached vector)
    assert rel["int8"] < rel["turbo4"] < rel["turbo2"], rel
