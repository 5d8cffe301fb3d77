"""DecodeOptions and the cache factory: options check themselves with one-line errors, `new_cache` builds every
kind, and `generate` with options emits what a per-token reference of the sampling rules emits."""

import dataclasses
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_params

from jaxgpt.decode import generation as G
from jaxgpt.decode import kv_compress as kc
from jaxgpt.decode.cache_kinds import KIND_HELP, CacheKind, new_cache, parse_kind
from jaxgpt.decode.kv_cache import LayerKV
from jaxgpt.decode.options import DecodeOptions
from jaxgpt.nn.config import GPTConfig
from jaxgpt.nn.model import GPT

CFG = GPTConfig.preset("tiny", n_embd=32, n_layer=2)  # vocab 97, block 32, head_dim 16
PROMPTS = [[5, 17, 3], [40, 2, 9, 66, 1, 12, 30], [88]]

# ---------------------------------------------------------------------------------------------------------
# Options


@pytest.mark.parametrize("changes,message", [
    (dict(temperature=-0.5), r"temperature=-0.5 is not valid; use 0 \(greedy\) or a positive number"),
    (dict(temperature=float("nan")), "temperature=nan is not valid"),
    (dict(temperature=True), "temperature=True is not valid"),
    (dict(top_k=0), r"top_k=0 is not valid; use a positive integer or None \(no top-k\)"),
    (dict(top_k=2.5), "top_k=2.5 is not valid"),
    (dict(top_p=0.0), r"top_p=0.0 is not valid; use a value in \(0, 1\] or None \(no top-p\)"),
    (dict(top_p=1.5), r"top_p=1.5 is not valid; use a value in \(0, 1\]"),
    (dict(seed=1.5), "seed=1.5 is not valid; use an integer"),
    (dict(seed="7"), "seed='7' is not valid"),
    (dict(eos_id=-1), "eos_id=-1 is not a token id; use a non-negative integer or None"),
    (dict(pad_id=2.0), "pad_id=2.0 is not a token id"),
    (dict(bos_id=False), "bos_id=False is not a token id"),
    (dict(cache_kind="int3"), r"unknown KV-cache kind 'int3'; use one of dense \| float32 .* turbo\{b\}"),
    (dict(cache_kind="turbo4.5"), "unknown KV-cache kind 'turbo4.5'"),
    (dict(cache_dtype="float64"), "cache dtype 'float64' is not valid; use one of float32, bfloat16, float16"),
    (dict(cache_kind="int8", cache_dtype="bfloat16"), "applies to the 'dense' cache kind only, not 'int8'"),
])
def test_bad_options_fail_with_one_line_naming_the_fix(changes, message):
    with pytest.raises(ValueError, match=message) as e:
        DecodeOptions(**changes)
    assert "\n" not in str(e.value)


def test_defaults_are_the_previous_keyword_defaults():
    o = DecodeOptions()
    assert dataclasses.asdict(o) == dict(temperature=1.0, top_k=None, top_p=None, seed=None, eos_id=None,
                                         pad_id=None, bos_id=None, window=None, cache_kind="dense", cache_dtype=None)
    assert not o.greedy and DecodeOptions(temperature=0).greedy


