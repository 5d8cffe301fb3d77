"""Autoregressive decoding with the KV cache as explicit state: one prefill, then `lax.scan`.

Prompts of different lengths are right-padded into one [B, T] array. The prefill pass writes every prompt
position into the cache and computes logits only at each row's last prompt token; the cache then records
each row's true length, so row b's next token is written at position len_b and the causal mask (key j is
visible iff j <= the query's position) hides the padding slots until they are overwritten. No left padding,
no position shifts: every row sees exactly the positions it would see alone.

Past the context window (any position kind): a row's context holds at most block_size tokens (a longer
prompt keeps its last block_size). When the cache is full and a token must be fed, the row keeps the last
`window` tokens of its context, re-prefills them with the new token at positions 0..window, and goes on.
`window = block_size - 1` re-prefills every step: exactly nanoGPT's crop to the last block_size tokens.
The default, block_size // 2, re-prefills once every block_size // 2 tokens. Rows refill independently.

The decode loop carries (cache, last token, rng, done, and, when the window can slide, the token ids of the
context) through `lax.scan`; a refill is a `lax.cond` inside the step, so one program serves every step.
`generate` jits prefill + scan as one function (one compile per batch / prompt length / new-token count);
`stream` runs the same steps in chunks of a few tokens, carrying the state between calls, so text can be
shown as it is produced; `generate_uncached` re-runs the whole context for every token and is the
reference for tests and benchmarks. All three draw the same random numbers, so for a given seed they emit
the same tokens.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Iterator, NamedTuple, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxgpt.decode.kv_cache import KVCache, init_cache, write_rows
from jaxgpt.nn.config import GPTConfig
from jaxgpt.nn.model import GPT

# ---------------------------------------------------------------------------------------------------------
# Sampling: pure functions on logits [..., V]


def top_k_mask(logits: jax.Array, k: int) -> jax.Array:
    """Set every logit below the k-th largest to -inf (ties with the k-th are kept, as in transformers)."""
    kth = lax.top_k(logits, k)[0][..., -1:]  # [..., 1]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_mask(logits: jax.Array, p: float | jax.Array) -> jax.Array:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability sums to >= p.

    A token is kept when the probability of all tokens ranked above it is < p, so the most likely
    token always survives. p may be a traced scalar.
    """
    sorted_logits = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)  # [..., V] descending
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_above = jnp.cumsum(probs, axis=-1) - probs  # [..., V]
    keep = mass_above < p
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)  # [..., 1]
    return jnp.where(logits < threshold, -jnp.inf, logits)


def sample_logits(rng: jax.Array, logits: jax.Array, temperature: float | jax.Array = 1.0,
                  top_k: int | None = None, top_p: float | jax.Array | None = None) -> jax.Array:
    """One token per row from logits [B, V] -> [B] int32.

    A Python temperature of 0 is greedy (argmax; top-k / top-p cannot change it). Otherwise the logits are
    divided by the temperature, filtered by top-k then top-p (the order transformers uses), and sampled.
    """
    if isinstance(temperature, (int, float)) and temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        logits = top_k_mask(logits, top_k)
    if top_p is not None:
        logits = top_p_mask(logits, top_p)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@flax.struct.dataclass
class Sampler:
    """Sampling settings. Scalars are traced (changing them does not recompile); the flags are static."""

    temperature: jax.Array  # [] float32, unused when greedy
    top_p: jax.Array  # [] float32, unused unless use_top_p
    eos_id: jax.Array  # [] int32, -1 = never stop
    pad_id: jax.Array  # [] int32, emitted after a row's eos
    greedy: bool = flax.struct.field(pytree_node=False)
    top_k: int | None = flax.struct.field(pytree_node=False)
    use_top_p: bool = flax.struct.field(pytree_node=False)

    def sample(self, rng: jax.Array, logits: jax.Array) -> jax.Array:
        """logits [B, V] -> tokens [B] int32."""
        if self.greedy:
            return sample_logits(rng, logits, 0.0)
        return sample_logits(rng, logits, self.temperature, self.top_k, self.top_p if self.use_top_p else None)


