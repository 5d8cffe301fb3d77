"""KV-cache memory: compressed caches vs bfloat16 for GPT-2 124M and 1.5B shapes at 1024 context.

Bytes are those of the cache pytree's real arrays (shapes and dtypes from `jax.eval_shape` of
`new_cache`, so nothing big is allocated): packed indices, norms, scales, QJL signs, channel
orders, rotations, QJL matrices and the lengths vector, everything `KVCache.nbytes` would count. For the
124M shape the caches are also allocated for real and `.nbytes` checked against those numbers and against
`compressed_cache_bytes`.

A second table gives the bytes per token (all layers, keys and values) with n_kv_head = n_head and
n_head / 4 (grouped-query attention: the cache holds only the key/value heads).

    python benchmarks/kv_memory.py [--context 1024] [--batch 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math

import jax

from jaxgpt.decode.cache_kinds import new_cache
from jaxgpt.decode.kv_compress import bits_per_value, compressed_cache_bytes
from jaxgpt.nn.config import GPTConfig

KINDS = ["bfloat16", "int8", "turbo4", "turbo3.5", "turbo3", "turbo3-prod", "turbo2.5", "turbo2", "uniform3"]
MODELS = {"GPT-2 124M": "gpt2", "GPT-2 1.5B": "gpt2-xl"}


def shaped_bytes(model_cfg: GPTConfig, batch: int, context: int, kind: str) -> int:
    """Bytes of every array of the cache, from abstract shapes and dtypes."""
    tree = jax.eval_shape(lambda: new_cache(kind, model_cfg, batch, context))
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


GQA_KINDS = ["float32", "bfloat16", "int8", "turbo3"]


def bytes_per_token(model_cfg: GPTConfig, kind: str, context: int) -> float:
    """Cache bytes per token of one row: the growth from context to 2 x context (constants cancel out)."""
    return (shaped_bytes(model_cfg, 1, 2 * context, kind) - shaped_bytes(model_cfg, 1, context, kind)) / context


def gqa_rows(context: int) -> list[dict]:
    """Bytes per token for n_kv_head = n_head and n_head / 4, GPT-2 124M and 1.5B shapes (1.5B: 25 heads,
    so the largest divisor <= 25 / 4 is 5)."""
    rows = []
    print("\nKV cache bytes per token (one row, all layers, keys and values) by key/value heads\n")
    print("| model | n_head | n_kv_head | kind | KiB/token | x smaller than n_kv_head = n_head |")
    print("|---|---:|---:|---|---:|---:|")
    for name, preset in MODELS.items():
        mha = GPTConfig.preset(preset)
        gqa = mha.replace(n_kv_head=GPTConfig.preset(preset, style="llama").n_kv_head)
        for kind in GQA_KINDS:
            full = bytes_per_token(mha, kind, context)
            for cfg in (mha, gqa):
                per = bytes_per_token(cfg, kind, context)
                rows.append({"table": "gqa", "model": name, "n_head": cfg.n_head, "n_kv_head": cfg.kv_heads,
                             "kind": kind, "bytes_per_token": per, "ratio_vs_mha": full / per})
                print(f"| {name} | {cfg.n_head} | {cfg.kv_heads} | {kind} | {per / 1024:.2f} | {full / per:.2f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()

    rows = []
    print(f"KV cache at context {args.context}, batch {args.batch} (MiB = 2^20 bytes)\n")
    print("| model | kind | bits/value | MiB | x smaller than bf16 | payload only x | real .nbytes |")
    print("|---|---|---:|---:|---:|---:|---|")
    for name, preset in MODELS.items():
        cfg = GPTConfig.preset(preset)
        bf16 = shaped_bytes(cfg, args.batch, args.context, "bfloat16")
        for kind in KINDS:
            nbytes = shaped_bytes(cfg, args.batch, args.context, kind)
            assert nbytes == compressed_cache_bytes(cfg, args.batch, args.context, kind), kind
            real = "-"
            if preset == "gpt2":  # allocate for real: .nbytes of the actual arrays
                cache = new_cache(kind, cfg, args.batch, args.context)
                real = "equal" if cache.nbytes == nbytes else f"DIFFERS: {cache.nbytes}"
                del cache
            bits = bits_per_value(cfg, kind)
            row = dict(model=name, kind=kind, bits_per_value=bits, bytes=nbytes, ratio_vs_bf16=bf16 / nbytes,
                       payload_ratio=16.0 / bits, real_nbytes=real)
            rows.append(row)
            print(f"| {name} | {kind} | {bits:.3f} | {nbytes / 2**20:.2f} | {bf16 / nbytes:.2f} | "
                  f"{16.0 / bits:.2f} | {real} |")
    best3 = {r["model"]: r["ratio_vs_bf16"] for r in rows if r["kind"] == "turbo3"}
    print("\nturbo3 vs bf16 (goal >= 4.5x): " + ", ".join(f"{m} {x:.2f}x" for m, x in best3.items()))
    rows += gqa_rows(args.context)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