def test_options_are_frozen_and_replace_checks_again():
    o = DecodeOptions(temperature=0.7, top_k=40, seed=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.temperature = 0.5
    assert o.replace(top_p=0.9) == DecodeOptions(temperature=0.7, top_k=40, top_p=0.9, seed=3)
    with pytest.raises(ValueError, match="top_p=2"):
        o.replace(top_p=2)
    assert hash(o) == hash(DecodeOptions(temperature=0.7, top_k=40, seed=3))


def test_cache_dtype_is_stored_by_name():
    assert DecodeOptions(cache_dtype=jnp.bfloat16).cache_dtype == "bfloat16"
    assert DecodeOptions(cache_dtype=np.float16).cache_dtype == "float16"
    assert DecodeOptions(cache_dtype=jnp.dtype("float32")).cache_dtype == "float32"


def test_importing_options_does_not_import_jax():
    code = ("import sys, jaxgpt.decode.options, jaxgpt.decode.cache_kinds; "
            "from jaxgpt.decode import DecodeOptions; DecodeOptions(cache_kind='turbo3', seed=1); "
            "assert 'jax' not in sys.modules, 'jax was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_package_exports_options_and_factory():
    import jaxgpt
    import jaxgpt.decode as D

    assert D.DecodeOptions is DecodeOptions and D.new_cache is new_cache
    assert jaxgpt.DecodeOptions is DecodeOptions
    assert D.stream is G.stream and D.sample_text is G.sample_text and D.generate_uncached is G.generate_uncached


# ---------------------------------------------------------------------------------------------------------
# The cache factory


def test_parse_kind_reads_every_kind():
    assert parse_kind("dense") == CacheKind("dense")
    assert parse_kind("dense", jnp.bfloat16) == CacheKind("dense", "bfloat16")
    assert parse_kind("float16") == CacheKind("dense", "float16")
    assert parse_kind("int8") == CacheKind("int8")
    assert parse_kind("turbo3.5-prod") == CacheKind("turbo", bits=3.5, prod=True)
    assert parse_kind("uniform2") == CacheKind("uniform", bits=2.0)
    for bad in ("uniform3-prod", "fp8", "turbo0", "", None):
        with pytest.raises(ValueError, match=f"unknown KV-cache kind .*; use one of {KIND_HELP[:5]}"):
            parse_kind(bad)


@pytest.mark.parametrize("kind,dtype,entry,value_dtype", [
    ("dense", None, LayerKV, jnp.float32),
    ("dense", "bfloat16", LayerKV, jnp.bfloat16),
    ("float16", None, LayerKV, jnp.float16),
    ("int8", None, kc.Int8LayerKV, jnp.int8),
    ("turbo3", None, kc.TurboLayerKV, jnp.uint8),
    ("turbo2.5-prod", None, kc.TurboLayerKV, jnp.uint8),
    ("uniform3", None, kc.UniformLayerKV, jnp.uint8),
])
def test_new_cache_builds_each_kind(kind, dtype, entry, value_dtype):
    B, S, H, D = 3, 10, CFG.n_head, CFG.head_dim
    cache = new_cache(kind, CFG, B, S, dtype)
    assert len(cache.layers) == CFG.n_layer and all(isinstance(e, entry) for e in cache.layers)
    assert cache.max_len == S and cache.lengths.shape == (B,) and not cache.lengths.any()
    stored = cache.layers[0].k if entry is not kc.TurboLayerKV and entry is not kc.UniformLayerKV \
        else cache.layers[0].k.parts[0].codes
    assert stored.dtype == value_dtype and stored.shape[:3] == (B, S, H)
    if dtype is None:
        assert cache.nbytes == kc.compressed_cache_bytes(CFG, B, S, kind)
    # a random write reads back close to what was written (exactly for float32)
    rng = np.random.default_rng(len(kind))
    k, v = (jnp.asarray(rng.standard_normal((B, 4, H, D)), jnp.float32) for _ in range(2))
    got_k, got_v = cache.layers[0].write(k, v, jnp.asarray([0, 3, 6], jnp.int32)).read(jnp.float32)
    for b, start in enumerate((0, 3, 6)):
        err = np.linalg.norm(got_k[b, start:start + 4] - k[b]) / np.linalg.norm(k[b])
        assert err < (1e-7 if value_dtype == jnp.float32 else 0.6), (kind, err)


def test_new_cache_rejects_bad_sizes_and_fixed_kind_dtypes():
    with pytest.raises(ValueError, match="batch=0 and max_len=4 must both be positive"):
        new_cache("dense", CFG, 0, 4)
    with pytest.raises(ValueError, match="applies to the 'dense' cache kind only, not 'float32'"):
        new_cache("float32", CFG, 1, 4, "bfloat16")
    rotation = lambda seed: new_cache("turbo2", CFG, 1, 4, seed=seed).layers[0].k.codecs[0].rotation  # noqa: E731
    assert not np.array_equal(rotation(1), rotation(2))  # the seed draws the rotations
    np.testing.assert_array_equal(rotation(1), rotation(1))


# ---------------------------------------------------------------------------------------------------------
# generate with options against a reference of the sampling rules


def reference(params, prompts, n, options: DecodeOptions):
    """The rules `generate` follows, one full forward per token (no cache, no sliding: contexts fit the
    block): empty prompts start from bos (default eos); one key split per token, top-k then top-p; rows that
    emitted eos emit pad (default eos)."""
    o = options
    bos = o.eos_id if o.bos_id is None else o.bos_id
    pad = o.pad_id if o.pad_id is not None else (o.eos_id if o.eos_id is not None else 0)
    contexts = [list(p) or [bos] for p in prompts]
    key = jax.random.PRNGKey(0 if o.seed is None else o.seed)
    done = np.zeros(len(prompts), bool)
    toks, lengths = [], np.zeros(len(prompts), int)
    for _ in range(n):
        logits = np.stack([np.asarray(GPT(CFG).apply({"params": params}, jnp.asarray([c])))[0, -1]
                           for c in contexts])  # [B, V]
        key, sub = jax.random.split(key)
        if o.greedy:
            tok = logits.argmax(-1)
        else:
            tok = np.asarray(G.sample_logits(sub, jnp.asarray(logits), o.temperature, o.top_k, o.top_p))
        tok = np.where(done, pad, tok)
        lengths += ~done
        done |= tok == (-1 if o.eos_id is None else o.eos_id)
        for c, t in zip(contexts, tok):
            c.append(int(t))
        toks.append(tok)
    return np.stack(toks, 1), lengths


@pytest.mark.parametrize("options", [
    DecodeOptions(temperature=0),
    DecodeOptions(temperature=0.9, top_k=20, top_p=0.9, seed=11),
    DecodeOptions(temperature=1.3, top_p=0.8, seed=4, eos_id=7, pad_id=1),
    DecodeOptions(temperature=0.7, top_k=5, seed=2, eos_id=30, bos_id=50),
], ids=["greedy", "top_k_top_p", "eos_pad", "bos"])
def test_generate_with_options_equals_the_reference(options):
    params = random_params(CFG, 8, std=0.3)
    prompts = PROMPTS + [[]] if options.bos_id is not None else PROMPTS
    n = 8
    want, lengths = reference(params, prompts, n, options)
    out = G.generate(params, CFG, prompts, n, options)
    np.testing.assert_array_equal(out.tokens, want)
    np.testing.assert_array_equal(out.lengths, lengths)
    assert len({tuple(r) for r in want.tolist()}) > 1  # rows differ, so the check is not vacuous
    streamed = np.concatenate([c.tokens for c in G.stream(params, CFG, prompts, n, options, chunk_size=3)], axis=1)
    np.testing.assert_array_equal(streamed, want[:, :streamed.shape[1]])  # (it may stop once every row is done)


def test_options_checked_against_the_model_when_decoding():
    params = random_params(CFG, 9)
    gen = lambda **kw: G.generate(params, CFG, [[1, 2]], 3, DecodeOptions(**kw))  # noqa: E731
    with pytest.raises(ValueError, match=r"eos_id=97 is outside the vocabulary \[0, 97\)"):
        gen(temperature=0, eos_id=97)
    with pytest.raises(ValueError, match=r"bos_id=200 is outside the vocabulary"):
        gen(temperature=0, bos_id=200)
    with pytest.raises(ValueError, match=r"window=32 is not valid; use an integer in \[0, block_size - 1 = 31\]"):
        gen(temperature=0, window=32)
    with pytest.raises(ValueError, match=r"needs a seed: pass DecodeOptions\(seed=<int>"):
        gen(temperature=0.5)
    with pytest.raises(TypeError, match="options must be a DecodeOptions, not dict"):
        G.generate(params, CFG, [[1, 2]], 3, dict(temperature=0))


def test_sample_text_stops_at_the_tokenizers_eos_unless_options_name_one():
    params = random_params(CFG, 10, std=0.3)
    options = DecodeOptions(temperature=0.8, top_k=30, seed=5)
    free = np.asarray(G.generate(params, CFG, [[3, 4]], 12, options).tokens[0]).tolist()
    eot = free[4]

    class Tok:
        eot_id = eot

        def decode(self, ids):
            return ",".join(map(str, ids))

    text = G.sample_text(params, CFG, Tok(), [3, 4], 12, options)
    assert text == ",".join(map(str, free[:free.index(eot)]))
    other = next(t for t in range(CFG.vocab_size) if t not in free)  # never emitted: the text runs to the end
    assert G.sample_text(params, CFG, Tok(), [3, 4], 12, options.replace(eos_id=other)) == ",".join(map(str, free))
