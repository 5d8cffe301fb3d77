"""Decoding: sampling filters against transformers' warpers, cached decoding against full forward passes and
the uncached reference, ragged batches, eos, streaming, bad input, and greedy parity with transformers."""

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_params as shared_random_params

from jaxgpt.decode import generation as G
from jaxgpt.decode.options import DecodeOptions
from jaxgpt.nn.config import GPTConfig
from jaxgpt.nn.model import GPT

PROMPTS = [[5, 17, 3], [40, 2, 9, 66, 1, 12, 30], [88]]  # ragged: 3, 7 and 1 tokens
N = 9  # new tokens; 7 + 9 - 1 = 15 fed tokens fit block_size 16 (past it: tests/test_generate_window.py)

# Every position kind x both norm placements, with the other switches varied along the way.
SWEEP = [
    dict(pos_embedding="learned", norm_position="pre"),
    dict(pos_embedding="learned", norm_position="post", norm="rmsnorm"),
    dict(pos_embedding="sinusoidal", norm_position="pre", tie_embeddings=False, block_size=16),
    dict(pos_embedding="sinusoidal", norm_position="post", block_size=16),
    dict(pos_embedding="rope", norm_position="pre", norm="rmsnorm", bias=False, block_size=16),
    dict(pos_embedding="rope", norm_position="post", attention="manual", block_size=16),
    dict(pos_embedding="none", norm_position="pre", block_size=16),
    dict(pos_embedding="none", norm_position="post", norm="rmsnorm", tie_embeddings=False, block_size=16),
]


def random_params(cfg: GPTConfig, seed: int):
    """Fresh random weights of the model's shapes (weights N(0, 0.2), norm scales 1 + N(0, 0.2)), no compile."""
    return shared_random_params(cfg, seed, std=0.2)


@pytest.fixture(scope="module")
def base():
    cfg = GPTConfig.preset("tiny")
    return cfg, random_params(cfg, 0)


def greedy(params, cfg, prompts, n=N, prompt_lengths=None, **options):
    """Greedy generate with logits: the calls below share shapes, so they share one compile."""
    return G.generate(params, cfg, prompts, n, DecodeOptions(temperature=0, **options), prompt_lengths=prompt_lengths,
                      return_logits=True)


SAMPLING = dict(temperature=0.9, top_k=20, top_p=0.9)


def _pad(rows: list[list[int]]) -> np.ndarray:
    out = np.zeros((len(rows), max(map(len, rows))), np.int32)
    for b, r in enumerate(rows):
        out[b, :len(r)] = r
    return out


def _full_forward(cfg, params, rows):
    """Logits of a plain causal forward (no cache) over right-padded rows -> [B, L, V]."""
    return np.asarray(jax.jit(lambda p, t: GPT(cfg).apply({"params": p}, t))(params, _pad(rows)))


# ---------------------------------------------------------------------------------------------------------
# Sampling filters


class SamplingTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_filters_match_transformers_warpers(self):
        torch = pytest.importorskip("torch")
        from transformers.generation.logits_process import (
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        logits = np.random.default_rng(0).normal(size=(6, 50)).astype(np.float32) * 3
        top_k = self.variant(G.top_k_mask, static_argnums=1)
        top_p = self.variant(G.top_p_mask)
        for k in (1, 5, 49):
            want = TopKLogitsWarper(k)(None, torch.from_numpy(logits)).numpy()
            np.testing.assert_array_equal(np.asarray(top_k(logits, k)), want)
        for p in (0.1, 0.5, 0.9, 0.99):
            want = TopPLogitsWarper(p)(None, torch.from_numpy(logits)).numpy()
            np.testing.assert_array_equal(np.asarray(top_p(logits, p)), want)

    @chex.variants(with_jit=True, without_jit=True)
    def test_greedy_is_argmax(self):
        logits = np.random.default_rng(1).normal(size=(5, 30)).astype(np.float32)
        sample = self.variant(lambda r, x: G.sample_logits(r, x, 0.0, top_k=3, top_p=0.5))
        np.testing.assert_array_equal(sample(jax.random.PRNGKey(0), logits), logits.argmax(-1))


# Probabilities at shuffled token ids; the allowed sets follow from the cumulative mass 0.40, 0.65, 0.80, ...
PROBS = np.array([0.40, 0.25, 0.15, 0.08, 0.05, 0.03, 0.02, 0.01, 0.005, 0.005])
ORDER = np.random.default_rng(3).permutation(10)  # ORDER[i] is the token id holding PROBS[i]


@pytest.mark.parametrize("top_k,top_p,n_allowed", [(3, None, 3), (None, 0.6, 2), (None, 0.7, 3),
                                                   (5, 0.6, 2), (2, 0.9, 2), (None, 0.85, 4), (1, None, 1)])
def test_filters_never_emit_outside_allowed_set(top_k, top_p, n_allowed):
    logits = np.empty(10, np.float32)
    logits[ORDER] = np.log(PROBS)
    draws = np.asarray(jax.jit(G.sample_logits, static_argnums=3)(
        jax.random.PRNGKey(7), np.tile(logits, (4000, 1)), 1.0, top_k, top_p))
    allowed = ORDER[:n_allowed]
    assert set(draws.tolist()) == set(allowed.tolist())  # nothing outside, and every allowed token occurs
    want = PROBS[:n_allowed] / PROBS[:n_allowed].sum()
    got = np.array([(draws == t).mean() for t in allowed])
    np.testing.assert_allclose(got, want, atol=0.03)


def test_temperature_scales_the_distribution():
    logits = np.random.default_rng(4).normal(size=8).astype(np.float32)
    for temperature in (0.5, 2.0):
        draws = np.asarray(G.sample_logits(jax.random.PRNGKey(1), np.tile(logits, (5000, 1)), temperature))
        want = np.exp(logits.astype(np.float64) / temperature)
        np.testing.assert_allclose(np.bincount(draws, minlength=8) / 5000, want / want.sum(), atol=0.025)


# ---------------------------------------------------------------------------------------------------------
# Cached decoding against full forward passes and the uncached reference


@pytest.mark.parametrize("overrides", SWEEP, ids=lambda d: "-".join(str(v) for v in d.values()))
def test_cached_logits_equal_full_forward(overrides):
    cfg = GPTConfig.preset("tiny", **overrides)
    params = random_params(cfg, 1)
    out = greedy(params, cfg, PROMPTS)
    chex.assert_shape(out.tokens, (3, N))
    chex.assert_shape(out.logits, (3, N, cfg.vocab_size))
    np.testing.assert_array_equal(out.lengths, [N] * 3)
    np.testing.assert_array_equal(out.tokens, np.asarray(out.logits).argmax(-1))
    rows = [p + np.asarray(out.tokens[b, :-1]).tolist() for b, p in enumerate(PROMPTS)]
    full = _full_forward(cfg, params, rows)
    for b, p in enumerate(PROMPTS):  # logits that produced token i sit at position len(p) - 1 + i
        np.testing.assert_allclose(out.logits[b], full[b, len(p) - 1:len(p) - 1 + N], atol=1e-5, rtol=0)


def test_cached_equals_uncached_on_ragged_batch(base):
    cfg, params = base
    free = greedy(params, cfg, PROMPTS)
    eos = int(free.tokens[0, 2])  # a token row 0 emits, so at least one row stops early
    cached = greedy(params, cfg, PROMPTS, eos_id=eos)
    ref = G.generate_uncached(params, cfg, PROMPTS, N, DecodeOptions(temperature=0, eos_id=eos), bucket=8,
                              return_logits=True)
    np.testing.assert_array_equal(cached.tokens, ref.tokens)
    np.testing.assert_array_equal(cached.lengths, ref.lengths)
    assert int(cached.lengths[0]) <= 3
    np.testing.assert_allclose(cached.logits, ref.logits, atol=1e-5, rtol=0)
    # sampling draws the same random numbers on both paths
    opts = DecodeOptions(seed=11, eos_id=eos, **SAMPLING)
    np.testing.assert_array_equal(G.generate(params, cfg, PROMPTS, N, opts).tokens,
                                  G.generate_uncached(params, cfg, PROMPTS, N, opts, bucket=8).tokens)


def test_padding_rows_never_change_other_rows(base):
    cfg, params = base
    alone = greedy(params, cfg, PROMPTS[:1])
    batched = greedy(params, cfg, PROMPTS)
    np.testing.assert_array_equal(alone.tokens[0], batched.tokens[0])
    np.testing.assert_allclose(alone.logits[0], batched.logits[0], atol=1e-5, rtol=0)
    # different content in the other rows (and in the padding slots) changes nothing in row 0
    others = [PROMPTS[0], [1] * 7, [96, 95]]
    arr = _pad(others)
    arr[0, 3:] = 77  # junk past row 0's length
    junk = greedy(params, cfg, arr, prompt_lengths=[3, 7, 2])
    np.testing.assert_array_equal(junk.tokens[0], batched.tokens[0])
    np.testing.assert_allclose(junk.logits[0], batched.logits[0], atol=1e-5, rtol=0)


def test_eos_stops_rows_and_pads_the_rest(base):
    cfg, params = base
    free = np.asarray(greedy(params, cfg, PROMPTS).tokens)
    eos = int(free[1, 3])
    out = greedy(params, cfg, PROMPTS, eos_id=eos, pad_id=0)
    for b in range(3):
        hits = np.flatnonzero(free[b] == eos)
        n = int(hits[0]) + 1 if hits.size else N
        assert int(out.lengths[b]) == n
        np.testing.assert_array_equal(out.tokens[b, :n], free[b, :n])
        np.testing.assert_array_equal(out.tokens[b, n:], 0)


def test_stream_chunks_equal_generate_and_seed_determinism(base):
    cfg, params = base
    opts = DecodeOptions(seed=5, **SAMPLING)
    whole = G.generate(params, cfg, PROMPTS, N, opts)
    chunks = list(G.stream(params, cfg, PROMPTS, N, opts, chunk_size=4))
    assert [c.tokens.shape[1] for c in chunks] == [1, 4, 4]
    np.testing.assert_array_equal(np.concatenate([c.tokens for c in chunks], axis=1), whole.tokens)
    np.testing.assert_array_equal(sum(c.lengths for c in chunks), whole.lengths)
    np.testing.assert_array_equal(G.generate(params, cfg, PROMPTS, N, opts).tokens, whole.tokens)
    other = G.generate(params, cfg, PROMPTS, N, opts.replace(seed=6))
    assert not np.array_equal(other.tokens, whole.tokens)


def test_array_prompt_with_lengths_equals_ragged_list(base):
    cfg, params = base
    a = greedy(params, cfg, PROMPTS)
    b = greedy(params, cfg, jnp.asarray(_pad(PROMPTS)), prompt_lengths=np.array([3, 7, 1]))
    c = greedy(params, cfg, [np.array(PROMPTS[0]), jnp.array(PROMPTS[1]), PROMPTS[2]])
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.tokens, c.tokens)


