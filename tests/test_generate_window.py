"""Decoding past the context window: `generate` and `stream` against a reference of the
sliding-window rule written here (one full forward per token over each row's context), and against
nanoGPT's crop-to-block_size loop when window = block_size - 1."""

import chex
import jax
import numpy as np
import pytest
from helpers import random_params as shared_random_params

from jaxgpt.decode import generation as G
from jaxgpt.decode.options import DecodeOptions
from jaxgpt.nn.config import GPTConfig
from jaxgpt.nn.model import GPT

BLOCK = 8
# ragged; the second row is longer than the block and keeps its last 8 tokens
PROMPTS = [[5, 17, 3], [40, 2, 9, 66, 1, 12, 30, 7, 21, 50], [88]]
N = 21  # the 1-token row fills its 8 slots at token 7, then (window 4) refills at tokens 11, 15 and 19


def random_params(cfg: GPTConfig, seed: int):
    """Fresh random weights of the model's shapes (weights N(0, 0.2), norm scales 1 + N(0, 0.2)), no compile."""
    return shared_random_params(cfg, seed, std=0.2)


def config(pos: str) -> GPTConfig:
    return GPTConfig.preset("tiny", pos_embedding=pos, block_size=BLOCK, n_layer=1, tie_embeddings=False)


def forward_last(cfg, params, contexts):
    """Logits [B, V] at the last token of each context (a list of <= BLOCK ids), by one plain causal forward
    over the contexts right-padded to BLOCK (the padding sits after every query that is read)."""
    buf = np.zeros((len(contexts), BLOCK), np.int32)
    for b, c in enumerate(contexts):
        buf[b, :len(c)] = c
    logits = _forward(params, buf, cfg=cfg)  # [B, BLOCK, V]
    return np.asarray(logits)[np.arange(len(contexts)), [len(c) - 1 for c in contexts]]


_forward = jax.jit(lambda params, tokens, cfg: GPT(cfg).apply({"params": params}, tokens), static_argnames="cfg")
_sample = jax.jit(G.sample_logits, static_argnames="top_k")


def reference(cfg, params, prompts, n, window, rng=None, eos=None, pad=None, **sampling):
    """The rule: a context holds at most BLOCK tokens; to append a token to a full one, keep its last `window`
    tokens first. Rows that emitted eos emit pad. Random numbers drawn as `generate` draws them (one split per
    token, one categorical draw over the batch). -> (tokens [B, n], lengths [B], logits [B, n, V])."""
    contexts = [list(p)[-BLOCK:] for p in prompts]
    pad = eos if pad is None else pad
    done = np.zeros(len(prompts), bool)
    key = jax.random.PRNGKey(0 if rng is None else rng)
    toks, logits_all, lengths = [], [], np.zeros(len(prompts), int)
    for _ in range(n):
        logits = forward_last(cfg, params, contexts)
        key, sub = jax.random.split(key)
        tok = np.asarray(_sample(sub, logits, **sampling)) if sampling else logits.argmax(-1)
        tok = np.where(done, pad, tok)
        lengths += ~done
        done |= tok == eos
        for c, t in zip(contexts, tok):
            if len(c) == BLOCK:
                del c[:BLOCK - window]
            c.append(int(t))
        toks.append(tok)
        logits_all.append(logits)
    return np.stack(toks, 1), lengths, np.stack(logits_all, 1)


