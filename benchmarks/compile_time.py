"""Compile time of the trainer's step, scanned layers against unrolled, at several depths.

The step is the one `jaxgpt.aot` compiles (`aot.train_program`: the trainer's jitted step, its shardings and
its state layout) for the local devices. Each row times tracing, lowering and XLA's compile separately and
counts the lines of the HLO handed to XLA; the ratio column divides the scanned total by the unrolled one at
the same depth. Defaults: GPT-2 XL's width (n_embd 1600, 25 heads), batch 1 x 1024, bf16 compute, AdamW.

    python benchmarks/compile_time.py [--layers 4 48] [--remat none] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

from jaxgpt import aot
from jaxgpt import sharding as sh
from jaxgpt.train import config as train_config


def config_for(n_layer: int, scan: bool, remat: str, n_embd: int, n_head: int) -> object:
    c = train_config.load_config_file(os.path.join(os.path.dirname(__file__), "..", "configs", "gpt2_124m.py"))
    c.model.update(n_layer=n_layer, n_embd=n_embd, n_head=n_head, scan_layers=scan, remat=remat)
    c.mesh.update(data=1, fsdp=1)
    c.grad_accum = 1
    return c


def time_compile(config: object) -> dict[str, float]:
    """Seconds to trace, lower and compile the train step at one row a device, and the HLO's line count."""
    import jax

    step, args, mesh, _ = aot.train_program(config, list(jax.devices()), 1)
    with sh.activation_mesh(mesh):
        t0 = time.perf_counter()
        traced = step.trace(*args)
        t1 = time.perf_counter()
        lowered = traced.lower()
        t2 = time.perf_counter()
        lowered.compile()
        t3 = time.perf_counter()
    return {"trace_s": t1 - t0, "lower_s": t2 - t1, "compile_s": t3 - t2, "total_s": t3 - t0,
            "hlo_lines": lowered.as_text().count("\n")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 48])
    parser.add_argument("--remat", default="none")
    parser.add_argument("--n_embd", type=int, default=1600)
    parser.add_argument("--n_head", type=int, default=25)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()

    rows = []
    print(f"train step compile time, n_embd {args.n_embd}, remat {args.remat}, batch 1 x 1024, bf16\n")
    print("| layers | scan_layers | trace s | lower s | XLA compile s | total s | HLO lines | scanned / unrolled |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for n in args.layers:
        unrolled = None
        for scan in (False, True):
            r = {"n_layer": n, "scan_layers": scan, "remat": args.remat,
                 **time_compile(config_for(n, scan, args.remat, args.n_embd, args.n_head))}
            ratio = f"{r['total_s'] / unrolled['total_s']:.2f}" if scan else "1"
            unrolled = unrolled or r
            rows.append(r)
            print(f"| {n} | {scan} | {r['trace_s']:.1f} | {r['lower_s']:.1f} | {r['compile_s']:.1f} | "
                  f"{r['total_s']:.1f} | {r['hlo_lines']:,} | {ratio} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