def test_empty_prompt_starts_from_eos_and_single_new_token(base):
    cfg, params = base
    eos = 96
    empty = greedy(params, cfg, [[]], 1, eos_id=eos)
    start = greedy(params, cfg, [[eos]], 1, eos_id=eos)
    chex.assert_shape(empty.tokens, (1, 1))
    np.testing.assert_array_equal(empty.logits, start.logits)
    np.testing.assert_allclose(empty.logits[:, 0], _full_forward(cfg, params, [[eos]])[:, 0], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="row 0 is empty"):
        G.generate(params, cfg, [[]], 4, DecodeOptions(temperature=0))


@flax.struct.dataclass
class SplitKernel:
    """A stand-in for a quantized weight: a non-array leaf that brings its own matmul."""

    a: jax.Array
    b: jax.Array

    def matmul(self, x, dtype):
        return jnp.dot(x.astype(dtype), (self.a + self.b).astype(dtype))


def test_params_with_non_array_leaves(base):
    cfg, params = base
    w = params["h_0"]["mlp"]["c_fc"]["kernel"]
    half = w * 0.5
    split = jax.tree.map(lambda x: x, params)
    split["h_0"]["mlp"]["c_fc"]["kernel"] = SplitKernel(half, w - half)
    dense = greedy(params, cfg, PROMPTS)
    got = greedy(split, cfg, PROMPTS)
    np.testing.assert_allclose(got.logits, dense.logits, atol=1e-5, rtol=0)


