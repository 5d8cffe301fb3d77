"""LoRA train-step time and memory: activation space (lora.wrap) vs weight space (lora.apply_lora) vs peft on
transformers (torch, CPU), same process, GPT-2 124M shape, random weights.

    python -m benchmarks.lora                         # rank 8, batch 2 x 64 tokens, 5 timed steps
    python -m benchmarks.lora --batch 1 --seq 32      # quicker
    python -m benchmarks.lora --preset nano           # seconds: a smoke run

Targets: "all" (attn/c_attn, attn/c_proj, mlp/c_fc, mlp/c_proj in every block) and "q/v" (the q and v
thirds of c_attn). peft cannot slice the fused c_attn, so its q/v peer is the exact equivalent lora.save_peft
writes: one rank-2r adapter of the whole c_attn. Each step is value_and_grad of the next-token loss w.r.t.
the adapters plus an AdamW update (optax / torch.optim). Memory of a jaxgpt step is XLA's own account of the
compiled program (arguments + outputs + temporaries, `memory_analysis()`); torch has no such count on CPU,
so peft's column is empty. Also: QLoRA on an int8 base (time, and base bytes against float32).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgpt import lora
from jaxgpt.nn.config import GPTConfig
from jaxgpt.nn.model import GPT, init_params
from jaxgpt.quantize import QuantConfig, quantize, size_report

TARGETS = {"all": ("all",), "q/v": ("attn/c_attn/q", "attn/c_attn/v")}


def _median_time(fn: Any, steps: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def jax_step(cfg: GPTConfig, base: Any, lcfg: lora.LoraConfig, transform: Any, toks: jax.Array,
             steps: int) -> dict[str, float]:
    """Median seconds of one jitted LoRA train step, and the compiled program's memory."""
    opt = optax.adamw(1e-4)

    def loss(ad, params, batch):
        logits = GPT(cfg).apply({"params": transform(params, ad, lcfg)}, batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    @jax.jit
    def step(ad, st, params, batch):
        value, g = jax.value_and_grad(loss)(ad, params, batch)
        upd, st = opt.update(g, st, ad)
        return optax.apply_updates(ad, upd), st, value

    ad = lora.init_lora(0, base, lcfg)
    st = opt.init(ad)
    mem = step.lower(ad, st, base, toks).compile().memory_analysis()
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    state = [ad, st]

    def run() -> None:
        state[0], state[1], value = step(state[0], state[1], base, toks)
        value.block_until_ready()

    return {"step_s": _median_time(run, steps), "peak_bytes": float(peak), "temp_bytes": float(mem.temp_size_in_bytes)}


def peft_step(cfg: GPTConfig, name: str, rank: int, alpha: float, toks: np.ndarray, steps: int) -> dict[str, float]:
    """Median seconds of one peft LoRA train step on a transformers GPT2LMHeadModel of cfg's shape."""
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    if name == "all":
        pcfg = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["c_attn", "c_proj", "c_fc"],
                               fan_in_fan_out=True, lora_dropout=0.0)
    else:  # q/v as save_peft writes it: one rank-2r c_attn adapter with the scale kept
        pcfg = peft.LoraConfig(r=2 * rank, lora_alpha=2 * alpha, target_modules=["c_attn"], fan_in_fan_out=True,
                               lora_dropout=0.0)
    model = peft.get_peft_model(hf, pcfg).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x, y = torch.as_tensor(toks[:, :-1]), torch.as_tensor(toks[:, 1:])

    def run() -> None:
        logits = model(x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()

    return {"step_s": _median_time(run, steps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant (median), after one warm-up")
    ap.add_argument("--no-peft", action="store_true", help="skip the torch peer")
    args = ap.parse_args()

    cfg = GPTConfig.preset(args.preset)
    base = init_params(cfg, 0)
    qbase = quantize(base, QuantConfig())
    toks_np = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq + 1))
    toks = jnp.asarray(toks_np, jnp.int32)
    rows = []
    for name, targets in TARGETS.items():
        lcfg = lora.LoraConfig(rank=args.rank, alpha=args.alpha, targets=targets)
        r = {"targets": name,
             "activation": jax_step(cfg, base, lcfg, lora.wrap, toks, args.steps),
             "weight": jax_step(cfg, base, lcfg, lora.apply_lora, toks, args.steps),
             "qlora_int8": jax_step(cfg, qbase, lcfg, lora.wrap, toks, args.steps)}
        if not args.no_peft:
            r["peft"] = peft_step(cfg, name, args.rank, args.alpha, toks_np, args.steps)
        rows.append(r)

    print(f"\n{args.preset}, rank {args.rank}, batch {args.batch} x {args.seq} tokens, median of {args.steps} "
          f"steps, {platform.processor() or platform.machine()}, jax {jax.__version__}")
    print("| targets | activation s | weight s | peft s | QLoRA int8 s | act vs weight | act vs peft "
          "| act peak MiB | weight peak MiB | act / weight peak |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        a, w, q = r["activation"], r["weight"], r["qlora_int8"]
        p = r.get("peft", {}).get("step_s", float("nan"))
        print(f"| {r['targets']} | {a['step_s']:.3f} | {w['step_s']:.3f} | {p:.3f} | {q['step_s']:.3f} "
              f"| {w['step_s'] / a['step_s']:.2f}x | {p / a['step_s']:.2f}x | {a['peak_bytes'] / 2**20:.0f} "
              f"| {w['peak_bytes'] / 2**20:.0f} | {a['peak_bytes'] / w['peak_bytes']:.2f} |")
    blocks = size_report(qbase)
    whole = size_report(quantize(base, QuantConfig(embeddings=True)))
    print(f"\nQLoRA int8 base bytes / float32: block kernels {blocks['quantized_ratio']:.3f}, whole model with "
          f"blocks only {blocks['total_ratio']:.3f}, whole model with wte/wpe too {whole['total_ratio']:.3f}")
    print(json.dumps({"rows": rows, "int8_blocks": blocks, "int8_with_embeddings": whole}))


if __name__ == "__main__":
    main()
