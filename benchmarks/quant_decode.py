"""Batch-1 decode speed with int8 / int4 weights vs float32, same model, same run.

    python -m benchmarks.quant_decode                # GPT-2 124M shape, random weights
    python -m benchmarks.quant_decode --preset nano  # quick check

Decoding one token reads every weight once, so at batch 1 it is bound by the bytes of weights read per
token; int8 weights should make it faster, not only smaller. The loop is a jitted `lax.scan` over
`GPT.apply(..., cache=...)` (prefill excluded from the timing). For each variant the table also counts the
float buffers with a weight's shape in the compiled program: written at every decode step (in the loop
body) / once per call (hoisted out of the loop). 0 / 0 means no dequantized copy of any weight exists.

Peer "int8 [in,out] naive" stores the int8 kernel in the Dense layout and computes
`(x @ q.astype(f32)) * scale`: XLA:CPU then writes a float copy of each weight (and hoists it out of the
loop), which is what jaxgpt.quantize's [out, in] layout and fused GEMV avoid.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from tqdm import tqdm

from jaxgpt.decode.cache_kinds import new_cache
from jaxgpt.nn.config import GPTConfig
from jaxgpt.nn.model import GPT, init_params
from jaxgpt.quantize import (
    QuantConfig,
    QuantizedArray,
    hlo_float_buffers,
    quantize,
    size_report,
)


@flax.struct.dataclass
class NaiveInt8:
    """The obvious int8 kernel: q [in, out] int8, scale [1, out]; y = (x @ q.astype(dtype)) * scale."""

    q: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape

    def matmul(self, x: jax.Array, dtype: Any) -> jax.Array:
        return jnp.dot(x.astype(dtype), self.q.astype(dtype)) * self.scale.astype(dtype)


def naive_int8(params: Any) -> Any:
    """Every Dense kernel of the blocks as a NaiveInt8 (same integers as jaxgpt.quantize per_channel)."""
    qp = quantize(params, QuantConfig())

    def conv(x: Any) -> Any:
        if isinstance(x, QuantizedArray):
            return NaiveInt8(q=x.values.T, scale=x.scales.reshape(1, -1))
        return x

    return jax.tree.map(conv, qp, is_leaf=lambda x: isinstance(x, QuantizedArray))


def weight_bytes(params: Any) -> int:
    return sum(int(x.nbytes) for x in jax.tree.leaves(params))


def make_decode(cfg: GPTConfig, steps: int):
    model = GPT(cfg)

    def prefill(params: Any, prompt: jax.Array, cache: Any) -> tuple[jax.Array, Any]:
        logits, cache = model.apply({"params": params}, prompt, cache=cache)
        return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache  # [B], cache

    def decode(params: Any, tok: jax.Array, cache: Any) -> jax.Array:
        def step(carry, _):
            tok, cache = carry
            logits, cache = model.apply({"params": params}, tok[:, None], cache=cache)  # [B, 1, V]
            nxt = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
            return (nxt, cache), nxt

        _, toks = lax.scan(step, (tok, cache), None, length=steps)
        return toks  # [steps, B]

    return jax.jit(prefill), jax.jit(decode)


def weight_shapes(params: Any) -> set[tuple[int, ...]]:
    """Shapes (both layouts) of every 2-D weight matrix."""
    shapes = set()
    for x in jax.tree.leaves(params, is_leaf=lambda x: hasattr(x, "matmul")):
        s = tuple(x.shape)
        if len(s) == 2 and min(s) > 1:
            shapes |= {s, s[::-1]}
    return shapes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--steps", type=int, default=32, help="decode steps timed per repeat")
    ap.add_argument("--prompt", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--variants", default="fp32,naive,int8,int8_all,int4_all")
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args()

    cfg = GPTConfig.preset(args.preset)
    params = init_params(cfg, 0)
    group = min(128, cfg.n_embd)
    builders = {
        "fp32": ("float32 (peer)", lambda: params),
        "naive": ("int8 [in,out] naive", lambda: naive_int8(params)),
        "int8": ("int8 per-channel, blocks", lambda: quantize(params, QuantConfig())),
        "int8_all": ("int8 per-channel, + wte", lambda: quantize(params, QuantConfig(embeddings=True))),
        "int4_all": (f"int4 group-{group}, + wte", lambda: quantize(
            params, QuantConfig(bits=4, granularity="group", group_size=group, embeddings=True))),
    }
    prefill, decode = make_decode(cfg, args.steps)
    prompt = jax.random.randint(jax.random.PRNGKey(1), (1, args.prompt), 0, cfg.vocab_size)
    shapes = weight_shapes(params)
    runs = {}
    for key in args.variants.split(","):  # build and compile everything first
        name, build = builders[key]
        p = build()
        cache = new_cache("float32", cfg, 1, args.prompt + args.steps)
        tok, cache = prefill(p, prompt, cache)
        compiled = decode.lower(p, tok, cache).compile()
        bufs = [(s, in_loop) for _, s, in_loop in hlo_float_buffers(compiled.as_text()) if s in shapes]
        copies = (sum(in_loop for _, in_loop in bufs), sum(not in_loop for _, in_loop in bufs))
        jax.block_until_ready(compiled(p, tok, cache))  # warm up
        runs[key] = (name, p, compiled, (p, tok, cache), copies)
        print(f"  compiled {name}", flush=True)
    # interleave the variants round by round, so a machine whose load changes affects all of them alike
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in tqdm(range(args.repeats), desc="rounds"):
        for key, (_, _, compiled, call_args, _) in runs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*call_args))
            times[key].append(time.perf_counter() - t0)
    rows = []
    for key, (name, p, _, _, n_copies) in runs.items():
        best = min(times[key])
        rows.append({"variant": key, "name": name, "weight_bytes": weight_bytes(p),
                     "tokens_per_s": args.steps / best, "ms_per_token": 1e3 * best / args.steps,
                     "median_tokens_per_s": args.steps / float(np.median(times[key])),
                     "float_weight_copies_per_step": n_copies[0], "float_weight_copies_per_call": n_copies[1]})
        if key not in ("fp32", "naive"):
            rows[-1]["quantized_ratio"] = size_report(p)["quantized_ratio"]

    base = next((r for r in rows if r["variant"] == "fp32"), rows[0])
    print(f"\nbatch-1 decode, {args.preset} shape ({cfg.n_layer}L {cfg.n_embd}C, vocab {cfg.vocab_size}), "
          f"{args.steps} steps after a {args.prompt}-token prefill, best of {args.repeats} interleaved rounds; "
          f"{jax.devices()[0].device_kind} ({platform.processor() or platform.machine()})")
    print("| variant | weight MB | tokens/s (best) | tokens/s (median) | ms/token | speed vs fp32 | bytes vs fp32 "
          "| float weight copies per step / per call |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['name']} | {r['weight_bytes'] / 1e6:.1f} | {r['tokens_per_s']:.1f} | {r['median_tokens_per_s']:.1f} "
              f"| {r['ms_per_token']:.1f} | "
              f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x | {r['weight_bytes'] / base['weight_bytes']:.3f}x | "
              f"{r['float_weight_copies_per_step']} / {r['float_weight_copies_per_call']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "steps": args.steps, "prompt": args.prompt,
                       "device": jax.devices()[0].device_kind, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
