"""Norm placement: Pre-LN vs Post-LN, LayerNorm vs RMSNorm, at depths 4 / 12 / 24, with and without warm-up.

    python -m experiments.norm_placement           # CPU size (20 short runs), writes docs/figures/norm_*
    python -m experiments.norm_placement --full    # the whole grid, wider and longer, for an accelerator

On a CPU the grid is Pre/Post x warm-up off/on for LayerNorm at depths 4, 12, 24 and for RMSNorm at depth 4
(16 runs), plus a learning-rate sweep at depth 4 (4 runs); gradient norms at initialisation are measured for
every depth x placement x norm. --full trains every combination.

The claim under test (Xiong et al. 2020, "On Layer Normalization in the Transformer Architecture"): Post-LN
(x = LN(x + f(x)), the original Transformer) needs learning-rate warm-up and grows fragile with depth, because
its gradients at initialisation are largest near the output; Pre-LN (x = x + f(LN(x)), GPT-2) trains
smoothly without warm-up. Every run uses the same data (Tiny Shakespeare characters), the same batches,
the same initial seed and the same high peak learning rate with no gradient clipping (clipping would hide
exactly the blow-ups this study looks for); only the switches differ.

Outputs (docs/figures/):
  (--full adds _full to each name)
  norm_placement.json   settings, per run: final train loss, val loss, divergence, the loss curve; and
                        per-block gradient norms at initialisation
  norm_curves.png       train-loss curves: rows = depth, columns = warm-up off / on
  norm_grad_init.png    per-block gradient norm at initialisation against block index, one panel per depth
  norm_lr_sweep.png     final loss against the peak learning rate at one depth, Pre-LN vs Post-LN
Each run's outcome: "diverged" when a step goes non-finite or the final train loss (mean of the last 10%
of steps) is above ln(vocab), the loss of a uniform guess; "stalled" when it ends within 0.05 of the
unigram entropy of the training text (it has learned the character frequencies and nothing else);
"trained" otherwise.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from experiments import common
from jaxgpt import data as data_lib
from jaxgpt.nn.config import GPTConfig
from jaxgpt.nn.model import init_params


@dataclasses.dataclass(frozen=True)
class NormStudy:
    """The grid and the shared training settings."""

    depths: tuple[int, ...] = (4, 12, 24)
    placements: tuple[str, ...] = ("pre", "post")
    norms: tuple[str, ...] = ("layernorm", "rmsnorm")
    warmups: tuple[int, ...] = (0, 40)  # warm-up steps: off, on
    n_embd: int = 64
    n_head: int = 4
    block_size: int = 64
    steps: int = 200
    batch_size: int = 12
    learning_rate: float = 3e-3
    min_lr: float = 3e-4
    grad_clip: float = 0.0
    eval_iters: int = 10
    grad_batch: int = 16  # windows of the batch the gradient norms at init are measured on
    # the (depth, norm) pairs that are trained (None: all). Gradient norms at init are measured for every pair.
    # On a CPU, RMSNorm is trained at the smallest depth only (it tracks LayerNorm there); --full trains all.
    trained: tuple[tuple[int, str], ...] | None = ((4, "layernorm"), (4, "rmsnorm"), (12, "layernorm"),
                                                    (24, "layernorm"))
    # a learning-rate sweep at one depth (LayerNorm, warm-up on, min_lr = lr / 10): is Post-LN broken or
    # only intolerant of a high learning rate? The grid's own peak lr is the sweep's last point.
    lr_sweep: tuple[float, ...] = (3e-4, 1e-3)
    lr_sweep_depth: int = 4
    seed: int = 1337


FULL = NormStudy(n_embd=256, n_head=8, block_size=256, steps=2000, batch_size=32, warmups=(0, 400),
                 eval_iters=40, trained=None, lr_sweep=(1e-4, 3e-4, 1e-3), lr_sweep_depth=12)


def run_name(depth: int, placement: str, norm: str, warmup: int) -> str:
    return f"L{depth}_{placement}_{norm}_warmup{warmup}"


def model_fields(s: NormStudy, depth: int, placement: str, norm: str) -> dict[str, Any]:
    return dict(n_layer=depth, n_head=s.n_head, n_embd=s.n_embd, block_size=s.block_size, dropout=0.0,
                norm=norm, norm_position=placement)


def max_regression(loss: Sequence[float], k: int = 10) -> float:
    """How far the smoothed loss climbs back above its best value so far (0 for a monotone curve)."""
    sm = common.smooth(loss, k)
    if sm.size == 0 or not np.all(np.isfinite(sm)):
        return float("inf")
    return float(np.max(sm - np.minimum.accumulate(sm)))


def run(s: NormStudy, *, data_dir: str | Path | None = None, workdir: str | Path | None = None,
        out_dir: str | Path = common.FIGURES, suffix: str = "", fresh: bool = False,
        progress: bool = True) -> dict[str, Any]:
    """Train the grid, measure gradient norms at init, write norm_placement{suffix}.json and the figures."""
    from tqdm.auto import tqdm

    ddir = common.char_data(data_dir)
    wd = Path(workdir) if workdir else common.RUNS
    vocab = int(data_lib.load_meta(ddir)["vocab_size"])
    threshold = math.log(vocab)
    unigram = common.unigram_entropy(ddir)
    gx, gy = data_lib.get_batch(data_lib.load_split(ddir, "train", s.block_size), s.grad_batch, s.block_size,
                                data_lib.batch_rng(s.seed, 0, "train", stream=5))

    def train(depth: int, placement: str, norm: str, warmup: int, lr: float, min_lr: float) -> dict[str, Any]:
        spec = common.RunSpec(
            name=run_name(depth, placement, norm, warmup) + ("" if lr == s.learning_rate else f"_lr{lr:g}"),
            model=model_fields(s, depth, placement, norm), steps=s.steps, batch_size=s.batch_size,
            learning_rate=lr, min_lr=min_lr, warmup_iters=warmup, grad_clip=s.grad_clip,
            eval_iters=s.eval_iters, seed=s.seed)
        r = common.train_run(spec, ddir, wd, fresh=fresh, progress=progress)
        return {"depth": depth, "placement": placement, "norm": norm, "warmup": warmup, "peak_lr": lr,
                **r.summary(), "diverged": r.diverged(threshold), "outcome": r.outcome(threshold, unigram),
                "max_regression": common._num(max_regression(r.loss)),
                "loss": [common._num(v) for v in r.loss], "lr": r.lr}

    grads: dict[str, Any] = {}
    runs: list[dict[str, Any]] = []
    combos = [(d, p, n) for d in s.depths for p in s.placements for n in s.norms]
    t0 = time.perf_counter()
    for depth, placement, norm in tqdm(combos, desc="norm placement", disable=not progress):
        cfg = GPTConfig(vocab_size=vocab, **model_fields(s, depth, placement, norm))
        g = common.layer_grad_norms(cfg, init_params(cfg, s.seed), gx, gy)
        grads[f"L{depth}_{placement}_{norm}"] = {"depth": depth, "placement": placement, "norm": norm, **g}
        if s.trained is None or (depth, norm) in s.trained:
            for warmup in s.warmups:
                runs.append(train(depth, placement, norm, warmup, s.learning_rate, s.min_lr))
    # why Post-LN's block 0 stands out: untie the head and scale the input embeddings to unit size (x 50 =
    # 1 / GPT-2's 0.02 init); if the spike comes from block 0's norm dividing by the tiny residual stream, it goes
    cfg = GPTConfig(vocab_size=vocab, tie_embeddings=False, **model_fields(s, min(s.depths), "post", "layernorm"))
    p0 = init_params(cfg, s.seed)
    big = {**p0, **{k: {"embedding": p0[k]["embedding"] * 50.0} for k in ("wte", "wpe") if k in p0}}
    scale_check = {"depth": min(s.depths), "placement": "post", "norm": "layernorm", "tie_embeddings": False,
                   "embedding_x1": common.layer_grad_norms(cfg, p0, gx, gy)["blocks"],
                   "embedding_x50": common.layer_grad_norms(cfg, big, gx, gy)["blocks"]}
    sweep = [train(s.lr_sweep_depth, placement, "layernorm", max(s.warmups), lr, lr / 10)
             for lr in tqdm(s.lr_sweep, desc="lr sweep", disable=not progress) for placement in s.placements]
    res = {"study": dataclasses.asdict(s), "vocab_size": vocab, "divergence_threshold": threshold,
           "unigram_entropy": unigram,
           "dataset": "Tiny Shakespeare, characters", "grad_norms_init": grads, "runs": runs,
           "lr_sweep": sweep, "embedding_scale_check": scale_check,
           "wall_s": round(time.perf_counter() - t0, 1)}
    out = Path(out_dir)
    common.write_json(out / f"norm_placement{suffix}.json", res)
    plot_curves(res, out / f"norm_curves{suffix}.png")
    plot_grads(res, out / f"norm_grad_init{suffix}.png")
    if sweep:
        plot_lr_sweep(res, out / f"norm_lr_sweep{suffix}.png")
    return res


STYLE = {("pre", "layernorm"): ("tab:blue", "-"), ("pre", "rmsnorm"): ("tab:cyan", "--"),
         ("post", "layernorm"): ("tab:red", "-"), ("post", "rmsnorm"): ("tab:orange", "--")}


def _label(placement: str, norm: str) -> str:
    return f"{placement.capitalize()}-{'LN' if norm == 'layernorm' else 'RMSNorm'}"


def plot_curves(res: dict[str, Any], path: Path) -> Path:
    """Smoothed train loss per run: rows = depth, columns = warm-up setting; x marks a non-finite step."""
    plt = common.pyplot()
    s = res["study"]
    depths, warmups = s["depths"], s["warmups"]
    fig, axes = plt.subplots(len(depths), len(warmups), figsize=(5.2 * len(warmups), 2.9 * len(depths)),
                             squeeze=False, sharex=True)
    for i, depth in enumerate(depths):
        for j, warmup in enumerate(warmups):
            ax = axes[i][j]
            for r in res["runs"]:
                if r["depth"] != depth or r["warmup"] != warmup:
                    continue
                color, ls = STYLE.get((r["placement"], r["norm"]), ("k", "-"))
                loss = np.array([np.nan if v is None else v for v in r["loss"]], float)
                sm = common.smooth(loss, 10)
                tag = ""
                if r["non_finite_step"] is not None:
                    tag = f" (NaN at {r['non_finite_step']})"
                elif r.get("outcome", "diverged" if r["diverged"] else "trained") != "trained":
                    tag = f" ({r.get('outcome', 'diverged')})"
                ax.plot(np.arange(len(sm)), sm, color=color, ls=ls, lw=1.3,
                        label=_label(r["placement"], r["norm"]) + tag)
                if r["non_finite_step"] is not None:
                    last = sm[np.isfinite(sm)][-1] if np.isfinite(sm).any() else res["divergence_threshold"]
                    ax.plot([r["non_finite_step"]], [last], "x", color=color, ms=9, mew=2)
            ax.axhline(res["divergence_threshold"], color="gray", lw=0.8, ls=":")
            if "unigram_entropy" in res:
                ax.axhline(res["unigram_entropy"], color="gray", lw=0.8, ls="--")
            ax.set_title(f"{depth} layers, warm-up {'off' if warmup == 0 else f'{warmup} steps'}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.set_ylim(1.2, res["divergence_threshold"] + 0.6)
            ax.legend(fontsize=7, loc="upper right")
            if j == 0:
                ax.set_ylabel("train loss (10-step mean)")
            if i == len(depths) - 1:
                ax.set_xlabel("step")
    fig.suptitle(f"Norm placement on Tiny Shakespeare chars: peak lr {s['learning_rate']:g}, no clipping, "
                 f"width {s['n_embd']}, {s['steps']} steps (dotted: ln V, dashed: unigram entropy)", fontsize=10)
    fig.tight_layout()
    return common.save_figure(fig, path)


def plot_grads(res: dict[str, Any], path: Path) -> Path:
    """Gradient norm of each block at initialisation against its index (0 = next to the embedding)."""
    plt = common.pyplot()
    depths = res["study"]["depths"]
    fig, axes = plt.subplots(1, len(depths), figsize=(4.2 * len(depths), 3.4), squeeze=False)
    for ax, depth in zip(axes[0], depths):
        for g in res["grad_norms_init"].values():
            if g["depth"] != depth:
                continue
            color, ls = STYLE.get((g["placement"], g["norm"]), ("k", "-"))
            ax.plot(np.arange(depth), g["blocks"], color=color, ls=ls, marker="o", ms=3,
                    label=_label(g["placement"], g["norm"]))
        ax.set_yscale("log")
        ax.set_title(f"{depth} layers", fontsize=9)
        ax.set_xlabel("block index (0 = input side)")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("||dL/d block params|| at init")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Per-block gradient norms at initialisation (one batch, same seed)", fontsize=10)
    fig.tight_layout()
    return common.save_figure(fig, path)


def sweep_points(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The sweep's runs plus the grid's runs at the sweep's depth, norm and warm-up (the highest lr)."""
    s = res["study"]
    grid = [r for r in res["runs"] if r["depth"] == s["lr_sweep_depth"] and r["norm"] == "layernorm"
            and r["warmup"] == max(s["warmups"])]
    return sorted(res["lr_sweep"] + grid, key=lambda r: (r["placement"], r["peak_lr"]))


