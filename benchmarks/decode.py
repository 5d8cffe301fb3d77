"""Decoding speed: KV-cache decoding vs re-running the whole sequence, vs transformers, and cache bytes.

    python benchmarks/decode.py                 # GPT-2 124M shape, random float32 weights, batch 1 and 8
    python benchmarks/decode.py --quick         # nano shape, short lists: a smoke run in a minute

Measured in one process, on the same weights:
  0. the machine's memory read bandwidth (a jitted sum over 1 GiB, and NumPy's; the faster is kept) and the
     batch-1 roofline it allows: bandwidth / bytes of weights read per token;
  1. cached `generate` (prefill + lax.scan, greedy) for each variant x batch x new-token count: compile timed
     apart (AOT), then `--rounds` timed whole generations (prefill included), median: ms per token and
     tokens/s, at batch 1 also as a fraction of the roofline and against the first variant; the count of
     float buffers with a weight's shape the compiled program writes (a dequantized copy of a weight);
  2. time of one token against its position p: cached = decode steps of `GPT.apply` with a KV cache already
     holding p tokens (buffer of the longest run's size, steps in a lax.scan as in `generate`); uncached =
     `generate_uncached` producing the token after a p-token context (one full forward over p tokens): the
     O(T) vs O(T^2) picture, plotted to docs/figures/decode_per_token.png;
  3. transformers `GPT2LMHeadModel.generate(use_cache=True, greedy)` on the same weights (exported with
     `hf.export_hf_gpt2`) against cached `generate` at the same batch and length;
  4. KV-cache bytes per token and for a full 1024 context, 124M and 1.5B, float32 and bfloat16.
Every record also goes to docs/figures/decode.jsonl.

A variant is (weights transform, cache kind): add one to VARIANTS to get its own rows (int8 weights,
compressed caches).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from tqdm import tqdm

from jaxgpt.decode import generation as G
from jaxgpt.decode.cache_kinds import new_cache
from jaxgpt.decode.options import DecodeOptions
from jaxgpt.nn.config import GPTConfig, param_count
from jaxgpt.nn.model import GPT

FIGURES = Path(__file__).resolve().parents[1] / "docs" / "figures"


@dataclasses.dataclass(frozen=True)
class Variant:
    """What is decoded: params transformed by `prepare` (None: as they are) with a cache of `cache_kind`."""

    name: str
    cache_kind: str = "dense"
    prepare: Callable[[GPTConfig, Any], Any] | None = None


def int8_with_embeddings(cfg: GPTConfig, params: Any) -> Any:
    from jaxgpt.quantize import QuantConfig, quantize

    return quantize(params, QuantConfig(bits=8, embeddings=True, lm_head=True))


VARIANTS = (Variant("f32 weights, f32 cache"), Variant("int8 weights + emb, f32 cache", prepare=int8_with_embeddings))


def random_params(cfg: GPTConfig, seed: int = 0) -> Any:
    """GPT-2-like random weights (N(0, 0.02), norm scales 1) drawn in NumPy: no init compile."""
    shapes = jax.eval_shape(lambda: GPT(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32)))["params"]
    rng = np.random.default_rng(seed)

    def draw(path: Any, x: jax.ShapeDtypeStruct) -> jax.Array:
        base = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0
        return jnp.asarray((base + 0.02 * rng.standard_normal(x.shape, np.float32)).astype(x.dtype))

    return jax.tree_util.tree_map_with_path(draw, shapes)


def timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t


def table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    print(f"\n{title}\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(f"{x:,.2f}" if isinstance(x, float) else str(x) for x in r) + " |")


# ---------------------------------------------------------------------------------------------------------
# Measurements


def read_bandwidth(nbytes: int = 1 << 30, reps: int = 5) -> dict:
    """Memory read bandwidth, GB/s: best of `reps` sums over an nbytes float32 array (jitted, and NumPy)."""
    x = np.ones(nbytes // 4, np.float32)
    xj = jnp.asarray(x)
    total = jax.jit(jnp.sum)
    timed(lambda: total(xj))  # compile
    jax_s = min(timed(lambda: total(xj)) for _ in range(reps))
    np_s = min(timed(lambda: x.sum()) for _ in range(reps))
    return dict(kind="bandwidth", bytes=nbytes, jax_gbs=nbytes / jax_s / 1e9, numpy_gbs=nbytes / np_s / 1e9,
                gbs=nbytes / min(jax_s, np_s) / 1e9)


def weight_bytes(params: Any) -> int:
    """Bytes of every weight (quantized leaves: integers + scales), all read once per decode step at batch 1."""
    leaves = jax.tree.leaves(params, is_leaf=lambda x: hasattr(x, "matmul"))
    return int(sum(x.nbytes for x in leaves))


def weight_copies(hlo: str, params: Any) -> int:
    """Float buffers with a weight matrix's shape that the compiled program writes (dequantized copies)."""
    from jaxgpt.quantize import hlo_float_buffers

    shapes = {tuple(x.shape) for x in jax.tree.leaves(params, is_leaf=lambda x: hasattr(x, "matmul"))
              if len(x.shape) == 2}
    shapes |= {s[::-1] for s in shapes}
    return sum(1 for _, shape, _ in hlo_float_buffers(hlo) if shape in shapes)


