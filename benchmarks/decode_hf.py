"""Batch-1 decode speed of a Llama-family checkpoint: jaxgpt against transformers' `generate`, same weights,
same process, float32 and int8 weights.

    python -m benchmarks.decode_hf                       # SmolLM2-135M's shape, random weights
    python -m benchmarks.decode_hf --layers 4 --rounds 3  # quick check

A random `transformers.LlamaForCausalLM` of SmolLM2-135M's shape (hidden 576, 30 layers, 9 heads, 3 kv heads,
intermediate 1536, vocab 49152, tied, rope_theta 100000) is saved with save_pretrained and loaded into jaxgpt
with `jaxgpt.io.hf.load_hf`, so both sides hold the same weights. Each variant decodes `--new` tokens greedily
after a `--prompt`-token prompt at batch 1, end to end (prefill included), after one warm-up call (jaxgpt's
compile). Rounds alternate the variants, so a load that changes over the run touches each alike; the table
gives medians and ranges of tokens/s, each round's speed over transformers float32's (the same round, so a
shared machine's load changes cancel) and their median, and the load average before and after.

Variants: jaxgpt float32 (`jaxgpt.decode.generate`: prefill and a lax.scan in one jit), jaxgpt int8 (the
sampling CLI's `--quantize int8`: int8 per output channel, embeddings and head too), transformers float32
(`generate`, do_sample=False, its default DynamicCache and SDPA attention) and transformers int8
(torch's dynamic int8 quantization of every nn.Linear, when this torch still has it). jaxgpt's greedy tokens
are checked equal to transformers' in float32 before anything is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from typing import Any, Callable

import numpy as np

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, rms_norm_eps=1e-5,
                    tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
                    bos_token_id=None, eos_token_id=None)


def hf_model(layers: int, folder: str) -> Any:
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": layers})
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    return model


def torch_int8(model: Any) -> Any | None:
    """torch's dynamic int8 quantization of every nn.Linear (None when this torch no longer offers it)."""
    import copy

    import torch

    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError:
        return None
    try:
        return quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8).eval()
    except Exception as e:  # noqa: BLE001 - an unsupported backend fails in several ways
        print(f"  torch int8 unavailable: {type(e).__name__}: {e}")
        return None


def hf_decoder(model: Any, prompt: np.ndarray, new: int) -> Callable[[], np.ndarray]:
    import torch

    ids = torch.tensor(prompt)

    def run() -> np.ndarray:
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        return out[:, prompt.shape[1]:].numpy()

    return run


def jax_decoder(params: Any, cfg: Any, prompt: np.ndarray, new: int) -> Callable[[], np.ndarray]:
    from jaxgpt.decode import DecodeOptions, generate

    options = DecodeOptions(temperature=0)
    tokens = prompt.tolist()

    def run() -> np.ndarray:
        return np.asarray(generate(params, cfg, tokens, new, options).tokens)  # waits for the result

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new", type=int, default=64, help="tokens generated per call")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args()

    import jax
    import torch

    from jaxgpt.io.hf import load_hf
    from jaxgpt.io.workdir import transform_params

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as d:
        model = hf_model(args.layers, d)
        cfg, params = load_hf(d)
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, args.prompt))
    variants = {"jaxgpt float32": jax_decoder(params, cfg, prompt, args.new),
                "jaxgpt int8": jax_decoder(transform_params(params, None, "int8"), cfg, prompt, args.new),
                "transformers float32": hf_decoder(model, prompt, args.new)}
    q = torch_int8(model)
    if q is not None:
        variants["transformers int8"] = hf_decoder(q, prompt, args.new)
    firsts = {name: run() for name, run in variants.items()}  # warm-up: compiles jaxgpt's programs
    same = bool(np.array_equal(firsts["jaxgpt float32"], firsts["transformers float32"]))
    print(f"  jaxgpt float32 greedy tokens == transformers': {same}")
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.rounds):
        for name, run in variants.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
        print(f"  round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {args.new / v[-1]:.1f}" for k, v in times.items()),
              flush=True)
    load_after = os.getloadavg()

    rows = []
    ref_times = times["transformers float32"]
    for name, ts in times.items():
        tps = [args.new / t for t in ts]
        ratios = [r / t for r, t in zip(ref_times, ts)]  # this round's speed over transformers float32's
        rows.append({"variant": name, "median_tokens_per_s": float(np.median(tps)), "min": min(tps), "max": max(tps),
                     "median_round_ratio": float(np.median(ratios)), "round_ratios": ratios})
    print(f"\nbatch-1 greedy decode, SmolLM2-135M shape ({args.layers} layers), {args.new} new tokens after a "
          f"{args.prompt}-token prompt (prefill included), median of {args.rounds} alternating rounds; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}, jax {jax.__version__}, torch {torch.__version__}; load average "
          f"{load_before[0]:.2f} before, {load_after[0]:.2f} after")
    print("| variant | tokens/s (median) | range | vs transformers float32 (median of the rounds' ratios) | "
          "each round's ratio |")
    print("|---|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['median_tokens_per_s']:.1f} | {r['min']:.1f} - {r['max']:.1f} | "
              f"{r['median_round_ratio']:.2f}x | {', '.join(f'{x:.2f}' for x in r['round_ratios'])} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"layers": args.layers, "prompt": args.prompt, "new": args.new, "rounds": args.rounds,
                       "greedy_tokens_equal": same, "load_before": load_before, "load_after": load_after,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