def plot_lr_sweep(res: dict[str, Any], path: Path) -> Path:
    """Final train loss against the peak learning rate, Pre-LN vs Post-LN."""
    plt = common.pyplot()
    s = res["study"]
    pts = sweep_points(res)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for placement in s["placements"]:
        rs = [r for r in pts if r["placement"] == placement]
        color, _ = STYLE[(placement, "layernorm")]
        final = [np.nan if r["final_train_loss"] is None else r["final_train_loss"] for r in rs]
        a.semilogx([r["peak_lr"] for r in rs], final, "o-", color=color, label=_label(placement, "layernorm"))
        for r in rs:
            loss = np.array([np.nan if v is None else v for v in r["loss"]], float)
            b.plot(common.smooth(loss, 10), color=color, lw=1.0, alpha=0.35 + 0.65 * (r["peak_lr"] / max(
                p["peak_lr"] for p in pts)), label=f"{_label(placement, 'layernorm')}, lr {r['peak_lr']:g}")
    a.axhline(res["divergence_threshold"], color="gray", lw=0.8, ls=":")
    if "unigram_entropy" in res:
        a.axhline(res["unigram_entropy"], color="gray", lw=0.8, ls="--", label="unigram entropy")
    lrs = sorted({r["peak_lr"] for r in pts})
    a.set_xticks(lrs, [f"{v:g}" for v in lrs])
    a.xaxis.set_minor_locator(plt.NullLocator())
    a.set_xlabel("peak learning rate")
    a.set_ylabel(f"train loss, last 10% of {s['steps']} steps")
    a.grid(alpha=0.3, which="both")
    a.legend(fontsize=8)
    b.set_xlabel("step")
    b.set_ylabel("train loss (10-step mean)")
    b.grid(alpha=0.3)
    b.legend(fontsize=7)
    fig.suptitle(f"{s['lr_sweep_depth']} layers, LayerNorm, warm-up {max(s['warmups'])} steps: "
                 "final loss against peak learning rate", fontsize=10)
    fig.tight_layout()
    return common.save_figure(fig, path)