def matrix_times(cfg, variant, params, rounds, steps=16) -> list[dict]:
    """Where a batch-1 token's time goes: each weight matrix alone, x [1, in] @ W as the model computes it,
    `steps` dependent products in a lax.scan (each result feeds the next x, so nothing is hoisted), median
    of `rounds`; with the times each matrix is read per token (per layer x n_layer, the tied head once)."""
    from jaxgpt.nn.weights import attend, matmul

    h = params["h_0"]
    mats = [("attn.c_attn", h["attn"]["c_attn"]["kernel"], matmul, cfg.n_layer),
            ("attn.c_proj", h["attn"]["c_proj"]["kernel"], matmul, cfg.n_layer),
            ("mlp.c_fc", h["mlp"]["c_fc"]["kernel"], matmul, cfg.n_layer),
            ("mlp.c_proj", h["mlp"]["c_proj"]["kernel"], matmul, cfg.n_layer),
            ("wte (tied head)", params["wte"]["embedding"], attend, 1)]
    out = []
    for name, w, fn, per_token in mats:
        K = w.shape[0] if fn is matmul else w.shape[1]

        @jax.jit
        def loop(w: Any, x: jax.Array, fn: Callable = fn) -> jax.Array:
            def step(x: jax.Array, _: None) -> tuple[jax.Array, None]:
                return x + 1e-6 * jnp.mean(fn(x, w, jnp.float32)), None

            return lax.scan(step, x, None, length=steps)[0]

        x = jnp.ones((1, K), jnp.float32)
        timed(lambda: loop(w, x))  # compile
        t = float(np.median([timed(lambda: loop(w, x)) for _ in range(rounds)])) / steps
        nbytes = weight_bytes(w)
        out.append(dict(kind="matrix_time", variant=variant.name, matrix=name, shape=list(w.shape), bytes=nbytes,
                        us=1e6 * t, gbs=nbytes / t / 1e9, per_token=per_token))
    return out


