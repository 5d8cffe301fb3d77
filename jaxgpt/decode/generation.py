"""Autoregressive decoding with the KV cache as explicit state: one prefill, then `lax.scan`.

Prompts of different lengths are right-padded into one [B, T] array. The prefill pass writes every prompt
position into the cache and computes logits only at each row's last prompt token; the cache then records
each row's true length, so row b's next token is written at position len_b and the causal mask (key j is
visible iff j <= the query's position) hides the padding slots until they are overwritten. No left padding,
no position shifts: every row sees exactly the positions it would see alone.

Past the context window (any position kind): a row's context holds at most block_size tokens (a longer
prompt keeps its last block_size). When the cache is full and a token must be fed, the row keeps the last
`window` tokens of its context (`DecodeOptions.window`), re-prefills them with the new token at positions
0..window, and goes on. `window = block_size - 1` re-prefills every step: exactly nanoGPT's crop to the last
block_size tokens.
The default, block_size // 2, re-prefills once every block_size // 2 tokens. Rows refill independently.

The decode loop carries (cache, last token, rng, done, and, when the window can slide, the token ids of the
context) through `lax.scan`; a refill is a `lax.cond` inside the step, so one program serves every step.
`generate` jits prefill + scan as one function (one compile per batch / prompt length / new-token count);
`stream` runs the same steps in chunks of a few tokens, carrying the state between calls, so text can be
shown as it is produced; `generate_uncached` re-runs the whole context for every token and is the
reference for tests and benchmarks. All three take one `DecodeOptions` (sampling, eos, window, cache kind)
and draw the same random numbers, so for a given seed they emit the same tokens.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Iterator, NamedTuple, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxgpt.decode.cache_kinds import new_cache
from jaxgpt.decode.kv_cache import KVCache, write_rows
from jaxgpt.decode.kv_compress import set_prompt_lengths
from jaxgpt.decode.options import DecodeOptions
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


def make_sampler(model_cfg: GPTConfig, options: DecodeOptions) -> Sampler:
    """The sampling settings of `options` as traced scalars and static flags, its token ids checked against the
    vocabulary. Greedy when temperature == 0 (top-k / top-p are then ignored)."""
    V = model_cfg.vocab_size
    for name in ("eos_id", "pad_id", "bos_id"):
        tok = getattr(options, name)
        if tok is not None and not tok < V:
            raise ValueError(f"{name}={tok!r} is outside the vocabulary [0, {V}); pass a valid token id or None")
    eos_id, pad_id, top_p = options.eos_id, options.pad_id, options.top_p
    if pad_id is None:
        pad_id = eos_id if eos_id is not None else 0
    top_k = int(options.top_k) if options.top_k is not None and options.top_k < V else None  # < V: a real filter
    greedy = options.greedy
    return Sampler(
        temperature=jnp.float32(options.temperature), top_p=jnp.float32(1.0 if top_p is None else top_p),
        eos_id=jnp.int32(-1 if eos_id is None else eos_id), pad_id=jnp.int32(pad_id), greedy=greedy,
        top_k=None if greedy else top_k, use_top_p=not greedy and top_p is not None and top_p < 1.0)


# ---------------------------------------------------------------------------------------------------------
# Prompts


def prepare_prompts(model_cfg: GPTConfig, prompt_tokens: Any, max_new_tokens: int,
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
    V = model_cfg.vocab_size
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
                raise ValueError(f"prompt row {b} is empty and there is no start token; set DecodeOptions eos_id or "
                                 "bos_id (GPT-2: 50256, <|endoftext|>) or pass a non-empty prompt")
            row.append(int(bos_id))
    rows = [row[-model_cfg.block_size:] for row in rows]  # a context holds at most block_size tokens
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


def window_size(model_cfg: GPTConfig, window: int | None) -> int:
    """Tokens kept when a full context slides (default block_size // 2), validated."""
    block = model_cfg.block_size
    if window is None:
        return block // 2
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or not 0 <= window < block:
        raise ValueError(f"window={window!r} is not valid; use an integer in [0, block_size - 1 = "
                         f"{block - 1}] (block_size - 1 re-prefills every token, as nanoGPT's crop)")
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


class CachePlan(NamedTuple):
    """The static layout of one decode's cache (hashable: a jit static argument)."""

    kind: str  # a cache kind of `jaxgpt.decode.cache_kinds`
    dtype: str | None  # a dense cache's float dtype (None: the compute dtype)
    max_len: int  # slots: the whole sequence, or block_size once the context can slide
    slide: bool  # the context may outgrow the cache, so the decode state keeps its token ids


def _prefill(params: Any, tokens: jax.Array, lengths: jax.Array, rng: jax.Array, sampler: Sampler, *,
             model_cfg: GPTConfig, plan: CachePlan) -> tuple[DecodeState, jax.Array]:
    """Run the padded prompts [B, T] once, write the cache, emit the first token. Returns (state, logits [B, V])."""
    B, T = tokens.shape
    cache = new_cache(plan.kind, model_cfg, B, plan.max_len, plan.dtype)
    cache = set_prompt_lengths(cache, lengths)  # mixed compressed kinds: channels from each row's own tokens
    logits, cache = GPT(model_cfg).apply({"params": params}, tokens, cache=cache, logits_at=lengths - 1)  # [B, V]
    cache = cache.replace(lengths=lengths)  # padding slots past a row's length get overwritten
    state = _initial_state(cache, rng, B)
    if plan.slide:
        state = state.replace(context=jnp.zeros((B, plan.max_len), jnp.int32).at[:, :T].set(tokens))  # [B, S]
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


def _decode(params: Any, state: DecodeState, sampler: Sampler, *, model_cfg: GPTConfig, n_steps: int,
            return_logits: bool, window: int) -> tuple[DecodeState, jax.Array, jax.Array | None]:
    """`n_steps` tokens by lax.scan: feed the last token, sample the next. -> (state, [B, n], [B, n, V] or None)."""
    model = GPT(model_cfg)

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


_prefill_jit = jax.jit(_prefill, static_argnames=("model_cfg", "plan"))
_decode_jit = jax.jit(_decode, static_argnames=("model_cfg", "n_steps", "return_logits", "window"))


@partial(jax.jit, static_argnames=("model_cfg", "plan", "n_steps", "return_logits", "window"))
def _generate_jit(params: Any, tokens: jax.Array, lengths: jax.Array, rng: jax.Array, sampler: Sampler, *,
                  model_cfg: GPTConfig, plan: CachePlan, n_steps: int, return_logits: bool,
                  window: int) -> Generation:
    state, logits0 = _prefill(params, tokens, lengths, rng, sampler, model_cfg=model_cfg, plan=plan)
    tok0 = state.last
    if n_steps == 0:  # one new token: the prefill's
        return Generation(tok0[:, None], state.count, logits0[:, None] if return_logits else None)
    state, toks, logits = _decode(params, state, sampler, model_cfg=model_cfg, n_steps=n_steps,
                                  return_logits=return_logits, window=window)
    out_tokens = jnp.concatenate([tok0[:, None], toks], axis=1)  # [B, N]
    out_logits = jnp.concatenate([logits0[:, None], logits], axis=1) if return_logits else None  # [B, N, V]
    return Generation(out_tokens, state.count, out_logits)


class Prepared(NamedTuple):
    """What `generate`, `stream` and `generate_uncached` decode from, checked."""

    tokens: np.ndarray  # [B, T] int32 right-padded prompts
    lengths: np.ndarray  # [B] int32
    rng: jax.Array  # PRNG key of the seed
    sampler: Sampler
    window: int


def _setup(model_cfg: GPTConfig, prompt_tokens: Any, max_new_tokens: int, options: DecodeOptions,
           prompt_lengths: Any) -> Prepared:
    """Check the options against the model and the prompts, and prepare both."""
    if not isinstance(options, DecodeOptions):
        raise TypeError(f"options must be a DecodeOptions, not {type(options).__name__}; "
                        "build one with DecodeOptions(temperature=..., ...)")
    window = window_size(model_cfg, options.window)
    sampler = make_sampler(model_cfg, options)
    bos_id = options.eos_id if options.bos_id is None else options.bos_id
    tokens, lengths = prepare_prompts(model_cfg, prompt_tokens, max_new_tokens, prompt_lengths, bos_id)
    if options.seed is None and not sampler.greedy:
        raise ValueError(f"sampling with temperature={options.temperature} needs a seed: pass "
                         "DecodeOptions(seed=<int>, ...) (or temperature=0 for greedy)")
    rng = jax.random.PRNGKey(0 if options.seed is None else int(options.seed))
    return Prepared(tokens, lengths, rng, sampler, window)


def _cache_plan(model_cfg: GPTConfig, prompt_len: int, max_new_tokens: int, options: DecodeOptions) -> CachePlan:
    """The buffer holds the whole sequence, or block_size slots once the context can slide."""
    longest = prompt_len + max_new_tokens - 1  # the last emitted token is never fed back
    slide = longest > model_cfg.block_size
    return CachePlan(options.cache_kind, options.cache_dtype, model_cfg.block_size if slide else longest, slide)


def _generate_call(params: Any, model_cfg: GPTConfig, prompt_tokens: Any, max_new_tokens: int,
                   options: DecodeOptions, prompt_lengths: Any,
                   return_logits: bool) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Checked (arguments, static arguments) of `_generate_jit`."""
    p = _setup(model_cfg, prompt_tokens, max_new_tokens, options, prompt_lengths)
    plan = _cache_plan(model_cfg, p.tokens.shape[1], max_new_tokens, options)
    static = dict(model_cfg=model_cfg, plan=plan, n_steps=max_new_tokens - 1, return_logits=return_logits,
                  window=p.window)
    return (params, p.tokens, p.lengths, p.rng, p.sampler), static


def generate(params: Any, model_cfg: GPTConfig, prompt_tokens: Any, max_new_tokens: int,
             options: DecodeOptions = DecodeOptions(), *, prompt_lengths: Any = None,
             return_logits: bool = False) -> Generation:
    """Continue each prompt by `max_new_tokens` tokens with a KV cache; prefill + lax.scan in one jit.

    prompt_tokens: list of token-id lists (ragged), or a [B, T] int array with optional prompt_lengths [B].
    options: sampling, eos / pad / bos, the sliding window and the cache kind (see `DecodeOptions`).
    Returns Generation(tokens [B, N], lengths [B], logits [B, N, V] if return_logits).
    """
    args, static = _generate_call(params, model_cfg, prompt_tokens, max_new_tokens, options, prompt_lengths,
                                  return_logits)
    return _generate_jit(*args, **static)


def lower_generate(params: Any, model_cfg: GPTConfig, prompt_tokens: Any, max_new_tokens: int,
                   options: DecodeOptions = DecodeOptions(), *, prompt_lengths: Any = None,
                   return_logits: bool = False) -> jax.stages.Lowered:
    """`generate`'s program lowered for these arguments without running it (benchmarks: `.compile()` it to
    time compilation apart; later `generate` calls with the same shapes reuse the executable)."""
    args, static = _generate_call(params, model_cfg, prompt_tokens, max_new_tokens, options, prompt_lengths,
                                  return_logits)
    return _generate_jit.lower(*args, **static)


def sample_text(params: Any, model_cfg: GPTConfig, tokenizer: Any, prompt_ids: Sequence[int], max_new_tokens: int,
                options: DecodeOptions = DecodeOptions()) -> str:
    """One sample as text, by `generate` (the context slides past block_size, so any length works). Without
    an options.eos_id it stops at the tokenizer's <|endoftext|>, if it has one. Used for training's end-of-run
    sample."""
    eos = options.eos_id if options.eos_id is not None else getattr(tokenizer, "eot_id", None)
    out = generate(params, model_cfg, [list(prompt_ids)], max_new_tokens, options.replace(eos_id=eos))
    ids = np.asarray(out.tokens[0, :int(out.lengths[0])]).tolist()
    return tokenizer.decode([t for t in ids if t != eos])


def stream(params: Any, model_cfg: GPTConfig, prompt_tokens: Any, max_new_tokens: int,
           options: DecodeOptions = DecodeOptions(), *, prompt_lengths: Any = None,
           chunk_size: int = 16) -> Iterator[Generation]:
    """Like `generate`, but yields Generation chunks as they are produced: first the prefill's token, then
    `chunk_size` tokens per scan (the cache is carried between scans). Each chunk's `lengths` counts its
    valid tokens. Stops early once every row is done; concatenated, the chunks equal `generate`'s output.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} is not valid; use a positive integer")
    p = _setup(model_cfg, prompt_tokens, max_new_tokens, options, prompt_lengths)
    plan = _cache_plan(model_cfg, p.tokens.shape[1], max_new_tokens, options)
    state, _ = _prefill_jit(params, p.tokens, p.lengths, p.rng, p.sampler, model_cfg=model_cfg, plan=plan)
    yield Generation(state.last[:, None], state.count)
    left = max_new_tokens - 1
    while left > 0 and not bool(state.done.all()):
        n = min(chunk_size, left)
        count = state.count
        state, toks, _ = _decode_jit(params, state, p.sampler, model_cfg=model_cfg, n_steps=n, return_logits=False,
                                     window=p.window)
        left -= n
        yield Generation(toks, state.count - count)


