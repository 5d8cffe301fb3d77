"""Log-likelihood of continuations given contexts: the engine under HellaSwag, lm-eval and perplexity.

A request is (context tokens, continuation tokens); its score is the sum over the continuation of
log p(token | everything before it), and whether every continuation token is the argmax (lm-eval's
`is_greedy`). Requests that share a context (the 4 endings of a HellaSwag example, the choices of a
multiple-choice question) run the context once:

    context pass       ctx[:-1]                  -> KV cache only (its logits are unused, so jit drops the head)
    continuation pass  [ctx[-1]] + cont[:-1]     -> logits at every fed position, each row on its group's cache

so the blocks see each context once and the vocabulary head runs only where a continuation token is
predicted. The last continuation token is never fed. A pair longer than the model's window keeps the last
block_size + 1 tokens of ctx + cont (lm-eval's left truncation: the final token is only a target).

Batches are sorted longest first and padded to a few bucketed shapes, so a whole evaluation compiles a
handful of times. Padding is invisible: padded keys sit after every real query's position (causal mask)
and padded targets are masked out of the sums.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxgpt.decode.kv_cache import init_cache
from jaxgpt.nn.config import GPTConfig
from jaxgpt.nn.model import GPT
from jaxgpt.sharding import gather_to_host


class Scores(NamedTuple):
    """Per request: logprob [N] float64 (sum over the continuation), greedy [N] bool, n_tokens [N] int,
    truncated [N] bool (the context lost tokens on the left to fit the window)."""

    logprob: np.ndarray
    greedy: np.ndarray
    n_tokens: np.ndarray
    truncated: np.ndarray


def window(model_cfg: GPTConfig) -> int:
    """Tokens the model reads at once: its block size."""
    return model_cfg.block_size


def _round_up(n: int, q: int) -> int:
    return -(-n // q) * q


def _bucket(n: int, cap: int) -> int:
    """Padded length for n (few distinct shapes, few compiles): 16, 32, then multiples of 32; at most cap."""
    return max(1, min(16 if n <= 16 else _round_up(n, 32), cap))


@partial(jax.jit, static_argnames=("model_cfg",))
def _score_batch(params: Any, ctx: jax.Array, group: jax.Array, starts: jax.Array, inputs: jax.Array,
                 targets: jax.Array, mask: jax.Array, *, model_cfg: GPTConfig) -> tuple[jax.Array, jax.Array]:
    """Sum of target log-probs [B] and all-greedy [B] for B continuation rows over G shared contexts.

    ctx [G, Tc] (contexts minus their last token, right-padded); group [B] the context of each row;
    starts [B] its context length minus one (where the row's first fed token sits);
    inputs / targets / mask [B, Tn].
    """
    model = GPT(model_cfg)
    (G, Tc), (_, Tn) = ctx.shape, inputs.shape
    cache = init_cache(model_cfg, G, Tc + Tn, jnp.dtype(model_cfg.compute_dtype))
    if Tc:
        _, cache = model.apply({"params": params}, ctx, cache=cache)  # logits unused: no head
    layers = jax.tree.map(lambda x: jnp.take(x, group, axis=0), cache.layers)  # [B, S, H, D] leaves
    cache = cache.replace(layers=layers, lengths=starts)
    # padded tail positions are clipped into the position table; their outputs are masked out below
    positions = jnp.minimum(starts[:, None] + jnp.arange(Tn)[None, :], model_cfg.block_size - 1)  # [B, Tn]
    logits, _ = model.apply({"params": params}, inputs, positions=positions, cache=cache)  # [B, Tn, V]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [B, Tn]
    logp = target_logit - jax.nn.logsumexp(logits, axis=-1)  # [B, Tn]
    greedy = (jnp.argmax(logits, axis=-1) == targets) | ~mask
    return jnp.sum(jnp.where(mask, logp, 0.0), axis=-1), jnp.all(greedy, axis=-1)


def _check(model_cfg: GPTConfig, requests: Sequence[tuple[Sequence[int], Sequence[int]]]) -> None:
    V, W = model_cfg.vocab_size, window(model_cfg)
    for i, (ctx, cont) in enumerate(requests):
        if len(ctx) == 0 or len(cont) == 0:
            raise ValueError(f"request {i} has an empty {'context' if len(ctx) == 0 else 'continuation'}; "
                             "start the context with <|endoftext|> and score at least one token")
        if len(cont) > W:
            raise ValueError(f"request {i}: continuation of {len(cont)} tokens exceeds the model's window of {W}; "
                             "score it in windows (loglikelihood_rolling / perplexity)")
        ids = np.concatenate([np.asarray(ctx), np.asarray(cont)])
        if not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 or ids.max() >= V:
            raise ValueError(f"request {i} holds token ids outside the vocabulary [0, {V}); encode the text with "
                             "the model's tokenizer")


def _groups(model_cfg: GPTConfig, requests, batch_size: int) -> tuple[list[tuple[tuple, list[int]]], np.ndarray]:
    """Truncate, group by (truncated) context, split groups to fit a batch, sort longest first."""
    W = window(model_cfg)
    truncated = np.zeros(len(requests), bool)
    by_ctx: dict[tuple, list[int]] = {}
    for i, (ctx, cont) in enumerate(requests):
        keep = W + 1 - len(cont)
        truncated[i] = len(ctx) > keep
        by_ctx.setdefault(tuple(int(t) for t in ctx[-keep:]), []).append(i)
    groups = [(ctx, idx[j:j + batch_size]) for ctx, idx in by_ctx.items() for j in range(0, len(idx), batch_size)]
    groups.sort(key=lambda g: -(len(g[0]) + max(len(requests[i][1]) for i in g[1])))  # stable: ties keep order
    return groups, truncated


def _batches(groups: list, batch_size: int):
    """Consecutive groups whose rows fit batch_size."""
    batch, rows = [], 0
    for g in groups:
        if batch and rows + len(g[1]) > batch_size:
            yield batch
            batch, rows = [], 0
        batch.append(g)
        rows += len(g[1])
    if batch:
        yield batch


def _arrays(model_cfg: GPTConfig, batch: list, requests, batch_size: int) -> tuple[list[int], dict[str, np.ndarray]]:
    """One batch of groups -> (request ids per row, padded arrays for _score_batch)."""
    W = window(model_cfg)
    rows = [(gi, i) for gi, (_, idx) in enumerate(batch) for i in idx]
    G = min(batch_size, 1 << (len(batch) - 1).bit_length())  # contexts: a power of two
    Tc = max(len(ctx) - 1 for ctx, _ in batch)
    Tc = _bucket(Tc, W) if Tc else 0
    Tn = _bucket(max(len(requests[i][1]) for _, i in rows), W)
    a = dict(ctx=np.zeros((G, Tc), np.int32), group=np.zeros(batch_size, np.int32),
             starts=np.zeros(batch_size, np.int32), inputs=np.zeros((batch_size, Tn), np.int32),
             targets=np.zeros((batch_size, Tn), np.int32), mask=np.zeros((batch_size, Tn), bool))
    for gi, (ctx, _) in enumerate(batch):
        a["ctx"][gi, :len(ctx) - 1] = ctx[:-1]
    for r, (gi, i) in enumerate(rows):
        ctx, cont = batch[gi][0], requests[i][1]
        n = len(cont)
        a["group"][r], a["starts"][r] = gi, len(ctx) - 1
        a["inputs"][r, :n] = (ctx[-1], *cont[:-1])
        a["targets"][r, :n], a["mask"][r, :n] = cont, True
    return [i for _, i in rows], a


def score(params: Any, model_cfg: GPTConfig, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *,
          batch_size: int = 32, progress: bool | str = False) -> Scores:
    """Score (context, continuation) token pairs; `batch_size` continuation rows per jitted call.

    `progress`: False, True, or a description for the tqdm bar (counts requests).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is not valid; use a positive integer")
    requests = [(list(ctx), list(cont)) for ctx, cont in requests]
    _check(model_cfg, requests)
    N = len(requests)
    logprob, greedy = np.zeros(N, np.float64), np.zeros(N, bool)
    groups, truncated = _groups(model_cfg, requests, batch_size)
    desc = progress if isinstance(progress, str) else "scoring"
    with tqdm(total=N, desc=desc, disable=not progress, unit="req") as bar:
        for batch in _batches(groups, batch_size):
            ids, a = _arrays(model_cfg, batch, requests, batch_size)
            lp, gr = gather_to_host(_score_batch(params, **a, model_cfg=model_cfg))  # [B] each, on every process
            logprob[ids], greedy[ids] = lp[:len(ids)], gr[:len(ids)]
            bar.update(len(ids))
    n_tokens = np.array([len(c) for _, c in requests], np.int64)
    return Scores(logprob, greedy, n_tokens, truncated)