def _ab(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Median seconds of each thunk, compiled first, then timed interleaved round by round."""
    for f in fns.values():
        timed(f)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            times[k].append(timed(f))
    return {k: float(np.median(v)) for k, v in times.items()}


def prefill_attempt(cfg, params, prompt_len, rounds) -> list[dict]:
    """A prefill of prompt_len tokens reading logits at the last one: head over every position, then a slice
    ([B, T, V]), against `logits_at` (the hidden state sliced before the head)."""
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (1, prompt_len)), jnp.int32)
    at = jnp.array([prompt_len - 1], jnp.int32)
    model = GPT(cfg)

    @partial(jax.jit, static_argnames="sliced")
    def prefill(params: Any, tokens: jax.Array, sliced: bool) -> Any:
        cache = new_cache("dense", cfg, 1, prompt_len)
        if sliced:
            return model.apply({"params": params}, tokens, cache=cache, logits_at=at)
        logits, cache = model.apply({"params": params}, tokens, cache=cache)
        return logits[:, -1], cache

    t = _ab({"logits at every position, then sliced": lambda: prefill(params, tokens, False),
             "logits_at (head reads one row)": lambda: prefill(params, tokens, True)}, rounds)
    return [dict(kind="attempt", what=f"prefill {prompt_len} tokens", form=k, ms=1e3 * v) for k, v in t.items()]


def int8_head_attempt(params, rounds, steps=8) -> list[dict]:
    """x [1, C] @ E.T for the int8 embedding table in several formulations, `steps` dependent products."""
    w = params["wte"]["embedding"]  # QuantizedArray [V, C]
    q, s = w.values, w.scales.reshape(-1)
    qkn = jnp.asarray(np.ascontiguousarray(np.asarray(q).T))
    f32 = jnp.float32

    def act_int8(x: jax.Array, q: jax.Array) -> jax.Array:
        sx = jnp.max(jnp.abs(x)) / 127.0
        xq = jnp.round(x / sx).astype(jnp.int8)
        dims = (((1,), (1,)), ((), ()))
        return lax.dot_general(xq, q, dims, preferred_element_type=jnp.int32).astype(f32) * sx * s

    forms = {"dot(x, q.astype(f32).T) * s (QuantizedArray)": (lambda x, q: jnp.dot(x, q.astype(f32).T) * s, q),
             "sum(q.astype(f32) * x, axis=1) * s": (lambda x, q: jnp.sum(q.astype(f32) * x, axis=1) * s, q),
             "[K, N] layout: dot(x, q_kn.astype(f32)) * s": (lambda x, q: jnp.dot(x, q.astype(f32)) * s, qkn),
             "dot_general(f32, int8, preferred f32) * s": (
                 lambda x, q: lax.dot_general(x, q, (((1,), (1,)), ((), ())), preferred_element_type=f32) * s, q),
             "int8 activations, s8 x s8 -> s32 dot": (act_int8, q)}
    fns = {}
    for name, (f, wq) in forms.items():
        @jax.jit
        def loop(wq: jax.Array, x: jax.Array, f: Callable = f) -> jax.Array:
            def step(x: jax.Array, _: None) -> tuple[jax.Array, None]:
                wb, xb = lax.optimization_barrier((wq, x))
                return x + 1e-6 * jnp.mean(f(xb, wb)), None

            return lax.scan(step, x, None, length=steps)[0]

        x = jnp.ones((1, q.shape[1]), f32)
        fns[name] = lambda loop=loop, wq=wq, x=x: loop(wq, x)
    t = _ab(fns, rounds)
    return [dict(kind="attempt", what="int8 tied head x @ E.T", form=k, ms=1e3 * v / steps) for k, v in t.items()]


def cached_runs(cfg, params, prompts, variant, new_tokens, rounds) -> list[dict]:
    out = []
    options = DecodeOptions(temperature=0, cache_kind=variant.cache_kind)
    for n in new_tokens:
        t = time.perf_counter()
        compiled = G.lower_generate(params, cfg, prompts, n, options).compile()
        compile_s = time.perf_counter() - t
        res = {}

        def run() -> jax.Array:
            res["g"] = G.generate(params, cfg, prompts, n, options)
            return res["g"].tokens

        times = [timed(run) for _ in range(rounds)]
        run_s = float(np.median(times))
        B = len(prompts)
        out.append(dict(kind="cached_generate", variant=variant.name, batch=B, new_tokens=n, compile_s=compile_s,
                        run_s=run_s, rounds_s=times, ms_per_step=1e3 * run_s / n, tokens_per_s=B * n / run_s,
                        weight_bytes=weight_bytes(params), weight_copies=weight_copies(compiled.as_text(), params),
                        tokens=np.asarray(res["g"].tokens).tolist()))
    return out


def cached_step_times(cfg, params, batch, variant, positions, max_len, reps, steps=8) -> list[dict]:
    """Decode steps (B tokens each) with a cache of max_len slots already holding p tokens, for each position
    p: `steps` greedy steps in a lax.scan with the cache donated, as in `generate`'s loop (a lone jitted step
    would copy the whole cache into a fresh output buffer every call)."""
    model = GPT(cfg)

    @partial(jax.jit, donate_argnums=2)
    def run(params: Any, tok: jax.Array, cache: Any) -> tuple[jax.Array, Any]:
        def step(carry: tuple[jax.Array, Any], _: None) -> tuple[tuple[jax.Array, Any], None]:
            tok, cache = carry
            logits, cache = model.apply({"params": params}, tok, cache=cache)
            return (jnp.argmax(logits, axis=-1).astype(jnp.int32), cache), None

        return lax.scan(step, (tok, cache), None, length=steps)[0]

    def at(p: int) -> Any:  # a fresh cache holding p tokens (allocated before the clock starts)
        return jax.block_until_ready(new_cache(variant.cache_kind, cfg, batch, max_len).replace(
            lengths=jnp.full((batch,), p, jnp.int32)))

    tok = jnp.ones((batch, 1), jnp.int32)
    timed(lambda: run(params, tok, at(positions[0])))  # compile
    out = []
    for p in positions:
        t = min(timed(lambda c=at(p): run(params, tok, c)) for _ in range(reps))
        out.append(dict(kind="per_token", path="cached", variant=variant.name, batch=batch, position=p,
                        ms=1e3 * t / steps))
    return out


def uncached_step_times(cfg, params, batch, positions, reps, rng) -> list[dict]:
    """`generate_uncached` for one new token after a p-token context: one full forward over p tokens."""
    out = []
    greedy = DecodeOptions(temperature=0)
    for p in positions:
        prompts = rng.integers(0, cfg.vocab_size, (batch, p)).tolist()
        run = lambda: G.generate_uncached(params, cfg, prompts, 1, greedy, bucket=p).tokens  # noqa: E731
        timed(run)  # compile
        t = min(timed(run) for _ in range(reps))
        out.append(dict(kind="per_token", path="uncached", variant=VARIANTS[0].name, batch=batch, position=p,
                        ms=1e3 * t))
    return out


def hf_runs(cfg, params, prompts, n, ours: dict) -> dict:
    """transformers greedy generate with its KV cache on the same weights; `ours` is cached generate's record."""
    import torch
    import transformers

    from jaxgpt.io.hf import export_hf_gpt2

    with tempfile.TemporaryDirectory() as d:
        export_hf_gpt2(cfg, params, d)
        model = transformers.GPT2LMHeadModel.from_pretrained(d, torch_dtype=torch.float32).eval()
    ids = torch.tensor(prompts)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
        t = time.perf_counter()
        seq = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        run_s = time.perf_counter() - t
    theirs = seq[:, ids.shape[1]:].numpy()
    same = np.asarray(ours["tokens"]) == theirs
    first_diff = [int(np.argmin(r)) if not r.all() else n for r in same]
    B = len(prompts)
    return dict(kind="hf_generate", batch=B, new_tokens=n, run_s=run_s, tokens_per_s=B * n / run_s,
                ours_tokens_per_s=ours["tokens_per_s"], speedup=ours["tokens_per_s"] / (B * n / run_s),
                greedy_agree_tokens=first_diff, torch_threads=torch.get_num_threads())