# ---------------------------------------------------------------------------------------------------------
# Reference path without a cache


@partial(jax.jit, static_argnames=("model_cfg",))
def _logits_at(params: Any, tokens: jax.Array, at: jax.Array, *, model_cfg: GPTConfig) -> jax.Array:
    """Full causal forward over tokens [B, L]; logits [B, V] at positions at [B] (the head reads only those)."""
    return GPT(model_cfg).apply({"params": params}, tokens, logits_at=at)


_sample_next_jit = jax.jit(_sample_next)


def generate_uncached(params: Any, model_cfg: GPTConfig, prompt_tokens: Any, max_new_tokens: int,
                      options: DecodeOptions = DecodeOptions(), *, prompt_lengths: Any = None, bucket: int = 64,
                      return_logits: bool = False) -> Generation:
    """Reference decoding without a cache: every token re-runs the model over the row's whole context.

    Contexts are right-padded up to a multiple of `bucket` positions (causal attention makes the padding
    invisible), so the forward pass compiles once per bucket rather than once per token. Same arguments,
    window rule, random numbers and result as `generate` (options.cache_kind / cache_dtype do not apply).
    """
    if isinstance(bucket, bool) or not isinstance(bucket, int) or bucket < 1:
        raise ValueError(f"bucket={bucket!r} is not valid; use a positive integer")
    p = _setup(model_cfg, prompt_tokens, max_new_tokens, options, prompt_lengths)
    B, T = p.tokens.shape
    block, window = model_cfg.block_size, p.window
    width = min(T + max_new_tokens - 1, block)  # the longest context ever run
    context = np.zeros((B, width), np.int32)  # [B, width]
    context[:, :T] = p.tokens
    n = p.lengths.astype(np.int64)  # [B] tokens in each row's context
    state = _initial_state(None, p.rng, B)
    out_tokens, out_logits = [], []
    for i in range(max_new_tokens):
        L = min(-(-int(n.max()) // bucket) * bucket, width)
        logits = _logits_at(params, context[:, :L], n - 1, model_cfg=model_cfg)  # [B, V]
        state = _sample_next_jit(state, logits, p.sampler)
        tok = np.asarray(state.last)
        out_tokens.append(tok)
        if return_logits:
            out_logits.append(logits)
        for b in range(B):  # append the token; a full context first keeps its last `window` tokens
            if n[b] == block:
                context[b, :window] = context[b, n[b] - window:n[b]].copy()
                n[b] = window
            if n[b] < width:
                context[b, n[b]] = tok[b]
                n[b] += 1
    return Generation(jnp.asarray(np.stack(out_tokens, axis=1)), state.count,
                      jnp.stack(out_logits, axis=1) if return_logits else None)
