"""Does quantizing LayerNorm/RMSNorm hurt? int8 / int4 weights on a trained char-level model.

    python -m experiments.quantize_layernorm            # trains (or reuses) the models, writes docs/figures/
    python -m experiments.quantize_layernorm --steps 200 --out /tmp/q   # a quicker look

For each norm kind (GPT-2's LayerNorm and RMSNorm) a small char-level jaxgpt model is trained on Tiny
Shakespeare (first 90% of the text; params cached under workdirs/quant_study/ so a rerun is quick). On the
held-out last 10% it measures perplexity and next-token agreement with the float32 model (argmax equal) for:

  fp32                      the trained weights
  int8                      every matrix (blocks + wte/wpe) int8 per output channel; norms/biases float
  int8 + norms int8         the same, plus every norm scale/bias stored int8 per tensor (quantize->dequantize)
  int8 + norms int4         norms at int4 per tensor: how much precision do norm vectors need?
  int4 g128                 every matrix int4, one scale per 128 inputs; norms float

plus the bytes of each model and the GPT-2 124M shape's sizes (random weights, only bytes: float32 vs int8 in
memory and on disk). Results: docs/figures/quant_layernorm.json and .png; docs/quantization.md discusses them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgpt.data.tokenizer import CharTokenizer
from jaxgpt.io.checkpoint import pytree_bytes_on_disk, restore_pytree, save_pytree
from jaxgpt.nn.config import GPTConfig
from jaxgpt.nn.model import GPT, init_params
from jaxgpt.quantize import (
    QuantConfig,
    fake_quantize,
    quantize,
    save_quantized,
    size_report,
)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    data: str = str(DATA)
    workdir: str = str(REPO / "workdirs" / "quant_study")  # trained params are cached here (gitignored)
    out_dir: str = str(REPO / "docs" / "figures")
    norms: tuple[str, ...] = ("layernorm", "rmsnorm")
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128
    steps: int = 1000
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 100
    seed: int = 0
    eval_windows: int = 256  # held-out windows of block_size tokens (all of them when fewer)
    group_size: int = 128
    gpt2_sizes: bool = True  # also report the GPT-2 124M shape's bytes (random weights)
    gpt2_disk: bool = True  # ... and save it to measure bytes on disk


# ---------------------------------------------------------------------------------------------------------
# Data and a small self-contained training loop


def load_text(path: str) -> tuple[CharTokenizer, np.ndarray, np.ndarray]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist; the study reads Tiny Shakespeare from ../shared/data")
    text = p.read_text()
    tok = CharTokenizer.from_text(text)
    ids = np.asarray(tok.encode(text), np.int32)
    n = int(0.9 * len(ids))
    return tok, ids[:n], ids[n:]


def model_config(sc: StudyConfig, vocab: int, norm: str) -> GPTConfig:
    return GPTConfig(vocab_size=vocab, block_size=sc.block_size, n_layer=sc.n_layer, n_head=sc.n_head,
                     n_embd=sc.n_embd, norm=norm, dropout=0.0)


def train(sc: StudyConfig, cfg: GPTConfig, train_ids: np.ndarray, log_path: Path) -> tuple[Any, float]:
    """AdamW + warmup/cosine on random windows; returns (params, final train loss). Logs JSONL per 50 steps."""
    from tqdm import tqdm

    model = GPT(cfg)
    params = init_params(cfg, sc.seed)
    sched = optax.warmup_cosine_decay_schedule(0.0, sc.lr, sc.warmup, max(sc.steps, sc.warmup + 1), sc.lr / 10)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, b2=0.99, weight_decay=0.1))
    state = opt.init(params)

    @jax.jit
    def step(params, state, x, y):
        def loss_fn(p):
            logits = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    rng = np.random.default_rng(sc.seed)
    T = cfg.block_size
    loss = float("nan")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log, tqdm(range(sc.steps), desc=f"train {cfg.norm}", leave=False) as bar:
        for i in bar:
            starts = rng.integers(0, len(train_ids) - T - 1, sc.batch_size)
            x = np.stack([train_ids[s:s + T] for s in starts])
            y = np.stack([train_ids[s + 1:s + T + 1] for s in starts])
            params, state, loss_j = step(params, state, x, y)
            if i % 50 == 0 or i == sc.steps - 1:
                loss = float(loss_j)
                bar.set_postfix(loss=f"{loss:.3f}")
                log.write(json.dumps({"step": i, "loss": loss, "time": time.time()}) + "\n")
                log.flush()
    return params, loss


def trained_params(sc: StudyConfig, cfg: GPTConfig, train_ids: np.ndarray) -> tuple[Any, dict[str, Any]]:
    """Params from the cache in sc.workdir when trained with the same settings, else trained now and cached."""
    d = Path(sc.workdir) / cfg.norm
    meta_file, ckpt = d / "meta.json", d / "params"
    key = {"model": cfg.to_dict(), "steps": sc.steps, "batch_size": sc.batch_size, "lr": sc.lr,
           "warmup": sc.warmup, "seed": sc.seed, "data": sc.data, "n_train": int(len(train_ids))}
    if meta_file.is_file() and ckpt.is_dir():
        meta = json.loads(meta_file.read_text())
        if meta.get("key") == key:
            target = init_params(cfg, sc.seed)
            return restore_pytree(ckpt, target), meta
    t0 = time.time()
    params, loss = train(sc, cfg, train_ids, d / "train_log.jsonl")
    if ckpt.exists():
        shutil.rmtree(ckpt)
    save_pytree(ckpt, params)
    meta = {"key": key, "final_train_loss": loss, "train_seconds": time.time() - t0}
    meta_file.write_text(json.dumps(meta, indent=1))
    return params, meta


# ---------------------------------------------------------------------------------------------------------
# Measurements


def eval_logits_fn(cfg: GPTConfig):
    model = GPT(cfg)

    @jax.jit
    def fn(params, x, y):
        logits = model.apply({"params": params}, x)  # [B, T, V]
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, y)  # [B, T]
        return nll, jnp.argmax(logits, -1)

    return fn


def evaluate(cfg: GPTConfig, variants: dict[str, Any], val_ids: np.ndarray, windows: int,
             batch: int = 16) -> dict[str, dict[str, float]]:
    """Perplexity, accuracy and argmax agreement with the first variant (fp32) on held-out windows."""
    T = cfg.block_size
    n = min(windows, (len(val_ids) - 1) // T)
    if n < 1:
        raise ValueError(f"held-out text of {len(val_ids)} tokens is shorter than one window of {T}")
    x_all = np.stack([val_ids[i * T:(i + 1) * T] for i in range(n)])
    y_all = np.stack([val_ids[i * T + 1:(i + 1) * T + 1] for i in range(n)])
    fn = eval_logits_fn(cfg)
    out: dict[str, dict[str, float]] = {}
    ref_pred = None
    for name, params in variants.items():
        nlls, preds = [], []
        for s in range(0, n, batch):
            nll, pred = fn(params, x_all[s:s + batch], y_all[s:s + batch])
            nlls.append(np.asarray(nll))
            preds.append(np.asarray(pred))
        nll, pred = np.concatenate(nlls), np.concatenate(preds)
        if ref_pred is None:
            ref_pred = pred
        out[name] = {"loss": float(nll.mean()), "perplexity": float(math.exp(nll.mean())),
                     "accuracy": float((pred == y_all).mean()), "agreement": float((pred == ref_pred).mean()),
                     "eval_tokens": int(nll.size)}
    return out


def norm_bytes(params: Any, bits: int) -> tuple[int, int]:
    """(float bytes, quantized-per-tensor bytes) of all norm vectors: n*bits/8 + one float32 scale each."""
    fb = qb = 0
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        if "ln_" in jax.tree_util.keystr(path):
            fb += x.nbytes
            qb += math.ceil(x.size * bits / 8) + 4
    return fb, qb


def variants_for(params: Any, sc: StudyConfig) -> tuple[dict[str, Any], dict[str, int]]:
    """The five models of the study and the bytes each would take stored as described."""
    qcfg8 = QuantConfig(bits=8, embeddings=True)
    qcfg4 = QuantConfig(bits=4, granularity="group", group_size=sc.group_size, embeddings=True)
    norms = ("*ln_*",)
    q8 = quantize(params, qcfg8)
    q4 = quantize(params, qcfg4)
    fp_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    q8_bytes = size_report(q8)["total_bytes"]
    nf, n8 = norm_bytes(params, 8)
    _, n4 = norm_bytes(params, 4)
    variants = {
        "fp32": params,
        "int8": q8,
        "int8 + norms int8": fake_quantize(q8, QuantConfig(include=norms, granularity="per_tensor")),
        "int8 + norms int4": fake_quantize(q8, QuantConfig(include=norms, granularity="per_tensor", bits=4)),
        "int4 g128": q4,
    }
    nbytes = {"fp32": fp_bytes, "int8": q8_bytes, "int8 + norms int8": q8_bytes - nf + n8,
              "int8 + norms int4": q8_bytes - nf + n4, "int4 g128": size_report(q4)["total_bytes"]}
    return variants, nbytes


def gpt2_sizes(sc: StudyConfig) -> dict[str, Any]:
    """Bytes of the GPT-2 124M shape (random weights): float32 vs int8 / int4, in memory and on disk."""
    cfg = GPTConfig.preset("gpt2")
    params = init_params(cfg, 0)
    out: dict[str, Any] = {"params": int(sum(x.size for x in jax.tree.leaves(params))),
                           "fp32_bytes": int(sum(x.nbytes for x in jax.tree.leaves(params)))}
    configs = {"int8 blocks": QuantConfig(), "int8 blocks + wte": QuantConfig(embeddings=True),
               "int4 g128 blocks + wte": QuantConfig(bits=4, granularity="group", group_size=128, embeddings=True)}
    disk = Path(sc.workdir) / "gpt2_disk"
    if sc.gpt2_disk:
        shutil.rmtree(disk, ignore_errors=True)
        save_pytree(disk / "fp32", params)
        out["fp32_disk_bytes"] = pytree_bytes_on_disk(disk / "fp32")
    for name, qcfg in configs.items():
        qp = quantize(params, qcfg)
        rep = size_report(qp)
        out[name] = {"bytes": rep["total_bytes"], "ratio": rep["total_ratio"],
                     "quantized_weights_ratio": rep["quantized_ratio"]}
        if sc.gpt2_disk and name == "int8 blocks + wte":
            out[name]["disk_bytes"] = save_quantized(disk / "int8", qp, qcfg)
    if sc.gpt2_disk:
        shutil.rmtree(disk, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------------------------------
# Output


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norms = list(results["models"])
    names = list(results["models"][norms[0]]["variants"])
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), dpi=120)
    width = 0.8 / len(norms)
    for j, norm in enumerate(norms):
        v = results["models"][norm]["variants"]
        xs = np.arange(len(names)) + (j - (len(norms) - 1) / 2) * width
        axes[0].bar(xs, [v[n]["ppl_change_pct"] for n in names], width, label=norm)
        axes[1].bar(xs, [100 * v[n]["agreement"] for n in names], width, label=norm)
        axes[2].bar(xs, [v[n]["bytes"] / 1e3 for n in names], width, label=norm)
    for ax, title in zip(axes, ("held-out perplexity change vs fp32 (%)", "next-token agreement with fp32 (%)",
                                "model bytes (kB)")):
        ax.set_xticks(np.arange(len(names)), names, rotation=25, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.axhline(0, color="k", lw=0.6)
    axes[1].set_ylim(min(90, min(100 * results["models"][n]["variants"][k]["agreement"]
                                 for n in norms for k in names) - 1), 100.5)
    axes[0].legend(fontsize=8)
    fig.suptitle("Quantizing a trained char-level jaxgpt (Tiny Shakespeare): matrices int8/int4, norms float or "
                 "quantized", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(sc: StudyConfig) -> dict[str, Any]:
    """Train or load, measure every variant, write quant_layernorm.json / .png to sc.out_dir."""
    tok, train_ids, val_ids = load_text(sc.data)
    results: dict[str, Any] = {"study": dataclasses.asdict(sc), "vocab_size": tok.vocab_size,
                               "held_out_chars": int(len(val_ids)), "models": {}}
    for norm in sc.norms:
        cfg = model_config(sc, tok.vocab_size, norm)
        params, meta = trained_params(sc, cfg, train_ids)
        variants, nbytes = variants_for(params, sc)
        metrics = evaluate(cfg, variants, val_ids, sc.eval_windows)
        base = metrics["fp32"]
        for name in variants:
            m = metrics[name]
            m["bytes"] = int(nbytes[name])
            m["bytes_vs_fp32"] = nbytes[name] / nbytes["fp32"]
            m["ppl_change_pct"] = 100.0 * (m["perplexity"] / base["perplexity"] - 1.0)
        q8 = size_report(variants["int8"])
        results["models"][norm] = {
            "config": cfg.to_dict(), "final_train_loss": meta.get("final_train_loss"),
            "train_seconds": meta.get("train_seconds"), "variants": metrics,
            "int8_quantized_weights_ratio": q8["quantized_ratio"],
            "norm_params": int(sum(x.size for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
                                   if "ln_" in jax.tree_util.keystr(p))),
            "norm_scale_stats": norm_stats(params),
        }
    if sc.gpt2_sizes:
        results["gpt2_124m"] = gpt2_sizes(sc)
    out = Path(sc.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "quant_layernorm.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(out / "quant_layernorm.json")
    plot(results, out / "quant_layernorm.png")
    return results


def norm_stats(params: Any) -> dict[str, float]:
    """How spread the norm vectors are: per-tensor quantization error grows with max|x| / typical |x|."""
    ratios, steps8 = [], []
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        if "ln_" in jax.tree_util.keystr(path):
            a = np.abs(np.asarray(x, np.float64))
            ratios.append(a.max() / max(np.median(a), 1e-12))
            steps8.append(a.max() / 127 / max(np.median(a), 1e-12))
    return {"max_over_median_abs_worst": float(max(ratios)), "max_over_median_abs_median": float(np.median(ratios)),
            "int8_step_over_median_abs_worst": float(max(steps8))}


def summary(results: dict[str, Any]) -> str:
    lines = []
    for norm, m in results["models"].items():
        lines.append(f"\n{norm} model (final train loss {m['final_train_loss']:.3f}); "
                     f"int8 holds {m['int8_quantized_weights_ratio']:.3f}x the fp32 bytes of its weights")
        lines.append("| variant | perplexity | change | agreement | bytes | vs fp32 |")
        lines.append("|---|---:|---:|---:|---:|---:|")
        for name, v in m["variants"].items():
            lines.append(f"| {name} | {v['perplexity']:.4f} | {v['ppl_change_pct']:+.2f}% | "
                         f"{100 * v['agreement']:.2f}% | {v['bytes']:,} | {v['bytes_vs_fp32']:.3f}x |")
    if "gpt2_124m" in results:
        g = results["gpt2_124m"]
        lines.append(f"\nGPT-2 124M shape: {g['params']:,} params, fp32 {g['fp32_bytes'] / 1e6:.1f} MB")
        for k, v in g.items():
            if isinstance(v, dict):
                lines.append(f"  {k}: {v['bytes'] / 1e6:.1f} MB ({v['ratio']:.3f}x)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = StudyConfig()
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--out", default=d.out_dir, help="folder for quant_layernorm.json / .png")
    ap.add_argument("--workdir", default=d.workdir, help="where trained params are cached")
    ap.add_argument("--norms", default=",".join(d.norms))
    ap.add_argument("--eval-windows", type=int, default=d.eval_windows)
    ap.add_argument("--no-gpt2", action="store_true", help="skip the GPT-2 124M size measurements")
    args = ap.parse_args()
    sc = dataclasses.replace(d, steps=args.steps, out_dir=args.out, workdir=args.workdir,
                             norms=tuple(args.norms.split(",")), eval_windows=args.eval_windows,
                             gpt2_sizes=not args.no_gpt2)
    print(summary(run(sc)))


if __name__ == "__main__":
    main()
