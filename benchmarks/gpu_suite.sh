#!/usr/bin/env bash
# One GPU benchmark pass (< 8 minutes on one H100/H200): bf16 training tokens/s and MFU of GPT-2 124M at seq 1024
# (attention xla vs cudnn, remat none vs dots_saveable), decode tokens/s at batch 1 and 64 with the fraction of
# HBM bandwidth read (weights + KV cache bytes per step / step time / bandwidth), and int8-weight decode.
# Writes OUT/gpu_suite.json and OUT/gpu_suite.md.
#
#   benchmarks/gpu_suite.sh [OUT]            # on the GPU (default OUT: gpu_suite_out)
#   benchmarks/gpu_suite.sh --smoke [OUT]    # a tiny model on any backend (checks the script, not the figures)
# PYTHON picks the interpreter (default python3); jaxgpt is imported from this checkout, so it needs jax, flax,
# optax, orbax-checkpoint, chex and ml-collections installed, not jaxgpt itself.
set -euo pipefail
SMOKE=0
if [[ "${1:-}" == "--smoke" || "${1:-}" == "--tiny" ]]; then SMOKE=1; shift; fi
OUT="${1:-gpu_suite_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"  # absolute: the script runs from the repository root
cd "$(dirname "$0")/.."
SMOKE=$SMOKE OUT=$OUT "${PYTHON:-python3}" - <<'PY'
import json, os, time
import jax, jax.numpy as jnp, numpy as np
from jaxgpt.train import metrics
from jaxgpt.train import steps
from jaxgpt.io.atomic import write_json, write_text
from jaxgpt.nn.config import GPTConfig
from jaxgpt.decode import DecodeOptions, generate
from jaxgpt.decode.kv_cache import cache_bytes
from jaxgpt.nn.model import count_params, init_params
from jaxgpt.quantize import QuantConfig, quantize
from jaxgpt.sharding import activation_mesh
from jaxgpt.train.config import base_config, parts
from jaxgpt.train.program import build_program

smoke = os.environ["SMOKE"] == "1"
out = os.environ["OUT"]
dev = jax.devices()[0]
# HBM bandwidth, bytes/s, by device kind (substring match)
BANDWIDTH = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100": 2.0e12, "L4": 0.3e12}
bandwidth = next((v for k, v in BANDWIDTH.items() if k in dev.device_kind), None)
peak = metrics.device_peak_flops(dev)
if smoke:
    base = GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=64, dtype="bfloat16")
    B_train, iters, new_tokens, prompt = 4, 3, 32, 16
else:
    base = GPTConfig(vocab_size=50304, block_size=1024, dtype="bfloat16")  # 124M, bf16 compute, f32 master
    B_train, iters, new_tokens, prompt = 16, 20, 256, 128
rows = []


def timed(fn, n):
    fn()  # compile + warm up
    t0 = time.perf_counter()
    for _ in range(n):
        r = fn()
    jax.block_until_ready(r)
    return (time.perf_counter() - t0) / n


def best_of(fn, n):
    """The fastest of n timed calls after a warm-up: a whole generation is one call, and the least disturbed
    one is the closest to the device's own time."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return min(times)


def train_row(attention, remat):
    cfg = base.replace(attention=attention, remat=remat, scan_layers=True)
    p = parts(base_config())
    program = build_program(cfg, p.optim, p.mesh, grad_accum=1, batch_rows=B_train)  # the trainer's program
    params = init_params(cfg, 0)
    n_params = count_params(params)
    inward = jax.jit(program.layout.inward, out_shardings=program.shardings.state)  # stacked blocks
    state = [inward(steps.init_state(params, program.tx))]
    x = jax.random.randint(jax.random.PRNGKey(0), (1, B_train, cfg.block_size), 0, cfg.vocab_size)
    x = jax.device_put(x, program.shardings.batch)
    rng = jax.random.PRNGKey(1)

    def one():
        with activation_mesh(program.mesh):
            state[0], m = program.train_step(state[0], (x, x), rng, None)
        return m["loss"]

    dt = timed(one, iters)
    tps = B_train * cfg.block_size / dt
    mfu = None if peak is None else tps * metrics.flops_per_token(cfg.n_layer, cfg.block_size, cfg.n_embd, n_params) / peak
    return {"kind": "train", "attention": attention, "remat": remat, "batch": B_train, "seq": cfg.block_size,
            "step_s": dt, "tokens_per_s": tps, "mfu": mfu}


def decode_row(batch, weights):
    cfg = base
    params = init_params(cfg, 0)
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    if weights == "int8":
        params = quantize(params, QuantConfig(bits=8))
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt)).astype(np.int32)
    run = lambda n: generate(params, cfg, prompts, n, DecodeOptions(temperature=0.0)).tokens  # noqa: E731
    t_short = best_of(lambda: run(1), 5)  # prefill (and one token): subtracted below
    t_long = best_of(lambda: run(new_tokens + 1), 5)
    if t_long <= t_short:
        raise SystemExit(f"decode timing too noisy (batch {batch}, {weights}): rerun on an idle device")
    per_step = (t_long - t_short) / new_tokens
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    kv = cache_bytes(cfg, batch, prompt + new_tokens + 1, jnp.bfloat16) * (prompt + new_tokens / 2) / (prompt + new_tokens + 1)
    frac = None if bandwidth is None else (weight_bytes + kv) / per_step / bandwidth
    return {"kind": "decode", "weights": weights, "batch": batch, "step_s": per_step,
            "tokens_per_s": batch / per_step, "bytes_per_step": weight_bytes + kv, "hbm_fraction": frac}


attns = ["xla", "cudnn"] if dev.platform == "gpu" else ["xla"]
for attention in attns:
    for remat in ("none", "dots_saveable"):
        rows.append(train_row(attention, remat)); print(rows[-1], flush=True)
for batch, weights in ((1, "bf16"), (64, "bf16"), (1, "int8"), (64, "int8")):
    rows.append(decode_row(batch if not smoke else min(batch, 4), weights)); print(rows[-1], flush=True)

fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
md = [f"device: {dev.device_kind} ({dev.platform}); smoke={smoke}", "",
      "| run | setting | batch | tokens/s | MFU / HBM fraction |", "|---|---|---:|---:|---:|"]
for r in rows:
    if r["kind"] == "train":
        md.append(f"| train | attention={r['attention']} remat={r['remat']} | {r['batch']} | "
                  f"{r['tokens_per_s']:,.0f} | {fmt(r['mfu'], '.1%')} |")
    else:
        md.append(f"| decode | {r['weights']} weights | {r['batch']} | {r['tokens_per_s']:,.0f} | "
                  f"{fmt(r['hbm_fraction'], '.1%')} |")
write_json(f"{out}/gpu_suite.json", {"device": dev.device_kind, "smoke": smoke, "rows": rows})
write_text(f"{out}/gpu_suite.md", "\n".join(md) + "\n")
print("\n".join(md))
PY
