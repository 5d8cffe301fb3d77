"""Weight tying: the output head shares the token embedding (GPT-2) or has its own [C, V] matrix.

    python -m experiments.weight_tying           # CPU size, writes docs/figures/tying_*
    python -m experiments.weight_tying --full    # wider, longer runs for an accelerator

Switch: `GPTConfig.tie_embeddings`; model.GPT computes the logits as `wte.attend(x)` (x @ wte.T) when tied
and with the `lm_head` Dense when untied. Tying removes exactly vocab_size x n_embd parameters.

Part 1, trained: tied vs untied, same batches and seed, at two vocabularies on Tiny Shakespeare:
  char  65 characters: the embedding is a sliver of the model (the saving is tiny)
  gpt2  GPT-2 BPE, 50,257 tokens: at a small width the embedding dominates (untied roughly doubles the model)
Part 2, counted: parameters of the four GPT-2 sizes, a 7B-class shape (GPT-2 blocks with n_layer 32,
n_embd 4096, n_head 32, vocab 50257) and GPT-3 175B's shape, tied and untied, from `jaxgpt.param_count`
and checked against the leaves of the real params pytree (`jax.eval_shape`, nothing allocated).

Outputs (docs/figures/, --full adds _full): tying_results.json, tying_loss.png (val loss curves and the parameter
table as bars of the saved fraction).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Sequence

import jax

from experiments import common
from jaxgpt import data as data_lib
from jaxgpt.nn.config import GPTConfig, param_count
from jaxgpt.nn.model import count_params, init_params

# (name, GPTConfig fields): the shapes of the parameter table
SHAPES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("gpt2 (124M)", dict(n_layer=12, n_head=12, n_embd=768)),
    ("gpt2-medium (350M)", dict(n_layer=24, n_head=16, n_embd=1024)),
    ("gpt2-large (774M)", dict(n_layer=36, n_head=20, n_embd=1280)),
    ("gpt2-xl (1.5B)", dict(n_layer=48, n_head=25, n_embd=1600)),
    ("7B-class (L32, C4096)", dict(n_layer=32, n_head=32, n_embd=4096)),
    ("GPT-3 175B shape (L96, C12288)", dict(n_layer=96, n_head=96, n_embd=12288, block_size=2048)),
)


@dataclasses.dataclass(frozen=True)
class TyingStudy:
    vocabs: tuple[str, ...] = ("char", "gpt2")
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 64
    block_size: int = 64
    steps: int = 600  # the char settings equal experiments.positions', so the tied run is shared with it
    batch_size: int = 12
    learning_rate: float = 2e-3
    min_lr: float = 2e-4
    warmup_iters: int = 50
    eval_interval: int = 100
    eval_iters: int = 20
    # the GPT-2 vocabulary makes every step ~V/65 times dearer in the head: a shallower, shorter setting
    bpe_n_layer: int = 2
    bpe_batch_size: int = 8
    bpe_steps: int = 300
    seed: int = 1337


FULL = TyingStudy(n_layer=6, n_head=6, n_embd=384, block_size=256, steps=3000, batch_size=32, learning_rate=1e-3,
                  min_lr=1e-4, warmup_iters=200, eval_interval=250, bpe_n_layer=6, bpe_batch_size=16,
                  bpe_steps=3000)


def param_table(shapes: Sequence[tuple[str, dict[str, Any]]] = SHAPES, vocab_size: int = 50257,
                check_pytree: bool = True) -> list[dict[str, Any]]:
    """Tied and untied parameter counts per shape; with check_pytree, also counted from the params pytree."""
    rows = []
    for name, fields in shapes:
        tied = GPTConfig(vocab_size=vocab_size, **fields)
        untied = tied.replace(tie_embeddings=False)
        pt, pu = param_count(tied), param_count(untied)
        row = {"name": name, **{k: getattr(tied, k) for k in ("n_layer", "n_head", "n_embd", "vocab_size",
                                                                  "block_size")},
               "tied": pt["total"], "untied": pu["total"], "saved": pu["total"] - pt["total"],
               "saved_of_tied": (pu["total"] - pt["total"]) / pt["total"],
               "saved_of_untied": (pu["total"] - pt["total"]) / pu["total"],
               "embedding_share_tied": pt["token_embedding"] / pt["total"]}
        if check_pytree:  # the real params pytree, by shape only
            row["tied_pytree"] = count_params(jax.eval_shape(lambda c=tied: init_params(c, 0)))
            row["untied_pytree"] = count_params(jax.eval_shape(lambda c=untied: init_params(c, 0)))
        rows.append(row)
    return rows


def run(s: TyingStudy, *, data_dir: str | Path | None = None, workdir: str | Path | None = None,
        out_dir: str | Path = common.FIGURES, suffix: str = "", fresh: bool = False,
        progress: bool = True, check_pytree: bool = True) -> dict[str, Any]:
    """Train tied and untied models per vocabulary, count the parameter table, write JSON and PNG."""
    wd = Path(workdir) if workdir else common.RUNS
    t0 = time.perf_counter()
    trained: dict[str, Any] = {}
    for vocab_kind in s.vocabs:
        if vocab_kind == "char":
            ddir = common.char_data(data_dir)
            n_layer, batch, steps = s.n_layer, s.batch_size, s.steps
        elif vocab_kind == "gpt2":
            ddir = common.bpe_data()
            n_layer, batch, steps = s.bpe_n_layer, s.bpe_batch_size, s.bpe_steps
        else:
            raise ValueError(f"unknown vocabulary {vocab_kind!r}; use 'char' or 'gpt2'")
        vocab = int(data_lib.load_meta(ddir)["vocab_size"])
        runs = {}
        for tied in (True, False):
            name = f"{vocab_kind}_{'tied' if tied else 'untied'}"
            fields = dict(n_layer=n_layer, n_head=s.n_head, n_embd=s.n_embd, block_size=s.block_size, dropout=0.0,
                          tie_embeddings=tied)
            spec = common.RunSpec(name=name, model=fields, steps=steps, batch_size=batch,
                                  learning_rate=s.learning_rate, min_lr=s.min_lr, warmup_iters=s.warmup_iters,
                                  eval_interval=min(s.eval_interval, steps), eval_iters=s.eval_iters, seed=s.seed)
            r = common.train_run(spec, ddir, wd, fresh=fresh, progress=progress)
            runs["tied" if tied else "untied"] = {
                **r.summary(), "params": param_count(r.config), "params_pytree": count_params(r.params()),
                "evals": r.evals}
        trained[vocab_kind] = {"vocab_size": vocab, "n_layer": n_layer, "batch_size": batch, "steps": steps,
                               "saved": runs["untied"]["params_pytree"] - runs["tied"]["params_pytree"],
                               "vocab_x_embd": vocab * s.n_embd, **runs}
    res = {"study": dataclasses.asdict(s), "dataset": "Tiny Shakespeare", "trained": trained,
           "param_table": param_table(check_pytree=check_pytree), "wall_s": round(time.perf_counter() - t0, 1)}
    out = Path(out_dir)
    common.write_json(out / f"tying_results{suffix}.json", res)
    plot(res, out / f"tying_loss{suffix}.png")
    return res


def plot(res: dict[str, Any], path: Path) -> Path:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, len(res["trained"]) + 1, figsize=(4.6 * (len(res["trained"]) + 1), 4))
    for ax, (kind, t) in zip(axes, res["trained"].items()):
        for which, color in (("tied", "tab:blue"), ("untied", "tab:orange")):
            r = t[which]
            ax.plot([e["step"] for e in r["evals"]], [e["val_loss"] for e in r["evals"]], "o-", ms=3, color=color,
                    label=f"{which}: {r['params_pytree']:,} params, val {r['val_loss']:.3f}")
        ax.set_title(f"{kind} vocabulary ({t['vocab_size']:,}), {t['n_layer']} layers x "
                     f"{res['study']['n_embd']}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("val loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[-1]
    rows = res["param_table"]
    ys = range(len(rows))
    ax.barh(ys, [100 * r["saved_of_tied"] for r in rows], color="tab:blue")
    for y, r in zip(ys, rows):
        ax.text(100 * r["saved_of_tied"], y, f" {100 * r['saved_of_tied']:.2f}%  ({r['saved'] / 1e6:,.1f}M)",
                va="center", fontsize=7)
    ax.set_yticks(list(ys), [r["name"] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 100 * max(r["saved_of_tied"] for r in rows) * 1.6)
    ax.set_xlabel("parameters tying saves, % of the tied model")
    ax.set_title("vocab 50,257: V x C saved", fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    fig.suptitle("Weight tying: val loss at equal steps, and what it saves by model size", fontsize=10)
    fig.tight_layout()
    return common.save_figure(fig, path)


def summary(res: dict[str, Any]) -> str:
    lines = []
    for kind, t in res["trained"].items():
        lines.append(f"{kind} vocab {t['vocab_size']}: tied {t['tied']['params_pytree']:,} params val "
                     f"{t['tied']['val_loss']:.4f}; untied {t['untied']['params_pytree']:,} val "
                     f"{t['untied']['val_loss']:.4f}; saved {t['saved']:,} (= V x C {t['vocab_x_embd']:,})")
    lines.append("")
    lines.append(common.markdown_table(
        ["shape", "tied", "untied", "saved (V x C)", "% of tied", "% of untied"],
        [[r["name"], f"{r['tied']:,}", f"{r['untied']:,}", f"{r['saved']:,}", f"{100 * r['saved_of_tied']:.2f}%",
          f"{100 * r['saved_of_untied']:.2f}%"] for r in res["param_table"]]))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    a = common.study_args(__doc__, str(FULL), argv)
    res = run(FULL if a.full else TyingStudy(), data_dir=a.data_dir,
              workdir=a.workdir,
              out_dir=a.out, suffix="_full" if a.full else "", fresh=a.fresh, progress=not a.quiet)
    print(summary(res))


if __name__ == "__main__":
    main()