def cache_bytes_rows(context: int) -> list[dict]:
    """Bytes of the real cache pytree (from jax.eval_shape: nothing allocated), without the [B] lengths."""
    out = []
    for preset, label in (("gpt2", "GPT-2 124M"), ("gpt2-xl", "GPT-2 1.5B")):
        cfg = GPTConfig.preset(preset)
        weights = param_count(cfg)["total"]
        for kind, dtype in (("dense", "float32"), ("dense", "bfloat16")):
            def nbytes(s: int) -> int:
                shapes = jax.eval_shape(lambda: new_cache(kind, cfg, 1, s, dtype))
                return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes.layers))

            full = nbytes(context)
            assert full == context * nbytes(1)  # linear in the context: the seeds' memory wall
            out.append(dict(kind="cache_bytes", model=label, cache=f"{kind} {dtype}", bytes_per_token=nbytes(1),
                            context=context, bytes_full_context=full, weights_bytes=weights * jnp.dtype(dtype).itemsize))
    return out


# ---------------------------------------------------------------------------------------------------------


def plot(records: list[dict], path: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    per = [r for r in records if r["kind"] == "per_token"]
    for key in sorted({(r["path"], r["variant"], r["batch"]) for r in per}):
        pts = sorted((r["position"], r["ms"]) for r in per if (r["path"], r["variant"], r["batch"]) == key)
        x, y = zip(*pts)
        label = f"{key[0]}, batch {key[2]}" + (f" ({key[1]})" if len(VARIANTS) > 1 and key[0] == "cached" else "")
        ax.plot(x, y, marker="o" if key[0] == "uncached" else ".", ls="--" if key[0] == "uncached" else "-",
                label=label)
    ax.set_yscale("log")
    ax.set_xlabel("position (tokens already in the context)")
    ax.set_ylabel("time for the next token, ms (whole batch)")
    ax.set_title(f"{model} float32 decoding on {jax.devices()[0].platform.upper()}: KV cache vs re-running the sequence",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="gpt2")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, nargs="+", default=[128, 512, 1023],
                   help="with the 1-token prompt, 1023 new tokens fill GPT-2's whole 1024 context")
    p.add_argument("--prompt-len", type=int, default=1)
    p.add_argument("--positions", type=int, nargs="+", default=[128, 256, 512, 768, 1023])
    p.add_argument("--uncached-max-batched-position", type=int, default=512,
                   help="above this position the uncached path is timed at batch 1 only (a 1024-token forward "
                        "at batch 8 takes minutes on a small CPU)")
    p.add_argument("--reps", type=int, default=3, help="repetitions of the cached per-token timings (min is kept)")
    p.add_argument("--uncached-reps", type=int, default=1,
                   help="timed repetitions of the uncached per-token timings, after the compiling run")
    p.add_argument("--rounds", type=int, default=5, help="timed whole generations per setting (median kept)")
    p.add_argument("--no-curves", action="store_true", help="skip the per-token timings (cached and uncached)")
    p.add_argument("--attempts", action="store_true",
                   help="also the speed attempts' A/B: prefill logits_at, int8 head formulations")
    p.add_argument("--hf-new-tokens", type=int, default=128)
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--context", type=int, default=1024, help="context of the cache-bytes table")
    p.add_argument("--out", type=Path, default=FIGURES)
    p.add_argument("--quick", action="store_true", help="nano shape and short lists (smoke run)")
    args = p.parse_args()
    if args.quick:
        args.preset, args.new_tokens, args.positions, args.hf_new_tokens, args.reps = "nano", [16, 31], [8, 31], 16, 1
        args.uncached_max_batched_position = 8
    cfg = GPTConfig.preset(args.preset)
    context = args.prompt_len + max(args.new_tokens)  # the cache buffer of the per-token timings
    if not args.no_curves and max(args.positions) >= context:
        raise SystemExit(f"--positions go up to {max(args.positions)}; keep them below prompt + new tokens "
                         f"= {context}")
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    params = random_params(cfg)
    machine = dict(kind="machine", platform=platform.platform(), processor=platform.processor(),
                   cpus=os.cpu_count(), loadavg_start=os.getloadavg(), jax=jax.__version__,
                   device=str(jax.devices()[0]), preset=args.preset, dtype=cfg.dtype)
    print(json.dumps(machine))
    bandwidth = read_bandwidth()
    print(f"memory read bandwidth: {bandwidth['gbs']:.1f} GB/s (jitted sum {bandwidth['jax_gbs']:.1f}, "
          f"NumPy {bandwidth['numpy_gbs']:.1f})")
    records: list[dict] = [machine, bandwidth]
    prompts = {b: rng.integers(0, cfg.vocab_size, (b, args.prompt_len)).tolist() for b in args.batches}

    jobs = [("cached", v, b) for v in VARIANTS for b in args.batches] + [("matrices", v, 1) for v in VARIANTS]
    if not args.no_curves:
        jobs += [("steps", v, b) for v in VARIANTS for b in args.batches]
        jobs += [("uncached", VARIANTS[0], b) for b in args.batches]
    for what, v, b in tqdm(jobs, desc="decode benchmark"):
        vparams = v.prepare(cfg, params) if v.prepare else params
        if what == "cached":
            records += cached_runs(cfg, vparams, prompts[b], v, args.new_tokens, args.rounds)
        elif what == "matrices":
            records += matrix_times(cfg, v, vparams, args.rounds)
        elif what == "steps":
            records += cached_step_times(cfg, vparams, b, v, args.positions, context, args.reps)
        else:
            pos = [q for q in args.positions if b == 1 or q <= args.uncached_max_batched_position]
            records += uncached_step_times(cfg, params, b, pos, args.uncached_reps, rng)
    if args.attempts:
        records += prefill_attempt(cfg, params, 64, args.rounds)
        records += int8_head_attempt(int8_with_embeddings(cfg, params), args.rounds)
    if not args.no_hf:
        for b in args.batches:
            ours = next(r for r in records if r["kind"] == "cached_generate" and r["variant"] == VARIANTS[0].name
                        and r["batch"] == b and r["new_tokens"] == args.hf_new_tokens)
            records.append(hf_runs(cfg, params, prompts[b], args.hf_new_tokens, ours))
    records += cache_bytes_rows(args.context)

    # ---- tables
    gen = [r for r in records if r["kind"] == "cached_generate"]
    table(f"Cached generate (greedy, whole generations with prefill, median of {args.rounds}; compile timed apart)",
          ["variant", "batch", "new tokens", "compile s", "run s", "ms/token", "tokens/s", "float weight copies"],
          [[r["variant"], r["batch"], r["new_tokens"], r["compile_s"], r["run_s"], r["ms_per_step"],
            r["tokens_per_s"], r["weight_copies"]] for r in gen])
    roof = []
    for r in (r for r in gen if r["batch"] == 1):
        peer = next(q for q in gen if q["batch"] == 1 and q["new_tokens"] == r["new_tokens"])
        limit = bandwidth["gbs"] * 1e9 / r["weight_bytes"]
        r.update(roofline_tokens_per_s=limit, of_roofline=r["tokens_per_s"] / limit,
                 vs_first=r["tokens_per_s"] / peer["tokens_per_s"])
        roof.append([r["variant"], r["new_tokens"], r["weight_bytes"] / 1e6, limit, r["tokens_per_s"],
                     f"{r['of_roofline']:.0%}", f"{r['vs_first']:.2f}x"])
    table(f"Batch 1 against the weight-bandwidth roofline ({bandwidth['gbs']:.1f} GB/s measured read bandwidth)",
          ["variant", "new tokens", "weight MB", "roofline tokens/s", "tokens/s", "of roofline",
           f"vs {VARIANTS[0].name}"], roof)
    mats = [r for r in records if r["kind"] == "matrix_time"]
    rows = []
    for v in VARIANTS:
        token = next((r for r in gen if r["variant"] == v.name and r["batch"] == 1), None)
        vm = [r for r in mats if r["variant"] == v.name]
        rows += [[v.name, r["matrix"], "x".join(map(str, r["shape"])), r["bytes"] / 1e6, r["us"], r["gbs"],
                  r["per_token"] * r["us"] / 1e3] for r in vm]
        if token and vm:
            matmul_ms = sum(r["per_token"] * r["us"] for r in vm) / 1e3
            rows.append([v.name, "all matrices / whole token (generate)", "", token["weight_bytes"] / 1e6, "",
                         "", f"{matmul_ms:.2f} / {token['ms_per_step']:.2f}"])
    table("Where a batch-1 token's time goes: each matrix alone (x @ W in a scan, median)",
          ["variant", "matrix", "shape", "MB", "us", "GB/s", "ms per token"], rows)
    att = [r for r in records if r["kind"] == "attempt"]
    if att:
        table("Speed attempts (A/B in this process, median)", ["what", "form", "ms", "vs first form"],
              [[r["what"], r["form"], r["ms"], f"{next(q['ms'] for q in att if q['what'] == r['what']) / r['ms']:.2f}x"]
               for r in att])
    per = {(r["path"], r["variant"], r["batch"], r["position"]): r["ms"] for r in records if r["kind"] == "per_token"}
    rows = []
    for b in args.batches if per else ():
        for q in args.positions:
            c, u = per.get(("cached", VARIANTS[0].name, b, q)), per.get(("uncached", VARIANTS[0].name, b, q))
            rows.append([b, q, c, u if u is not None else "not run", f"{u / c:.1f}x" if u else ""])
    if rows:
        table("Time for one token at position p (ms, whole batch)", ["batch", "position", "cached", "uncached",
                                                                     "uncached / cached"], rows)
    for b in args.batches:  # totals for the longest run: cached measured, uncached integrated from its curve
        n = max(args.new_tokens)
        pts = sorted((q, ms) for (path, _, bb, q), ms in per.items() if path == "uncached" and bb == b)
        cached_total = next(r["run_s"] for r in gen if r["batch"] == b and r["new_tokens"] == n
                            and r["variant"] == VARIANTS[0].name)
        if pts and pts[-1][0] >= args.prompt_len + n - 1:
            x, y = zip(*pts)
            ctx = np.arange(args.prompt_len, args.prompt_len + n)
            uncached_total = float(np.interp(ctx, x, y).sum()) / 1e3  # positions below the first point: its time
            rec = dict(kind="total_estimate", batch=b, new_tokens=n, cached_s=cached_total,
                       uncached_s_estimated=uncached_total, ratio=uncached_total / cached_total)
            records.append(rec)
            print(f"\nbatch {b}, {n} new tokens: cached {cached_total:.2f} s measured; uncached ~{uncached_total:.1f} s "
                  f"(sum of the per-position curve, linear between measured points) = {rec['ratio']:.0f}x")
    hf = [r for r in records if r["kind"] == "hf_generate"]
    if hf:
        table("vs transformers generate(use_cache=True), greedy, same weights",
              ["batch", "new tokens", "jaxgpt tokens/s", "transformers tokens/s", "jaxgpt / transformers",
               "greedy tokens identical up to"],
              [[r["batch"], r["new_tokens"], r["ours_tokens_per_s"], r["tokens_per_s"], f"{r['speedup']:.2f}x",
                ", ".join(map(str, r["greedy_agree_tokens"]))] for r in hf])
    mib = 2.0 ** 20
    table(f"KV-cache bytes (batch 1; context {args.context})",
          ["model", "cache", "KiB/token", f"MiB at {args.context}", "weights MiB (same dtype)", "cache / weights"],
          [[r["model"], r["cache"], r["bytes_per_token"] / 1024, r["bytes_full_context"] / mib,
            r["weights_bytes"] / mib, f"{r['bytes_full_context'] / r['weights_bytes']:.3f}"]
           for r in records if r["kind"] == "cache_bytes"])
    records.append(dict(kind="machine_end", loadavg_end=os.getloadavg()))
    tag = "" if args.preset == "gpt2" else f"_{args.preset}"
    with open(args.out / f"decode{tag}.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps({k: v for k, v in r.items() if k != "tokens"}) + "\n")
    if per:
        plot(records, args.out / f"decode_per_token{tag}.png", "GPT-2 124M" if args.preset == "gpt2" else args.preset)
    print(f"\nwrote {args.out / f'decode{tag}.jsonl'} and {args.out / f'decode_per_token{tag}.png'}; "
          f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