@pytest.mark.parametrize("pos,seed", [("learned", 2), ("sinusoidal", 2), ("rope", 2), ("none", 1)])
def test_greedy_equals_reference_across_refills(pos, seed):
    cfg = config(pos)
    params = random_params(cfg, seed)  # seeds whose greedy runs have an eos that fits the check below
    free = reference(cfg, params, PROMPTS, N, BLOCK // 2)[0]
    first = {int(t): min(int(np.argmax(r == t)) if (r == t).any() else N for r in free) for t in free[2]}
    eos = max(first, key=first.get)  # the token of row 2 that any row emits last
    assert 8 < first[eos] < N - 1  # so a row stops after a refill, and rows keep going after it stopped
    out = G.generate(params, cfg, PROMPTS, N, DecodeOptions(temperature=0, eos_id=eos, pad_id=0), return_logits=True)
    toks, lengths, logits = reference(cfg, params, PROMPTS, N, BLOCK // 2, eos=eos, pad=0)
    np.testing.assert_array_equal(out.tokens, toks)
    np.testing.assert_array_equal(out.lengths, lengths)
    for b in range(len(PROMPTS)):  # logits of the valid tokens (done rows' later logits are not defined)
        chex.assert_trees_all_close(out.logits[b, :lengths[b]], logits[b, :lengths[b]], atol=1e-5, rtol=0)


def test_grouped_query_model_slides_its_window_like_the_reference():
    """A cache of n_kv_head = 1 heads (multi-query) with QK-norm, refilled past the block like any other."""
    cfg = GPTConfig.preset("tiny", pos_embedding="rope", block_size=BLOCK, n_layer=1, n_head=4, n_embd=32,
                           n_kv_head=1, qk_norm=True, mlp="swiglu", tie_embeddings=False)
    params = random_params(cfg, 3)
    out = G.generate(params, cfg, PROMPTS, N, DecodeOptions(temperature=0), return_logits=True)
    toks, _, logits = reference(cfg, params, PROMPTS, N, BLOCK // 2)
    np.testing.assert_array_equal(out.tokens, toks)
    chex.assert_trees_all_close(out.logits, logits, atol=1e-5, rtol=0)
    assert len(set(np.asarray(toks).ravel().tolist())) > 3  # not one repeated token


def test_window_block_minus_one_is_nanogpt_crop():
    """nanoGPT: idx_cond = idx[:, -block_size:]; logits = model(idx_cond)[:, -1, :]; append argmax."""
    cfg = config("learned")
    params = random_params(cfg, 2)
    prompt = PROMPTS[1]  # longer than the block
    idx = list(prompt)
    for _ in range(N):
        idx.append(int(forward_last(cfg, params, [idx[-BLOCK:]])[0].argmax()))
    out = G.generate(params, cfg, [prompt], N, DecodeOptions(temperature=0, window=BLOCK - 1))
    assert np.asarray(out.tokens[0]).tolist() == idx[len(prompt):]
    assert len(set(idx[len(prompt):])) > 1  # not one repeated token

    class Tok:  # what sample_text needs of a tokenizer
        eot_id = None

        def decode(self, ids):
            return ",".join(map(str, ids))

    text = G.sample_text(params, cfg, Tok(), prompt, N, DecodeOptions(temperature=0, window=BLOCK - 1))
    assert text == ",".join(map(str, idx[len(prompt):]))


def test_sampling_stream_equals_reference():
    """Sampling through `stream` (prefill, then chunks that carry the context; `generate` runs the same
    prefill and steps in one jit, checked greedily above)."""
    cfg = config("rope")
    params = random_params(cfg, 3)
    sampling = dict(temperature=0.9, top_k=30, top_p=0.95)
    window = 3
    toks, lengths, _ = reference(cfg, params, PROMPTS, N, window, rng=7, **sampling)
    run = lambda seed: list(G.stream(params, cfg, PROMPTS, N, DecodeOptions(seed=seed, window=window,  # noqa: E731
                                                                          **sampling), chunk_size=5))
    chunks = run(7)
    assert [c.tokens.shape[1] for c in chunks] == [1, 5, 5, 5, 5]
    np.testing.assert_array_equal(np.concatenate([c.tokens for c in chunks], axis=1), toks)
    np.testing.assert_array_equal(sum(np.asarray(c.lengths) for c in chunks), lengths)
    other = np.concatenate([c.tokens for c in run(8)], axis=1)
    assert not np.array_equal(other, toks)  # the seed matters, so equality above is not vacuous


def test_compressed_cache_slides_too():
    """The refill writes a compressed cache at start 0 too: int8 logits stay near the dense ones."""
    cfg = config("learned")
    params = random_params(cfg, 1)
    dense = G.generate(params, cfg, PROMPTS, N, DecodeOptions(temperature=0), return_logits=True)
    int8 = G.generate(params, cfg, PROMPTS, N, DecodeOptions(temperature=0, cache_kind="int8"), return_logits=True)
    agree = np.all(np.asarray(int8.tokens) == np.asarray(dense.tokens), axis=0)  # [N]
    same = N if agree.all() else int(np.argmin(agree))  # tokens before the first difference
    assert same > 4  # row 1 (a full block from the start) refilled at every one of these tokens
    a, d = np.asarray(int8.logits[:, :same]), np.asarray(dense.logits[:, :same])
    assert not np.array_equal(a, d)  # the int8 entries were really read
    assert np.linalg.norm(a - d) < 0.02 * np.linalg.norm(d - d.mean(-1, keepdims=True))
