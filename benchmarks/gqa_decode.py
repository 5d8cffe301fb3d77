"""Grouped-query attention at decode time: cache bytes and decode-step time against full multi-head attention.

GPT-2 124M shape (12 heads) with n_kv_head = 12 (multi-head, GPT-2) and n_kv_head = 3 (n_head / 4), the same
random N(0, 0.02) weights elsewhere (speed does not depend on them), float32, greedy. A decode step is timed
as in `generate`'s loop: `--steps` steps in a `lax.scan` with the cache donated, the cache holding `--position`
tokens of `--context` slots already (attention reads all of them every step, masked). The two variants
alternate for `--rounds` rounds in one process, so load from other processes hits both; it prints each one's
median ms per step and its range, the median of the per-round ratios (GQA / MHA), the cache bytes per token and
for the whole context, and the machine's load average before and after.

    python benchmarks/gqa_decode.py                       # batch 8, context 1024, 5 rounds
    python benchmarks/gqa_decode.py --batch 1 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxgpt.decode.cache_kinds import new_cache
from jaxgpt.decode.kv_cache import cache_bytes
from jaxgpt.nn.config import GPTConfig
from jaxgpt.nn.model import GPT, init_params


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=1024, help="cache slots")
    p.add_argument("--position", type=int, default=1000, help="tokens already in the cache")
    p.add_argument("--steps", type=int, default=16, help="decode steps per timed call")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--kv-heads", type=int, nargs="+", default=[12, 3])
    p.add_argument("--json", default=None, help="also write the records here")
    return p.parse_args(argv)


def decode_steps(cfg: GPTConfig, steps: int):
    """run(params, tok [B, 1], cache) -> (tok, cache): `steps` greedy decode steps in a lax.scan."""
    model = GPT(cfg)

    @partial(jax.jit, donate_argnums=2)
    def run(params: Any, tok: jax.Array, cache: Any) -> tuple[jax.Array, Any]:
        def step(carry: tuple[jax.Array, Any], _: None) -> tuple[tuple[jax.Array, Any], None]:
            tok, cache = carry
            logits, cache = model.apply({"params": params}, tok, cache=cache)  # [B, 1, V]
            return (jnp.argmax(logits, axis=-1).astype(jnp.int32), cache), None

        return lax.scan(step, (tok, cache), None, length=steps)[0]

    return run


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load0 = os.getloadavg()
    base = GPTConfig.preset("gpt2", block_size=args.context)
    cfgs = {kv: base.replace(n_kv_head=kv) for kv in args.kv_heads}
    params = {kv: init_params(cfg, 0) for kv, cfg in cfgs.items()}
    runs = {kv: decode_steps(cfg, args.steps) for kv, cfg in cfgs.items()}
    tok = jnp.ones((args.batch, 1), jnp.int32)

    def cache_at(kv: int) -> Any:  # allocated and filled to the position before the clock starts
        c = new_cache("dense", cfgs[kv], args.batch, args.context)
        return jax.block_until_ready(c.replace(lengths=jnp.full((args.batch,), args.position, jnp.int32)))

    def timed(kv: int) -> float:
        cache = cache_at(kv)
        t = time.perf_counter()
        jax.block_until_ready(runs[kv](params[kv], tok, cache))
        return (time.perf_counter() - t) * 1e3 / args.steps

    for kv in cfgs:
        timed(kv)  # compile
    ms: dict[int, list[float]] = {kv: [] for kv in cfgs}
    for r in range(args.rounds):
        for kv in (list(cfgs) if r % 2 == 0 else list(cfgs)[::-1]):
            ms[kv].append(timed(kv))
    load1 = os.getloadavg()
    ref = args.kv_heads[0]
    print(f"decode step, GPT-2 124M shape, batch {args.batch}, {args.position} of {args.context} cache slots, "
          f"{args.steps} steps a call, {args.rounds} rounds (ms per step: median [min .. max])")
    records = []
    for kv in cfgs:
        per_token = cache_bytes(cfgs[kv], 1, 1)
        ratios = [m / r for m, r in zip(ms[kv], ms[ref])]
        rec = dict(n_kv_head=kv, batch=args.batch, context=args.context, position=args.position,
                   ms_per_step=statistics.median(ms[kv]), rounds_ms=ms[kv],
                   ratio_to_mha=statistics.median(ratios), cache_bytes_per_token=per_token,
                   cache_bytes_context=cache_bytes(cfgs[kv], args.batch, args.context))
        records.append(rec)
        print(f"  n_kv_head {kv:2d}: {rec['ms_per_step']:8.2f} [{min(ms[kv]):.2f} .. {max(ms[kv]):.2f}] ms, "
              f"{args.batch * 1e3 / rec['ms_per_step']:7.1f} tokens/s, per-round ratio to n_kv_head {ref}: "
              f"{rec['ratio_to_mha']:.3f} [{min(ratios):.3f} .. {max(ratios):.3f}]; cache {per_token / 1024:.1f} "
              f"KiB/token, {rec['cache_bytes_context'] / 2**20:.0f} MiB for batch x context")
    print(f"load average (1, 5, 15 min): before {load0[0]:.2f}, {load0[1]:.2f}, {load0[2]:.2f}; after "
          f"{load1[0]:.2f}, {load1[1]:.2f}, {load1[2]:.2f}; {os.cpu_count()} CPUs")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"records": records, "load_before": load0, "load_after": load1}, f, indent=1)


if __name__ == "__main__":
    main()