def test_compressed_cache_plugs_in(base):
    """An int8 cache (jaxgpt.decode.kv_compress) flows through prefill and scan; its logits stay near the dense ones."""
    cfg, params = base
    dense = greedy(params, cfg, PROMPTS)
    int8 = greedy(params, cfg, PROMPTS, cache_kind="int8")
    assert not np.array_equal(int8.logits, dense.logits)  # the int8 entries were really used
    np.testing.assert_allclose(int8.logits, dense.logits, atol=0.03, rtol=0)  # absmax/127 per vector


def test_bad_input_errors(base):
    cfg, params = base  # learned positions, block_size 32, vocab 97
    def gen(prompts, n=4, prompt_lengths=None, **options):
        return G.generate(params, cfg, prompts, n, DecodeOptions(**{"temperature": 0, **options}),
                          prompt_lengths=prompt_lengths)

    for window in (32, -1, 2.0, True):
        with pytest.raises(ValueError, match=r"window=.* is not valid; use an integer in \[0, block_size - 1 = 31\]"):
            gen([[1] * 30], 5, window=window)
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 97\)"):
        gen([[1, 97]])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        gen([[3], [-1, 2]])
    with pytest.raises(ValueError, match="needs a seed"):
        gen([[1]], temperature=1.0)
    for kw, what in ((dict(temperature=-1.0), "temperature"), (dict(temperature=1.0, seed=0, top_k=0), "top_k"),
                     (dict(temperature=1.0, seed=0, top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
                     (dict(eos_id=97), "eos_id"), (dict(pad_id=-2), "pad_id")):
        with pytest.raises(ValueError, match=what):
            gen([[1]], **kw)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        gen([[1]], 0)
    with pytest.raises(ValueError, match=r"wrap a single prompt as \[ids\]"):
        gen([1, 2, 3])
    with pytest.raises(ValueError, match="list of token-id lists"):
        gen(["hello"])
    with pytest.raises(ValueError, match="not integer token ids"):
        gen([[1.0, 2.0]])
    with pytest.raises(ValueError, match="shape"):
        gen(np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match="prompt_lengths"):
        gen(np.ones((2, 3), np.int32), prompt_lengths=[1, 4])
    with pytest.raises(ValueError, match="prompt_tokens is empty"):
        gen([])
    with pytest.raises(ValueError, match="unknown KV-cache kind 'int3'"):
        gen([[1]], cache_kind="int3")
    with pytest.raises(ValueError, match="chunk_size"):
        next(G.stream(params, cfg, [[1]], 4, DecodeOptions(temperature=0), chunk_size=0))
    with pytest.raises(ValueError, match="bucket"):
        G.generate_uncached(params, cfg, [[1]], 4, DecodeOptions(temperature=0), bucket=0)


# ---------------------------------------------------------------------------------------------------------
# Independent reference: transformers' GPT-2 greedy generate on the same weights


def test_greedy_matches_transformers_on_ragged_batch(base, tmp_path):
    """transformers left-pads with an attention mask; we right-pad with per-row positions: same tokens."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from jaxgpt.io.hf import export_hf_gpt2

    cfg, params = base
    export_hf_gpt2(cfg, params, tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    T = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in PROMPTS])
    with torch.no_grad():
        theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=N, min_new_tokens=N, do_sample=False,
                             use_cache=True, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    ours = greedy(params, cfg, PROMPTS)
    np.testing.assert_array_equal(ours.tokens, theirs.sequences[:, T:].numpy())
    np.testing.assert_allclose(ours.logits, torch.stack(theirs.logits, 1).numpy(), atol=1e-4, rtol=0)