def make_sampler(config: GPTConfig, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, eos_id: int | None = None, pad_id: int | None = None) -> Sampler:
    """Validate the sampling settings; greedy when temperature == 0 (top-k / top-p are then ignored)."""
    V = config.vocab_size
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature < np.inf:
        raise ValueError(f"temperature={temperature!r} is not valid; use 0 (greedy) or a positive number")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
            raise ValueError(f"top_k={top_k!r} is not valid; use a positive integer or None (no top-k)")
        top_k = int(top_k) if top_k < V else None  # keeping the whole vocabulary is no filter
    if top_p is not None:
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise ValueError(f"top_p={top_p!r} is not valid; use a value in (0, 1] or None (no top-p)")
    for name, tok in (("eos_id", eos_id), ("pad_id", pad_id)):
        if tok is not None and (isinstance(tok, bool) or not isinstance(tok, (int, np.integer)) or not 0 <= tok < V):
            raise ValueError(f"{name}={tok!r} is outside the vocabulary [0, {V}); pass a valid token id or None")
    if pad_id is None:
        pad_id = eos_id if eos_id is not None else 0
    greedy = temperature == 0
    return Sampler(
        temperature=jnp.float32(temperature), top_p=jnp.float32(1.0 if top_p is None else top_p),
        eos_id=jnp.int32(-1 if eos_id is None else eos_id), pad_id=jnp.int32(pad_id), greedy=greedy,
        top_k=None if greedy else top_k, use_top_p=not greedy and top_p is not None and top_p < 1.0)


# ---------------------------------------------------------------------------------------------------------
# Prompts


def prepare_prompts(config: GPTConfig, prompt_tokens: Any, max_new_tokens: int,
                    prompt_lengths: Any = None, bos_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Ragged prompts -> (tokens [B, T] int32 right-padded, lengths [B] int32), validated.

    `prompt_tokens` is a list of token-id lists, or a [B, T] array with optional `prompt_lengths` [B].
    An empty prompt starts from `bos_id` (GPT-2: <|endoftext|>); a prompt longer than block_size keeps its
    last block_size tokens.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is not valid; use a positive integer")
    if isinstance(prompt_tokens, (np.ndarray, jax.Array)) or prompt_lengths is not None:
        tokens = np.asarray(prompt_tokens)
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"prompt_tokens array has shape {tokens.shape} and dtype {tokens.dtype}; "
                             "pass integer token ids shaped [batch, length]")
        B, T = tokens.shape
        lengths = np.full((B,), T, np.int64) if prompt_lengths is None else np.asarray(prompt_lengths)
        if lengths.shape != (B,) or not np.issubdtype(lengths.dtype, np.integer):
            raise ValueError(f"prompt_lengths has shape {lengths.shape}; pass one integer per row, shape ({B},)")
        if (lengths < 0).any() or (lengths > T).any():
            raise ValueError(f"prompt_lengths {lengths.tolist()} must lie in [0, {T}] (the array's length)")
        rows = [tokens[b, :n].tolist() for b, n in enumerate(lengths)]
    else:
        if not isinstance(prompt_tokens, Sequence) or not all(
                isinstance(r, (Sequence, np.ndarray, jax.Array)) and not isinstance(r, str) for r in prompt_tokens):
            raise ValueError("prompt_tokens must be a list of token-id lists or a [batch, length] array; "
                             "wrap a single prompt as [ids]")
        rows = [np.asarray(r).tolist() if isinstance(r, (np.ndarray, jax.Array)) else list(r) for r in prompt_tokens]
    if not rows:
        raise ValueError("prompt_tokens is empty; pass at least one prompt (an empty prompt [] is fine)")
    V = config.vocab_size
    for b, row in enumerate(rows):
        bad = [t for t in row if isinstance(t, bool) or not isinstance(t, (int, np.integer))]
        if bad:
            raise ValueError(f"prompt row {b} holds {bad[:5]}, which are not integer token ids; encode the prompt "
                             "with the model's tokenizer")
        bad = [t for t in row if not 0 <= t < V]
        if bad:
            raise ValueError(f"prompt row {b} has token ids {bad[:5]} outside the vocabulary [0, {V}); "
                             "encode the prompt with the model's tokenizer")
        if not row:
            if bos_id is None:
                raise ValueError(f"prompt row {b} is empty and there is no start token; pass eos_id or bos_id "
                                 "(GPT-2: 50256, <|endoftext|>) or a non-empty prompt")
            row.append(int(bos_id))
    rows = [row[-config.block_size:] for row in rows]  # a context holds at most block_size tokens
    lengths = np.array([len(r) for r in rows], np.int32)
    T = int(lengths.max())
    tokens = np.zeros((len(rows), T), np.int32)
    for b, row in enumerate(rows):
        tokens[b, :len(row)] = row
    return tokens, lengths


