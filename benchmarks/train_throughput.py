"""Training throughput (tokens/s) and MFU at a model shape, for several device meshes in one run.

Each mesh "DxF" is data=D by fsdp=F over the first D*F devices; "1x1" is the single-device peer every other
row is compared with. The step is the library's own train program (`jaxgpt.train.program.build_program`, the one
train.py runs: AdamW with clipping and nanoGPT's schedule) jitted with the shardings of
`jaxgpt.train.steps.mesh_shardings_fn`, so FSDP meshes pay their all-gathers and reduce-scatters.

On a CPU, --devices N splits the host into N fake XLA devices (they share the same cores and memory, so this
shows the cost of the sharded program, not a speed-up; a mesh whose replicated state would not fit in host
memory is refused up front, e.g. 8x1 at 124M needs ~16 GiB). MFU needs a peak: known accelerators are looked up; otherwise
pass --peak-tflops (per device), or it prints n/a.

    python benchmarks/train_throughput.py --size gpt2 --devices 8 --mesh 1x1 --mesh 2x4 --mesh 1x8 \\
        --batch 8 --seq 64 --steps 2
    python benchmarks/train_throughput.py --size nano --devices 8 --batch 16 --steps 5  # 1x1, 8x1, 2x4
    python benchmarks/train_throughput.py --size gpt2 --batch 16 --seq 1024 --dtype bfloat16 --attention cudnn
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="gpt2", help="GPTConfig preset: gpt2 (124M), gpt2-medium, nano, tiny, ...")
    p.add_argument("--mesh", action="append", default=None,
                   help="DATAxFSDP, repeatable (default: 1x1, then Nx1 and 2x(N/2) for N devices)")
    p.add_argument("--devices", type=int, default=None,
                   help="CPU only: split the host into this many XLA devices (sets XLA_FLAGS before jax loads)")
    p.add_argument("--batch", type=int, default=8, help="global batch (rows); must divide by each mesh's size")
    p.add_argument("--seq", type=int, default=64, help="tokens per row (<= block_size)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per mesh (after one warm-up step)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument("--attention", default="xla", choices=["xla", "cudnn", "manual"])
    p.add_argument("--min-size", type=int, default=None, help="leaves below this many elements are replicated")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s per device, for MFU")
    p.add_argument("--out", type=Path, default=None, help="append one JSON line per mesh to this file")
    return p.parse_args(argv)


def parse_mesh(text: str) -> tuple[int, int]:
    try:
        data, fsdp = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--mesh {text!r} is not DATAxFSDP; write it like 2x4") from None
    return data, fsdp


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (Linux), else None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.devices:  # must happen before jax is imported
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={args.devices}").strip()

    import jax
    import numpy as np
    from tqdm import tqdm

    from jaxgpt import sharding as sh
    from jaxgpt.nn import weights
    from jaxgpt.nn.config import GPTConfig
    from jaxgpt.nn.model import init_params
    from jaxgpt.train import config as train_config
    from jaxgpt.train import metrics, steps
    from jaxgpt.train.program import build_program

    cfg = GPTConfig.preset(args.size, dtype=args.dtype, attention=args.attention)
    if args.seq > cfg.block_size:
        raise SystemExit(f"--seq {args.seq} exceeds block_size {cfg.block_size} of --size {args.size}")
    n = jax.device_count()
    meshes = [parse_mesh(m) for m in args.mesh] if args.mesh else [(1, 1)] + ([(n, 1), (2, n // 2)] if n > 1 else [])
    if (1, 1) not in meshes:
        meshes.insert(0, (1, 1))
    for d, f in meshes:
        if d * f > n:
            raise SystemExit(f"mesh {d}x{f} needs {d * f} devices but there are {n}; use --devices on CPU")
        if args.batch % (d * f):
            raise SystemExit(f"--batch {args.batch} does not split over mesh {d}x{f}; use a multiple of {d * f}")

    # FLOPs per token (PaLM appendix B / nanoGPT): 6 per weight that is multiplied (every weight but the
    # position table; the tied wte counts once, as the head) + 12 * layers * seq * width for attention.
    n_params = weights.count_params(jax.eval_shape(lambda: init_params(cfg, 0)))
    n_matmul = n_params - (cfg.block_size * cfg.n_embd if cfg.pos_embedding == "learned" else 0)
    flops_per_token = metrics.flops_per_token(cfg.n_layer, args.seq, cfg.n_embd, n_matmul)
    device = jax.devices()[0]
    peak = args.peak_tflops * 1e12 if args.peak_tflops else metrics.device_peak_flops(device)

    if device.platform == "cpu":  # fake devices share host memory: refuse meshes that cannot fit
        avail = available_memory()
        for d, f in meshes:
            need = d * 4 * n_params * 4  # params, grads, Adam mu and nu in f32, replicated `data` times
            if avail and need > 0.6 * avail:
                raise SystemExit(f"mesh {d}x{f} would keep ~{need / 2**30:.1f} GiB of params, grads and Adam "
                                 f"moments in host memory ({avail / 2**30:.1f} GiB available); use more fsdp "
                                 "(e.g. 1x8) or a smaller --size")

    config = train_config.base_config()  # the optimizer train.py builds by default
    if args.min_size is not None:
        config.mesh.min_shard_size = args.min_size
    optim = train_config.OptimConfig.of(config)

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, size=(1, args.batch, args.seq + 1), dtype=np.int32)  # [A, B, T+1]
    cfg = cfg.replace(block_size=args.seq) if cfg.pos_embedding != "learned" else cfg
    print(f"{args.size}: {n_params / 1e6:.4g}M params, batch {args.batch} x seq {args.seq}, {args.dtype}, "
          f"{n} x {device.device_kind} ({device.platform}), {args.steps} timed steps per mesh", flush=True)

    rows = []
    bar = tqdm(total=len(meshes) * (args.steps + 1), desc="steps", file=sys.stderr)
    for data, fsdp in meshes:
        config.mesh.data, config.mesh.fsdp = data, fsdp
        program = build_program(cfg, optim, train_config.MeshConfig.of(config.mesh), grad_accum=1,
                                batch_rows=args.batch, devices=jax.devices()[: data * fsdp])
        mesh, shardings = program.mesh, program.shardings
        state = jax.jit(lambda key: program.layout.inward(steps.init_state(init_params(cfg, key), program.tx)),
                        out_shardings=shardings.state)(jax.random.PRNGKey(0))
        batch = jax.device_put((tokens[..., :-1], tokens[..., 1:]), (shardings.batch,) * 2)
        rng_key = jax.device_put(jax.random.PRNGKey(1), shardings.rng)
        t0 = time.perf_counter()
        with sh.activation_mesh(mesh):  # as the trainer lowers it
            compiled = program.train_step.lower(state, batch, rng_key, None).compile()
        compile_s = time.perf_counter() - t0
        state, m = compiled(state, batch, rng_key, None)  # warm-up
        loss = m["loss"].block_until_ready()
        bar.update()
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            state, m = compiled(state, batch, rng_key, None)
            loss = m["loss"].block_until_ready()
            times.append(time.perf_counter() - t0)
            bar.update()
        step_s = statistics.median(times)
        tps = args.batch * args.seq / step_s
        state_bytes = max(sum(s.data.nbytes for leaf in jax.tree.leaves(state)
                              for s in leaf.addressable_shards if s.device == dev) for dev in mesh.devices.flat)
        mfu = flops_per_token * tps / (peak * data * fsdp) if peak else None
        rows.append(dict(size=args.size, mesh=f"{data}x{fsdp}", devices=data * fsdp, batch=args.batch, seq=args.seq,
                         dtype=args.dtype, compile_s=compile_s, step_s=step_s, tokens_per_s=tps, mfu=mfu,
                         state_mib_per_device=state_bytes / 2**20, loss=float(loss), device=device.device_kind))
        del state
    bar.close()

    base = rows[0]["tokens_per_s"]
    print("\n| mesh (data x fsdp) | devices | compile s | step s | tokens/s | vs 1x1 | MFU | "
          "params+Adam MiB/device |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"| {r['mesh']} | {r['devices']} | {r['compile_s']:.1f} | {r['step_s']:.2f} | {r['tokens_per_s']:,.0f} "
              f"| {r['tokens_per_s'] / base:.2f}x | {mfu} | {r['state_mib_per_device']:,.1f} |")
    print(f"\nFLOPs/token {flops_per_token:.4g}; peak {'n/a' if peak is None else f'{peak / 1e12:.4g} TFLOP/s'}"
          " per device")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
