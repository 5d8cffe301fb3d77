"""HellaSwag scoring speed: `jaxgpt.eval.hellaswag.evaluate` vs the transformers recipe, same process.

    python benchmarks/eval.py                  # GPT-2 124M shape, random float32 weights, 64 examples
    python benchmarks/eval.py --quick          # nano shape: a smoke run

Both score the same HellaSwag-format examples on the same weights (a random transformers GPT2LMHeadModel
saved to a temporary folder, read by jaxgpt with `load_hf_gpt2`), `--batch-size` examples (4 rows each)
per forward, examples sorted by length for both. The transformers reference is build-nanogpt's recipe
batched: the rows context + ending right-padded into one [4E, T] forward, cross-entropy over the ending
tokens. jaxgpt runs each context once and the endings on its KV cache, in a handful of compiled shapes.
jaxgpt is timed twice: the first pass compiles, the second is the steady speed. Both must pick the same
endings (acc, acc_norm) for the figures to count.

The examples are made from tinyshakespeare (no download): context and ending lengths drawn to resemble
HellaSwag's validation set (contexts of 10-60 words, endings of 5-25).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def make_examples(n: int, seed: int = 0) -> list[dict]:
    words = (SHARED / "tinyshakespeare.txt").read_text().split()
    rng = np.random.default_rng(seed)

    def span(lo: int, hi: int) -> str:
        k = int(rng.integers(lo, hi))
        s = int(rng.integers(0, len(words) - k))
        return " ".join(words[s:s + k])

    return [{"ctx": span(10, 60), "endings": [span(5, 25) for _ in range(4)], "label": int(rng.integers(0, 4))}
            for _ in range(n)]


def torch_evaluate(model, tokenizer, examples: list[dict], batch_size: int) -> dict:
    """The transformers recipe, `batch_size` examples (4 rows each) per forward; returns acc and acc_norm."""
    import torch
    import torch.nn.functional as F

    pred, pred_norm = [], []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        rows, spans = [], []
        for ex in chunk:
            ctx = tokenizer.encode(ex["ctx"])
            for e in ex["endings"]:
                end = tokenizer.encode(" " + e)
                rows.append(ctx + end)
                spans.append((len(ctx), len(ctx) + len(end)))
        T = max(len(r) for r in rows)
        tokens = torch.zeros((len(rows), T), dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.bool)
        for b, (r, (s, e)) in enumerate(zip(rows, spans)):
            tokens[b, :len(r)] = torch.tensor(r)
            mask[b, s:e] = True
        with torch.no_grad():
            logits = model(tokens).logits  # [4E, T, V]
        losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")  # [4E, T-1]
        losses = losses * mask[:, 1:]
        sums = losses.sum(1).view(-1, 4)
        means = sums / mask[:, 1:].sum(1).view(-1, 4)
        pred += sums.argmin(1).tolist()
        pred_norm += means.argmin(1).tolist()
    labels = np.array([ex["label"] for ex in examples])
    return {"acc": float(np.mean(np.array(pred) == labels)), "acc_norm": float(np.mean(np.array(pred_norm) == labels))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8, help="examples per forward (4 rows each)")
    ap.add_argument("--quick", action="store_true", help="nano shape (2 layers, 64 wide), 16 examples")
    args = ap.parse_args()

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from jaxgpt.data.tokenizer import gpt2_tokenizer
    from jaxgpt.eval import hellaswag
    from jaxgpt.io.hf import load_hf_gpt2

    shape = dict(n_layer=2, n_head=2, n_embd=64) if args.quick else {}
    n = 16 if args.quick else args.examples
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**shape)).eval()
    tokenizer = gpt2_tokenizer(os.environ.get("JAXGPT_GPT2_BPE") or SHARED / "gpt2.tiktoken")
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        cfg, params = load_hf_gpt2(d)
    examples = make_examples(n)
    examples.sort(key=lambda ex: -(len(tokenizer.encode(ex["ctx"])) + max(len(tokenizer.encode(" " + e))
                                                                              for e in ex["endings"])))

    times = {}
    for name in ("jaxgpt (compiling)", "jaxgpt"):
        t = time.perf_counter()
        ours = hellaswag.evaluate(params, cfg, examples, tokenizer, batch_size=args.batch_size)
        times[name] = time.perf_counter() - t
    torch_evaluate(model, tokenizer, examples[:args.batch_size], args.batch_size)  # warm-up
    t = time.perf_counter()
    ref = torch_evaluate(model, tokenizer, examples, args.batch_size)
    times["transformers"] = time.perf_counter() - t
    same = ours["acc"] == ref["acc"] and ours["acc_norm"] == ref["acc_norm"]

    print(f"HellaSwag scoring, {'nano' if args.quick else 'GPT-2 124M'} shape, {n} examples, "
          f"{args.batch_size} per forward; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} threads {torch.get_num_threads()}")
    print(f"same predictions: {same} (acc {ours['acc']:.4f} / {ref['acc']:.4f}, "
          f"acc_norm {ours['acc_norm']:.4f} / {ref['acc_norm']:.4f})")
    print(f"| {'implementation':<20} | {'seconds':>8} | {'examples/s':>10} | {'vs transformers':>15} |")
    print(f"|{'-' * 22}|{'-' * 9}:|{'-' * 11}:|{'-' * 16}:|")
    for name, sec in times.items():
        print(f"| {name:<20} | {sec:8.2f} | {n / sec:10.2f} | {times['transformers'] / sec:14.2f}x |")


if __name__ == "__main__":
    main()