def summary(res: dict[str, Any]) -> str:
    rows = []
    for r in res["runs"]:
        rows.append([r["depth"], _label(r["placement"], r["norm"]), r["warmup"],
                     "-" if r["final_train_loss"] is None else f"{r['final_train_loss']:.3f}",
                     "-" if r["val_loss"] is None else f"{r['val_loss']:.3f}",
                     "-" if r["max_regression"] is None else f"{r['max_regression']:.3f}",
                     ("NaN at %d" % r["non_finite_step"]) if r["non_finite_step"] is not None
                     else r["outcome"]])
    table = common.markdown_table(["layers", "norm", "warm-up", "final train loss", "val loss",
                                   "max climb", "outcome"], rows)
    lines = [table, f"(unigram entropy of the training text: {res['unigram_entropy']:.3f} nats)", "",
             f"learning-rate sweep ({res['study']['lr_sweep_depth']} layers, LayerNorm, warm-up):"]
    for r in sweep_points(res):
        fl = "-" if r["final_train_loss"] is None else f"{r['final_train_loss']:.3f}"
        lines.append(f"  {_label(r['placement'], r['norm'])} lr {r['peak_lr']:g}: final train loss {fl} ({r['outcome']})")
    c = res["embedding_scale_check"]
    lines += ["", f"Post-LN, untied, {c['depth']} layers: block grad norms at init with GPT-2's embedding init "
              f"{[round(v, 3) for v in c['embedding_x1']]}, embeddings x 50 {[round(v, 3) for v in c['embedding_x50']]}"]
    lines += ["", "gradient norm at init, last block / first block:"]
    for k, g in res["grad_norms_init"].items():
        lines.append(f"  {k}: {g['blocks'][-1] / g['blocks'][0]:.3g}  (first {g['blocks'][0]:.3g}, "
                     f"last {g['blocks'][-1]:.3g})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    a = common.study_args(__doc__, str(FULL), argv)
    res = run(FULL if a.full else NormStudy(), data_dir=a.data_dir,
              workdir=a.workdir,
              out_dir=a.out, suffix="_full" if a.full else "", fresh=a.fresh, progress=not a.quiet)
    print(summary(res))


if __name__ == "__main__":
    main()
