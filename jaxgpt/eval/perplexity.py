"""Perplexity of a token stream with the sliding window of Hugging Face's perplexity guide.

Windows of up to `max_length` tokens start every `stride` tokens; each window scores only the tokens the
previous window did not reach, with everything before them in the window as context: each token is
scored once, with at least max_length - stride tokens of context (except near the start). A window's first
token has no context and is skipped, so stride = max_length (disjoint windows, cheapest) drops one token
per window; smaller strides cost more and give lower, more faithful perplexity. The guide weighs each window's mean loss by its valid labels
minus one, one short when a window's first token is not a target; here each token counts once.

    perplexity(params, model_cfg, tokens, stride=512)   # {"ppl", "nll", "n_tokens", "windows"}
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from jaxgpt.eval.scoring import score, window
from jaxgpt.nn.config import GPTConfig


def windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, first target, end) of each window over n_tokens tokens, as the guide's loop walks them."""
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        out.append((begin, max(prev_end, begin + 1), end))
        prev_end = end
        if end == n_tokens:
            break
    return out


def perplexity(params: Any, model_cfg: GPTConfig, tokens: Sequence[int], *, stride: int | None = None,
               max_length: int | None = None, batch_size: int = 8, progress: bool = False) -> dict[str, Any]:
    """exp(mean NLL) of tokens[1:] under the sliding-window recipe; `batch_size` windows per jitted call.

    max_length defaults to the model's block size, stride to half of it.
    """
    W = window(model_cfg)
    max_length = W if max_length is None else max_length
    if isinstance(max_length, bool) or not isinstance(max_length, int) or not 2 <= max_length <= W:
        raise ValueError(f"max_length={max_length!r} is not valid; use an integer in [2, {W}] (the model's block)")
    stride = max(1, max_length // 2) if stride is None else stride
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= max_length:
        raise ValueError(f"stride={stride!r} is not valid; use an integer in [1, max_length={max_length}]")
    tokens = [int(t) for t in tokens]
    if len(tokens) < 2:
        raise ValueError(f"the text has {len(tokens)} token(s); perplexity needs at least 2")
    spans = windows(len(tokens), max_length, stride)
    requests = [(tokens[b:t], tokens[t:e]) for b, t, e in spans]
    s = score(params, model_cfg, requests, batch_size=batch_size, progress="perplexity" if progress else False)
    n = int(s.n_tokens.sum())
    nll = float(-s.logprob.sum() / n)
    return {"ppl": math.exp(nll), "nll": nll, "n_tokens": n, "windows": len(spans)}