# ---------------------------------------------------------------------------------------------------------
# Cached decoding


class Generation(NamedTuple):
    """tokens [B, N] int32 (after a row's eos: pad_id); lengths [B] valid tokens, eos included;
    logits [B, N, V] float32 of each emitted token (only with return_logits)."""

    tokens: jax.Array
    lengths: jax.Array
    logits: jax.Array | None = None


@flax.struct.dataclass
class DecodeState:
    """What the decode loop carries from one token to the next."""

    cache: KVCache
    last: jax.Array  # [B] int32 latest emitted token (fed next)
    rng: jax.Array  # PRNG key
    done: jax.Array  # [B] bool: the row has emitted eos
    count: jax.Array  # [B] int32 valid tokens emitted so far
    context: jax.Array | None = None  # [B, S] int32 token ids at the cache's positions (sliding window only)


def window_size(config: GPTConfig, window: int | None) -> int:
    """Tokens kept when a full context slides (default block_size // 2), validated."""
    if window is None:
        return config.block_size // 2
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or not 0 <= window < config.block_size:
        raise ValueError(f"window={window!r} is not valid; use an integer in [0, block_size - 1 = "
                         f"{config.block_size - 1}] (block_size - 1 re-prefills every token, as nanoGPT's crop)")
    return int(window)


def _sample_next(state: DecodeState, logits: jax.Array, sampler: Sampler) -> DecodeState:
    """Sample one token per row from logits [B, V] and record it; rows already done emit pad_id instead."""
    rng, sub = jax.random.split(state.rng)
    tok = jnp.where(state.done, sampler.pad_id, sampler.sample(sub, logits))  # [B]
    return state.replace(last=tok, rng=rng, count=state.count + (~state.done).astype(jnp.int32),
                         done=state.done | (tok == sampler.eos_id))


def _initial_state(cache: KVCache | None, rng: jax.Array, batch: int) -> DecodeState:
    return DecodeState(cache=cache, last=jnp.zeros((batch,), jnp.int32), rng=rng,
                       done=jnp.zeros((batch,), bool), count=jnp.zeros((batch,), jnp.int32))


def new_cache(config: GPTConfig, batch: int, max_len: int, kind: str = "dense", dtype: Any = None) -> KVCache:
    """An empty cache: "dense" holds keys/values in `dtype` (default: the compute dtype); any other kind is a
    compressed one of `jaxgpt.decode.kv_compress` ("int8", "turbo3", ...)."""
    if kind == "dense":
        return init_cache(config, batch, max_len, jnp.dtype(dtype or config.compute_dtype))
    from jaxgpt.decode.kv_compress import init_compressed_cache

    return init_compressed_cache(config, batch, max_len, kind)


