"""Positions: learned vs sinusoidal vs RoPE vs none, trained alike on Tiny Shakespeare characters.

    python -m experiments.positions           # CPU size (4 short runs), writes docs/figures/positions_*
    python -m experiments.positions --full    # wider, longer runs for an accelerator

Four models identical but for `GPTConfig.pos_embedding`, trained with the same batches, seed and schedule:
  learned     GPT-2: a [block_size, C] table added to the token embeddings (model.GPT, `wpe`)
  sinusoidal  fixed sin/cos codes added to the embeddings (model.sinusoidal_embedding)
  rope        rotary positions applied to q and k in every attention layer (rope.apply_rope)
  none        no position signal at all; causal masking is the only cue ("NoPE")
Measured: val loss during training at equal steps, parameter counts (jaxgpt.param_count), and the loss at
each position of validation windows twice the training context (2 x block_size). The learned table has
block_size rows, so a learned model cannot be run past block_size at all: its row stops at block_size.

Outputs (docs/figures/, --full adds _full): positions_results.json, positions_loss.png (val loss vs step; loss vs
position up to 2 x block_size).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from experiments import common
from jaxgpt import data as data_lib
from jaxgpt.nn.config import param_count


@dataclasses.dataclass(frozen=True)
class PositionsStudy:
    methods: tuple[str, ...] = ("learned", "sinusoidal", "rope", "none")
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 64
    block_size: int = 64
    steps: int = 600
    batch_size: int = 12
    learning_rate: float = 2e-3
    min_lr: float = 2e-4
    warmup_iters: int = 50
    eval_interval: int = 100
    eval_iters: int = 20
    long_windows: int = 128  # validation windows of 2 x block_size for the per-position loss
    seed: int = 1337


FULL = PositionsStudy(n_layer=6, n_head=6, n_embd=384, block_size=256, steps=3000, batch_size=32,
                      learning_rate=1e-3, min_lr=1e-4, warmup_iters=200, eval_interval=250, long_windows=256)


def run(s: PositionsStudy, *, data_dir: str | Path | None = None, workdir: str | Path | None = None,
        out_dir: str | Path = common.FIGURES, suffix: str = "", fresh: bool = False,
        progress: bool = True) -> dict[str, Any]:
    """Train one model per method, evaluate per position to 2 x block_size, write JSON and PNG."""
    ddir = common.char_data(data_dir)
    wd = Path(workdir) if workdir else common.RUNS
    vocab = int(data_lib.load_meta(ddir)["vocab_size"])
    T = s.block_size
    x2, y2 = common.val_windows(ddir, 2 * T, s.long_windows, s.seed)  # [N, 2T] each
    t0 = time.perf_counter()
    methods: dict[str, Any] = {}
    for method in s.methods:
        fields = dict(n_layer=s.n_layer, n_head=s.n_head, n_embd=s.n_embd, block_size=T, dropout=0.0,
                      pos_embedding=method)
        spec = common.RunSpec(name=method, model=fields, steps=s.steps, batch_size=s.batch_size,
                              learning_rate=s.learning_rate, min_lr=s.min_lr, warmup_iters=s.warmup_iters,
                              eval_interval=s.eval_interval, eval_iters=s.eval_iters, seed=s.seed)
        r = common.train_run(spec, ddir, wd, fresh=fresh, progress=progress)
        cfg = r.config
        params = r.params()
        if method == "learned":  # no row for position >= block_size: evaluate the first T positions only
            per_pos = common.loss_per_position(cfg, params, x2[:, :T], y2[:, :T])
            beyond = None
        else:
            per_pos = common.loss_per_position(cfg, params, x2, y2)
            beyond = float(per_pos[T:].mean())
        methods[method] = {
            **r.summary(), "params": param_count(cfg), "evals": r.evals,
            "loss_within_context": float(per_pos[:T].mean()),  # positions 0 .. T-1 of the long windows
            "loss_beyond_context": beyond,  # positions T .. 2T-1 (None: the method cannot go there)
            "loss_per_position": [float(v) for v in per_pos],
            "extrapolates": beyond is not None,
        }
    res = {"study": dataclasses.asdict(s), "vocab_size": vocab, "dataset": "Tiny Shakespeare, characters",
           "eval_tokens_per_position": int(s.long_windows), "methods": methods,
           "wall_s": round(time.perf_counter() - t0, 1)}
    out = Path(out_dir)
    common.write_json(out / f"positions_results{suffix}.json", res)
    plot(res, out / f"positions_loss{suffix}.png")
    return res


COLORS = {"learned": "tab:blue", "sinusoidal": "tab:green", "rope": "tab:red", "none": "tab:gray"}


def plot(res: dict[str, Any], path: Path) -> Path:
    plt = common.pyplot()
    T = res["study"]["block_size"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for m, r in res["methods"].items():
        n = r["params"]["total"]
        a.plot([e["step"] for e in r["evals"]], [e["val_loss"] for e in r["evals"]], "o-", ms=3,
               color=COLORS.get(m), label=f"{m} ({n:,} params)")
        per = np.asarray(r["loss_per_position"])
        b.plot(np.arange(per.size), common.smooth(per, 4), color=COLORS.get(m),
               label=m + ("" if r["extrapolates"] else f" (no rows past {T})"))
    a.set_xlabel("step")
    a.set_ylabel("val loss")
    a.set_title("val loss at equal steps", fontsize=9)
    a.grid(alpha=0.3)
    a.legend(fontsize=8)
    b.axvline(T, color="k", ls=":", lw=1)
    b.text(T + 1, b.get_ylim()[1], " training context", fontsize=8, va="top")
    b.set_xlabel("position in the validation window")
    b.set_ylabel("loss (4-position mean)")
    b.set_title(f"loss by position, windows of 2 x block_size = {2 * T}", fontsize=9)
    b.grid(alpha=0.3)
    b.legend(fontsize=8)
    s = res["study"]
    fig.suptitle(f"Position schemes: {s['n_layer']} layers x {s['n_embd']} wide, {s['steps']} steps, "
                 f"Tiny Shakespeare chars", fontsize=10)
    fig.tight_layout()
    return common.save_figure(fig, path)


def summary(res: dict[str, Any]) -> str:
    T = res["study"]["block_size"]
    rows = []
    for m, r in res["methods"].items():
        beyond = "cannot (table has %d rows)" % T if r["loss_beyond_context"] is None else f"{r['loss_beyond_context']:.3f}"
        rows.append([m, f"{r['params']['total']:,}", f"{r['params']['positions']:,}",
                     f"{r['val_loss']:.4f}", f"{r['loss_within_context']:.3f}", beyond])
    return common.markdown_table(["positions", "params", "of which positions", "val loss",
                                  f"loss, positions 0-{T - 1}", f"loss, positions {T}-{2 * T - 1}"], rows)


def main(argv: Sequence[str] | None = None) -> None:
    a = common.study_args(__doc__, str(FULL), argv)
    res = run(FULL if a.full else PositionsStudy(), data_dir=a.data_dir,
              workdir=a.workdir,
              out_dir=a.out, suffix="_full" if a.full else "", fresh=a.fresh, progress=not a.quiet)
    print(summary(res))


if __name__ == "__main__":
    main()