def _prefill(params: Any, tokens: jax.Array, lengths: jax.Array, rng: jax.Array, sampler: Sampler, *,
             config: GPTConfig, max_len: int, cache_kind: str, cache_dtype: str,
             slide: bool) -> tuple[DecodeState, jax.Array]:
    """Run the padded prompts [B, T] once, write the cache, emit the first token. Returns (state, logits [B, V]).

    slide: the context may outgrow the cache (max_len == block_size), so the state keeps its token ids.
    """
    B, T = tokens.shape
    cache = new_cache(config, B, max_len, cache_kind, cache_dtype)
    if cache_kind != "dense":
        from jaxgpt.decode.kv_compress import set_prompt_lengths

        cache = set_prompt_lengths(cache, lengths)  # channel choices from each row's own tokens
    logits, cache = GPT(config).apply({"params": params}, tokens, cache=cache, logits_at=lengths - 1)  # [B, V]
    cache = cache.replace(lengths=lengths)  # padding slots past a row's length get overwritten
    state = _initial_state(cache, rng, B)
    if slide:
        state = state.replace(context=jnp.zeros((B, max_len), jnp.int32).at[:, :T].set(tokens))
    return _sample_next(state, logits, sampler), logits


def _select_rows(pick: jax.Array, a: Any, b: Any) -> Any:
    """Per row, a where pick [B] else b, over two pytrees of the same structure (leaves without a leading
    batch axis, such as codec constants, are the same in both and are kept)."""
    B = pick.shape[0]

    def sel(x: jax.Array, y: jax.Array) -> jax.Array:
        if x.ndim == 0 or x.shape[0] != B:
            return x
        return jnp.where(pick.reshape(B, *[1] * (x.ndim - 1)), x, y)

    return jax.tree.map(sel, a, b)


def _windowed_step(model: GPT, params: Any, state: DecodeState, window: int) -> tuple[jax.Array, KVCache, jax.Array]:
    """Feed state.last with the sliding-window rule -> (logits [B, V], cache, context [B, S]).

    A row whose cache is full re-prefills its last `window` context tokens plus the new one at positions
    0..window; the others decode one token. Rows already done stay at the buffer's last slot."""
    S = state.context.shape[1]
    B = state.last.shape[0]
    lengths = state.cache.lengths
    full = (lengths >= S) & ~state.done  # [B]
    at = jnp.minimum(lengths, S - 1)  # full or done rows never write past the buffer
    context = write_rows(state.context, state.last[:, None], at)  # [B, S]

    def decode() -> tuple[jax.Array, KVCache]:
        logits, cache = model.apply({"params": params}, state.last[:, None], cache=state.cache.replace(lengths=at))
        return logits[:, 0], cache

    def refill() -> tuple[jax.Array, KVCache, jax.Array]:
        kept = jnp.concatenate([state.context[:, S - window:], state.last[:, None]], axis=1)  # [B, window + 1]
        empty = state.cache.replace(lengths=jnp.zeros_like(lengths))
        logits, cache = model.apply({"params": params}, kept, cache=empty,
                                    logits_at=jnp.full((B,), window, jnp.int32))  # [B, V]
        refilled = jnp.concatenate([kept, state.context[:, window + 1:]], axis=1)  # [B, S]
        if B > 1:  # the other rows decode as usual
            d_logits, d_cache = decode()
            logits, cache = _select_rows(full, (logits, cache), (d_logits, d_cache))
        return logits, cache, jnp.where(full[:, None], refilled, context)

    return lax.cond(full.any(), refill, lambda: (*decode(), context))


def _decode(params: Any, state: DecodeState, sampler: Sampler, *, config: GPTConfig, n_steps: int,
            return_logits: bool, window: int) -> tuple[DecodeState, jax.Array, jax.Array | None]:
    """`n_steps` tokens by lax.scan: feed the last token, sample the next. -> (state, [B, n], [B, n, V] or None)."""
    model = GPT(config)

    def step(state: DecodeState, _: None) -> tuple[DecodeState, tuple[jax.Array, jax.Array | None]]:
        if state.context is None:
            logits, cache = model.apply({"params": params}, state.last[:, None], cache=state.cache)
            logits = logits[:, 0]  # [B, V]
            state = state.replace(cache=cache)
        else:
            logits, cache, context = _windowed_step(model, params, state, window)
            state = state.replace(cache=cache, context=context)
        state = _sample_next(state, logits, sampler)
        return state, (state.last, logits if return_logits else None)

    state, (toks, logits) = lax.scan(step, state, None, length=n_steps)
    return state, toks.T, None if logits is None else jnp.swapaxes(logits, 0, 1)


_STATIC = ("config", "max_len", "cache_kind", "cache_dtype", "slide")
_prefill_jit = jax.jit(_prefill, static_argnames=_STATIC)
_decode_jit = jax.jit(_decode, static_argnames=("config", "n_steps", "return_logits", "window"))


@partial(jax.jit, static_argnames=_STATIC + ("n_steps", "return_logits", "window"))
def _generate_jit(params: Any, tokens: jax.Array, lengths: jax.Array, rng: jax.Array, sampler: Sampler, *,
                  config: GPTConfig, max_len: int, cache_kind: str, cache_dtype: str, slide: bool, n_steps: int,
                  return_logits: bool, window: int) -> Generation:
    state, logits0 = _prefill(params, tokens, lengths, rng, sampler, config=config, max_len=max_len,
                              cache_kind=cache_kind, cache_dtype=cache_dtype, slide=slide)
    tok0 = state.last
    if n_steps == 0:  # one new token: the prefill's
        return Generation(tok0[:, None], state.count, logits0[:, None] if return_logits else None)
    state, toks, logits = _decode(params, state, sampler, config=config, n_steps=n_steps,
                                  return_logits=return_logits, window=window)
    out_tokens = jnp.concatenate([tok0[:, None], toks], axis=1)  # [B, N]
    out_logits = jnp.concatenate([logits0[:, None], logits], axis=1) if return_logits else None
    return Generation(out_tokens, state.count, out_logits)


def _setup(config: GPTConfig, prompt_tokens: Any, max_new_tokens: int, rng: Any, temperature: float,
           top_k: int | None, top_p: float | None, eos_id: int | None, pad_id: int | None, bos_id: int | None,
           prompt_lengths: Any, cache_kind: str = "dense",
           window: int | None = None) -> tuple[np.ndarray, np.ndarray, jax.Array, Sampler, int]:
    """Shared validation of generate / stream / generate_uncached -> (tokens, lengths, rng, sampler, window)."""
    if cache_kind != "dense":
        from jaxgpt.decode.kv_compress import parse_kind

        parse_kind(cache_kind)  # a clear ValueError for an unknown kind, before anything is traced
    window = window_size(config, window)
    sampler = make_sampler(config, temperature, top_k, top_p, eos_id, pad_id)
    tokens, lengths = prepare_prompts(config, prompt_tokens, max_new_tokens, prompt_lengths,
                                      eos_id if bos_id is None else bos_id)
    if rng is None:
        if not sampler.greedy:
            raise ValueError(f"sampling with temperature={temperature} needs a seed: pass rng=<int> or "
                             "rng=jax.random.PRNGKey(seed) (or temperature=0 for greedy)")
        rng = 0
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        rng = jax.random.PRNGKey(int(rng))
    return tokens, lengths, rng, sampler, window


def _cache_static(config: GPTConfig, prompt_len: int, max_new_tokens: int, cache_kind: str,
                  cache_dtype: Any) -> dict[str, Any]:
    """Static cache arguments: the buffer holds the whole sequence, or block_size slots once it can slide."""
    longest = prompt_len + max_new_tokens - 1  # the last emitted token is never fed back
    slide = longest > config.block_size
    return dict(config=config, max_len=config.block_size if slide else longest, cache_kind=cache_kind,
                cache_dtype=jnp.dtype(cache_dtype or config.compute_dtype).name, slide=slide)


def _generate_call(params: Any, config: GPTConfig, prompt_tokens: Any, max_new_tokens: int, *,
                   rng: Any = None, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                   eos_id: int | None = None, pad_id: int | None = None, bos_id: int | None = None,
                   prompt_lengths: Any = None, cache_kind: str = "dense", cache_dtype: Any = None,
                   window: int | None = None, return_logits: bool = False) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Validated (arguments, static arguments) of `_generate_jit`."""
    tokens, lengths, rng, sampler, window = _setup(config, prompt_tokens, max_new_tokens, rng, temperature, top_k,
                                                   top_p, eos_id, pad_id, bos_id, prompt_lengths, cache_kind, window)
    static = _cache_static(config, tokens.shape[1], max_new_tokens, cache_kind, cache_dtype)
    static.update(n_steps=max_new_tokens - 1, return_logits=return_logits, window=window)
    return (params, tokens, lengths, rng, sampler), static


def generate(params: Any, config: GPTConfig, prompt_tokens: Any, max_new_tokens: int, *,
             rng: Any = None, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_id: int | None = None, pad_id: int | None = None, bos_id: int | None = None,
             prompt_lengths: Any = None, cache_kind: str = "dense", cache_dtype: Any = None,
             window: int | None = None, return_logits: bool = False) -> Generation:
    """Continue each prompt by `max_new_tokens` tokens with a KV cache; prefill + lax.scan in one jit.

    prompt_tokens: list of token-id lists (ragged), or a [B, T] int array with optional prompt_lengths [B].
    rng: a PRNG key or int seed (needed unless temperature == 0, which is greedy). top-k, then top-p, as
    transformers. eos_id: rows that emit it stop; their remaining tokens are pad_id (default eos_id).
    Empty prompts start from bos_id (default eos_id). cache_kind / cache_dtype: see `new_cache`.
    window: context tokens kept when a full context slides (default block_size // 2; see the module doc).
    Returns Generation(tokens [B, N], lengths [B], logits [B, N, V] if return_logits).
    """
    args, static = _generate_call(
        params, config, prompt_tokens, max_new_tokens, rng=rng, temperature=temperature, top_k=top_k, top_p=top_p,
        eos_id=eos_id, pad_id=pad_id, bos_id=bos_id, prompt_lengths=prompt_lengths, cache_kind=cache_kind,
        cache_dtype=cache_dtype, window=window, return_logits=return_logits)
    return _generate_jit(*args, **static)


def lower_generate(params: Any, config: GPTConfig, prompt_tokens: Any, max_new_tokens: int,
                   **kwargs: Any) -> jax.stages.Lowered:
    """`generate`'s program lowered for these arguments without running it (benchmarks: `.compile()` it to
    time compilation apart; later `generate` calls with the same shapes reuse the executable). Takes
    `generate`'s keyword arguments."""
    args, static = _generate_call(params, config, prompt_tokens, max_new_tokens, **kwargs)
    return _generate_jit.lower(*args, **static)


def sample_text(params: Any, config: GPTConfig, tokenizer: Any, prompt_ids: Sequence[int], max_new_tokens: int, *,
                temperature: float = 0.8, top_k: int | None = None, seed: int = 0,
                window: int | None = None) -> str:
    """One sample as text (stops at the tokenizer's <|endoftext|>, if it has one): `generate` with the sliding
    window, for any length. top_k 0 or None keeps the whole vocabulary. Used for training's end-of-run sample."""
    eos = getattr(tokenizer, "eot_id", None)
    out = generate(params, config, [list(prompt_ids)], max_new_tokens, rng=seed, temperature=temperature,
                   top_k=top_k or None, eos_id=eos, window=window)
    ids = np.asarray(out.tokens[0, :int(out.lengths[0])]).tolist()
    return tokenizer.decode([t for t in ids if t != eos])


def stream(params: Any, config: GPTConfig, prompt_tokens: Any, max_new_tokens: int, *, chunk_size: int = 16,
           rng: Any = None, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           eos_id: int | None = None, pad_id: int | None = None, bos_id: int | None = None,
           prompt_lengths: Any = None, cache_kind: str = "dense", cache_dtype: Any = None,
           window: int | None = None) -> Iterator[Generation]:
    """Like `generate`, but yields Generation chunks as they are produced: first the prefill's token, then
    `chunk_size` tokens per scan (the cache is carried between scans). Each chunk's `lengths` counts its
    valid tokens. Stops early once every row is done; concatenated, the chunks equal `generate`'s output.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} is not valid; use a positive integer")
    tokens, lengths, rng, sampler, window = _setup(config, prompt_tokens, max_new_tokens, rng, temperature, top_k,
                                                   top_p, eos_id, pad_id, bos_id, prompt_lengths, cache_kind, window)
    static = _cache_static(config, tokens.shape[1], max_new_tokens, cache_kind, cache_dtype)
    state, _ = _prefill_jit(params, tokens, lengths, rng, sampler, **static)
    yield Generation(state.last[:, None], state.count)
    left = max_new_tokens - 1
    while left > 0 and not bool(state.done.all()):
        n = min(chunk_size, left)
        count = state.count
        state, toks, _ = _decode_jit(params, state, sampler, config=config, n_steps=n, return_logits=False,
                                     window=window)
        left -= n
        yield Generation(toks, state.count - count)


# ---------------------------------------------------------------------------------------------------------
# Reference path without a cache


@partial(jax.jit, static_argnames=("config",))
def _logits_at(params: Any, tokens: jax.Array, at: jax.Array, *, config: GPTConfig) -> jax.Array:
    """Full causal forward over tokens [B, L]; logits [B, V] at positions at [B] (the head reads only those)."""
    return GPT(config).apply({"params": params}, tokens, logits_at=at)


_sample_next_jit = jax.jit(_sample_next)


def generate_uncached(params: Any, config: GPTConfig, prompt_tokens: Any, max_new_tokens: int, *,
                      rng: Any = None, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, eos_id: int | None = None, pad_id: int | None = None,
                      bos_id: int | None = None, prompt_lengths: Any = None, window: int | None = None,
                      bucket: int = 64, return_logits: bool = False) -> Generation:
    """Reference decoding without a cache: every token re-runs the model over the row's whole context.

    Contexts are right-padded up to a multiple of `bucket` positions (causal attention makes the padding
    invisible), so the forward pass compiles once per bucket rather than once per token. Same arguments,
    window rule, random numbers and result as `generate`.
    """
    if isinstance(bucket, bool) or not isinstance(bucket, int) or bucket < 1:
        raise ValueError(f"bucket={bucket!r} is not valid; use a positive integer")
    tokens, lengths, rng, sampler, window = _setup(config, prompt_tokens, max_new_tokens, rng, temperature, top_k,
                                                   top_p, eos_id, pad_id, bos_id, prompt_lengths, window=window)
    B, T = tokens.shape
    width = min(T + max_new_tokens - 1, config.block_size)  # the longest context ever run
    context = np.zeros((B, width), np.int32)
    context[:, :T] = tokens
    n = lengths.astype(np.int64)  # [B] tokens in each row's context
    state = _initial_state(None, rng, B)
    out_tokens, out_logits = [], []
    for i in range(max_new_tokens):
        L = min(-(-int(n.max()) // bucket) * bucket, width)
        logits = _logits_at(params, context[:, :L], n - 1, config=config)  # [B, V]
        state = _sample_next_jit(state, logits, sampler)
        tok = np.asarray(state.last)
        out_tokens.append(tok)
        if return_logits:
            out_logits.append(logits)
        for b in range(B):  # append the token; a full context first keeps its last `window` tokens
            if n[b] == config.block_size:
                context[b, :window] = context[b, n[b] - window:n[b]].copy()
                n[b] = window
            if n[b] < width:
                context[b, n[b]] = tok[b]
                n[b] += 1
    return Generation(jnp.asarray(np.stack(out_tokens, axis=1)), state.count,
                      jnp.stack(out_logits, axis=1) if return_logits else None)
