"""LoRA vs RsLoRA across ranks: the variance of the update, and how fine-tuning behaves.

    python -m experiments.lora_rank                    # both parts, small CPU settings, writes docs/figures/
    python -m experiments.lora_rank --part variance    # part 1 only (seconds)
    python -m experiments.lora_rank --full             # part 2 with a bigger model and more steps

Part 1 (variance). With A [d, r] and B [r, d] drawn i.i.d. N(0, 1), every entry of A @ B is a sum of r
products of unit variance, so Var(scale * A @ B) = scale^2 * r: alpha^2 / r for LoRA (scale alpha / r) and
alpha^2 for RsLoRA (alpha / sqrt(r)). Measured for r = 1 ... 1024 next to that theory line; the log-log slope
is fitted (-1 and 0 expected). Writes docs/figures/lora_variance.json and .png.

Part 2 (learning). A small char-level jaxgpt is trained on Tiny Shakespeare (the base; cached under
workdirs/lora_rank/), then fine-tuned on different text, the Python reference documentation shipped with
CPython (`pydoc_data.topics`), with adapters on every block kernel at ranks 4, 16, 64 and 256, LoRA and RsLoRA,
all with one learning rate, one alpha, and per seed the same batches and adapter draw (mean over seeds). A full
fine-tune at the same learning rate and the untouched base are reference lines. Writes docs/figures/lora_rank_learning.json
and .png, and per-eval metrics to workdirs/lora_rank/metrics.jsonl.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import optax

from jaxgpt import lora
from jaxgpt.data.tokenizer import CharTokenizer
from jaxgpt.io.checkpoint import restore_pytree, save_pytree
from jaxgpt.nn.config import GPTConfig
from jaxgpt.nn.model import GPT, init_params

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


# ---------------------------------------------------------------------------------------------------------
# Part 1: variance of the update against rank


def variance_study(ranks: tuple[int, ...] = tuple(2 ** i for i in range(11)), dim: int = 1024, alpha: float = 16.0,
                   seeds: int = 4) -> dict[str, Any]:
    """Var(scale * A @ B) for A [dim, r], B [r, dim] ~ N(0, 1) (NumPy float64), both scalings, `seeds` fresh
    draws per rank."""
    from tqdm import tqdm

    rng = np.random.default_rng(0)

    def var_ab(r: int) -> float:
        a = rng.standard_normal((dim, r))  # [d, r]
        b = rng.standard_normal((r, dim))  # [r, d]
        return float(np.var(a @ b))  # unscaled Var(A @ B), float64

    rows = []
    for r in tqdm(ranks, desc="variance vs rank", leave=False):
        v = np.array([var_ab(int(r)) for _ in range(seeds)])
        row = {"rank": int(r), "var_AB": float(v.mean()), "var_AB_std": float(v.std())}
        for name, stable in (("lora", False), ("rslora", True)):
            scale = lora.lora_scale(lora.LoraConfig(rank=int(r), alpha=alpha, rank_stabilized=stable))
            row[name] = {"scale": scale, "var": float(scale ** 2 * v.mean()), "var_std": float(scale ** 2 * v.std()),
                         "theory": scale ** 2 * r}
        rows.append(row)
    log_r = np.log(np.array(ranks, float))
    out: dict[str, Any] = {"dim": dim, "alpha": alpha, "seeds": seeds, "rows": rows, "slope": {}, "max_rel_err": {}}
    for name in ("lora", "rslora"):
        var = np.array([row[name]["var"] for row in rows])
        theory = np.array([row[name]["theory"] for row in rows])
        out["slope"][name] = float(np.polyfit(log_r, np.log(var), 1)[0])
        out["max_rel_err"][name] = float(np.max(np.abs(var / theory - 1)))
    return out


def plot_variance(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = np.array([row["rank"] for row in res["rows"]])
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for name, label, color in (("lora", "LoRA  (alpha / r)", "C0"), ("rslora", "RsLoRA  (alpha / sqrt r)", "C3")):
        var = np.array([row[name]["var"] for row in res["rows"]])
        err = np.array([row[name]["var_std"] for row in res["rows"]])
        theory = np.array([row[name]["theory"] for row in res["rows"]])
        ax.errorbar(r, var, yerr=err, fmt="o", ms=4, color=color,
                    label=f"{label}: measured, slope {res['slope'][name]:+.3f}")
        ax.plot(r, theory, "-", lw=1, color=color, alpha=0.6, label=f"{label}: theory scale$^2$ r")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("rank r")
    ax.set_ylabel("Var(scale * A B)")
    ax.set_title(f"Update variance vs rank (A, B ~ N(0,1), d={res['dim']}, alpha={res['alpha']:g})", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)


def _save_fig(fig: Any, path: Path) -> None:
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp)
    tmp.replace(path)


def _write_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------------------
# Part 2: fine-tuning at several ranks


@dataclasses.dataclass(frozen=True)
class LearningConfig:
    base_text: str = str(SHAKESPEARE)  # the base is trained on this file
    workdir: str = str(REPO / "workdirs" / "lora_rank")  # base params cache and metrics.jsonl (gitignored)
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 256  # rank 256 needs min(in, out) >= 256 for every adapted kernel
    block_size: int = 32
    batch_size: int = 16
    base_steps: int = 600
    base_lr: float = 2e-3
    ft_steps: int = 200
    ft_lr: float = 1e-3  # one learning rate for every rank, both scalings and the full fine-tune
    alpha: float = 16.0
    ranks: tuple[int, ...] = (4, 16, 64, 256)
    targets: tuple[str, ...] = ("all",)
    eval_every: int = 25
    eval_windows: int = 128
    full_finetune: bool = True
    seed: int = 0  # the base model's init and batches
    ft_seeds: tuple[int, ...] = (1, 2)  # every fine-tune runs once per seed (adapter init, batch order)


FULL = dict(n_layer=4, n_head=6, n_embd=384, block_size=128, batch_size=32, base_steps=2500, ft_steps=800,
            eval_every=50, eval_windows=128)


def load_corpora(base_text: str) -> tuple[CharTokenizer, dict[str, np.ndarray]]:
    """One char vocabulary over both texts; each text split 90/10 into train / val ids."""
    import pydoc_data.topics

    p = Path(base_text)
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist; pass --base-text with a text file (Tiny Shakespeare is "
                                "expected in ../shared/data beside the repository)")
    base = p.read_text()
    target = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    tok = CharTokenizer.from_text(base + target)
    out = {}
    for name, text in (("base", base), ("target", target)):
        ids = np.asarray(tok.encode(text), np.int32)
        n = int(0.9 * len(ids))
        out[f"{name}_train"], out[f"{name}_val"] = ids[:n], ids[n:]
    return tok, out


def model_config(lc: LearningConfig, vocab: int) -> GPTConfig:
    return GPTConfig(vocab_size=vocab, block_size=lc.block_size, n_layer=lc.n_layer, n_head=lc.n_head,
                     n_embd=lc.n_embd, dropout=0.0)


def _batches(ids: np.ndarray, T: int, batch: int, seed: int):
    """Endless random windows (x [B, T], y [B, T]); the same seed gives the same sequence to every run."""
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(ids) - T - 1, batch)
        yield (np.stack([ids[s:s + T] for s in starts]), np.stack([ids[s + 1:s + T + 1] for s in starts]))


def _eval_windows(ids: np.ndarray, T: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n evenly spaced held-out windows, the same for every run."""
    starts = np.linspace(0, len(ids) - T - 1, n).astype(int)
    return np.stack([ids[s:s + T] for s in starts]), np.stack([ids[s + 1:s + T + 1] for s in starts])


def train_loop(cfg: GPTConfig, effective: Callable[[Any, Any], Any], trainable: Any, frozen: Any,
               opt: optax.GradientTransformation, batches, steps: int, evals: dict[str, tuple[np.ndarray, np.ndarray]],
               eval_every: int, desc: str, log: Any = None, run: str = "") -> tuple[Any, list[dict[str, Any]]]:
    """Minimise next-token loss of `effective(trainable, frozen)` params w.r.t. `trainable` only.

    The frozen tree is an argument of the jitted step that is never differentiated, so the optimizer state
    holds only the trainable tree. Returns the trained tree and the eval records (step 0 included).
    """
    from tqdm import tqdm

    model = GPT(cfg)

    def loss_fn(tr: Any, fr: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        logits = model.apply({"params": effective(tr, fr)}, x)  # [B, T, V]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(tr, state, fr, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(tr, fr, x, y)
        updates, state = opt.update(grads, state, tr)
        return optax.apply_updates(tr, updates), state, loss

    eval_loss = jax.jit(loss_fn)
    # commit everything to one device up front: jit outputs are committed, and mixing committed and
    # uncommitted inputs between the first and later calls would compile every function twice
    device = jax.devices()[0]
    trainable, frozen = jax.device_put((trainable, frozen), device)
    state = jax.device_put(opt.init(trainable), device)
    records: list[dict[str, Any]] = []
    recent: list[float] = []
    t0 = time.time()

    def evaluate(i: int) -> None:
        rec: dict[str, Any] = {"run": run, "step": i, "time": round(time.time() - t0, 2)}
        if recent:
            rec["train_loss"] = float(np.mean(recent))
        for name, (x, y) in evals.items():
            rec[f"{name}_loss"] = float(np.mean([float(eval_loss(trainable, frozen, x[s:s + 32], y[s:s + 32]))
                                                 for s in range(0, len(x), 32)]))
        records.append(rec)
        if log is not None:
            log.write(json.dumps(rec) + "\n")
            log.flush()

    evaluate(0)
    with tqdm(range(1, steps + 1), desc=desc, leave=False) as bar:
        for i in bar:
            x, y = next(batches)
            trainable, state, loss = step(trainable, state, frozen, x, y)
            recent.append(float(loss))
            if i % eval_every == 0 or i == steps:
                evaluate(i)
                recent.clear()
                bar.set_postfix(loss=f"{records[-1].get('train_loss', float('nan')):.3f}")
    return trainable, records


def base_params(lc: LearningConfig, cfg: GPTConfig, data: dict[str, np.ndarray], log: Any) -> tuple[Any, dict]:
    """The base model: restored from lc.workdir when trained with the same settings, else trained and cached."""
    d = Path(lc.workdir) / "base"
    meta_file, ckpt = d / "meta.json", d / "params"
    key = {"model": cfg.to_dict(), "steps": lc.base_steps, "lr": lc.base_lr, "batch_size": lc.batch_size,
           "seed": lc.seed, "text": lc.base_text, "n_train": int(len(data["base_train"]))}
    if meta_file.is_file() and ckpt.is_dir():
        meta = json.loads(meta_file.read_text())
        if meta.get("key") == key:
            return restore_pytree(ckpt, jax.eval_shape(lambda: init_params(cfg, lc.seed))), meta
    sched = optax.warmup_cosine_decay_schedule(0.0, lc.base_lr, min(100, lc.base_steps // 10 + 1),
                                               max(lc.base_steps, 2), lc.base_lr / 10)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, b2=0.99, weight_decay=0.1))
    evals = {"base_val": _eval_windows(data["base_val"], cfg.block_size, lc.eval_windows)}
    t0 = time.time()
    params, records = train_loop(cfg, lambda tr, fr: tr, init_params(cfg, lc.seed), None, opt,
                                 _batches(data["base_train"], cfg.block_size, lc.batch_size, lc.seed),
                                 lc.base_steps, evals, max(lc.base_steps // 10, 1), "base", log, "base")
    d.mkdir(parents=True, exist_ok=True)
    if ckpt.exists():
        shutil.rmtree(ckpt)
    save_pytree(ckpt, params)
    meta = {"key": key, "train_seconds": time.time() - t0, "final": records[-1]}
    _write_json(meta, meta_file)
    return params, meta


def learning_study(lc: LearningConfig) -> dict[str, Any]:
    """Train (or load) the base, then fine-tune it on the target text at every rank with both scalings."""
    tok, data = load_corpora(lc.base_text)
    cfg = model_config(lc, tok.vocab_size)
    wd = Path(lc.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    T = cfg.block_size
    evals = {"target_val": _eval_windows(data["target_val"], T, lc.eval_windows),
             "base_val": _eval_windows(data["base_val"], T, lc.eval_windows)}
    results: dict[str, Any] = {"study": dataclasses.asdict(lc), "model": cfg.to_dict(), "vocab": tok.vocab_size,
                               "chars": {k: int(len(v)) for k, v in data.items()}, "runs": {}}
    with open(wd / "metrics.jsonl", "a") as log:
        params, meta = base_params(lc, cfg, data, log)
        results["base"] = {"train_seconds": meta["train_seconds"], "final": meta["final"]}
        results["param_count"] = int(sum(x.size for x in jax.tree.leaves(params)))
        opt = optax.adam(lc.ft_lr)
        for stable in (False, True):
            for r in lc.ranks:
                lcfg = lora.LoraConfig(rank=r, alpha=lc.alpha, targets=lc.targets, rank_stabilized=stable)
                name = f"{'rslora' if stable else 'lora'}_r{r}"
                t0 = time.time()
                per_seed = []
                for seed in lc.ft_seeds:  # seed: adapter init and the order of target batches
                    adapters = lora.init_lora(jax.random.PRNGKey(seed), params, lcfg)
                    per_seed.append(train_loop(
                        cfg, lambda ad, p, lcfg=lcfg: lora.apply_lora(p, ad, lcfg), adapters, params, opt,
                        _batches(data["target_train"], T, lc.batch_size, seed), lc.ft_steps, evals,
                        lc.eval_every, f"{name} seed {seed}", log, f"{name}/seed{seed}")[1])
                results["runs"][name] = {
                    "method": "rslora" if stable else "lora", "rank": r, "scale": lora.lora_scale(lcfg),
                    "trainable": lora.lora_param_count(params, lcfg)["trainable"],
                    "seconds": time.time() - t0, **_seed_summary(per_seed)}
        if lc.full_finetune:
            t0 = time.time()
            per_seed = [train_loop(cfg, lambda tr, fr: tr, params, None, opt,
                                   _batches(data["target_train"], T, lc.batch_size, seed), lc.ft_steps, evals,
                                   lc.eval_every, f"full seed {seed}", log, f"full/seed{seed}")[1]
                        for seed in lc.ft_seeds]
            results["runs"]["full"] = {"method": "full", "rank": None, "trainable": results["param_count"],
                                       "seconds": time.time() - t0, **_seed_summary(per_seed)}
    results["base_on_target"] = results["runs"][next(iter(results["runs"]))]["curve"][0]["target_val_loss"]
    return results


def _seed_summary(per_seed: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """Eval records of every seed plus their step-wise mean ("curve", "final") and the final spread."""
    keys = ("target_val_loss", "base_val_loss")
    curve = [{"step": recs[0]["step"], **{k: float(np.mean([r[k] for r in recs])) for k in keys}}
             for recs in zip(*per_seed)]
    finals = [recs[-1]["target_val_loss"] for recs in per_seed]
    return {"curve": curve, "final": curve[-1], "final_target_per_seed": finals,
            "final_target_spread": float(max(finals) - min(finals)), "curves_per_seed": per_seed}


def plot_learning(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = res["study"]["ranks"]
    colors = {r: plt.cm.viridis(i / max(len(ranks) - 1, 1)) for i, r in enumerate(ranks)}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4), dpi=120)
    for ax, method in zip(axes[:2], ("lora", "rslora")):
        for r in ranks:
            run = res["runs"][f"{method}_r{r}"]
            steps = [c["step"] for c in run["curve"]]
            ax.plot(steps, [c["target_val_loss"] for c in run["curve"]], "-", color=colors[r], label=f"r={r}")
        if "full" in res["runs"]:
            c = res["runs"]["full"]["curve"]
            ax.plot([x["step"] for x in c], [x["target_val_loss"] for x in c], "k--", lw=1, label="full fine-tune")
        ax.set_title(f"{'LoRA (alpha/r)' if method == 'lora' else 'RsLoRA (alpha/sqrt r)'}: held-out target loss",
                     fontsize=9)
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel("loss (nats/char)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    lo = min(min(c["target_val_loss"] for c in run["curve"][1:]) for run in res["runs"].values())
    hi = max(res["runs"][f"lora_r{r}"]["curve"][1]["target_val_loss"] for r in ranks)
    for ax in axes[:2]:
        ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    ax = axes[2]
    for method, marker, color in (("lora", "o-", "C0"), ("rslora", "s-", "C3")):
        ax.plot(ranks, [res["runs"][f"{method}_r{r}"]["final"]["target_val_loss"] for r in ranks], marker,
                color=color, label=("LoRA" if method == "lora" else "RsLoRA") + " (mean)")
        for r in ranks:  # every seed's final loss
            finals = res["runs"][f"{method}_r{r}"]["final_target_per_seed"]
            ax.plot([r] * len(finals), finals, ".", color=color, alpha=0.5, ms=5)
    if "full" in res["runs"]:
        ax.axhline(res["runs"]["full"]["final"]["target_val_loss"], color="k", ls="--", lw=1, label="full fine-tune")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set_xlabel("rank r")
    ax.set_ylabel("final held-out target loss")
    ax.set_title(f"after {res['study']['ft_steps']} steps, lr {res['study']['ft_lr']:g}, alpha {res['study']['alpha']:g}; "
                 f"dots: {len(res['study']['ft_seeds'])} seeds", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.suptitle("Fine-tuning a Tiny-Shakespeare char model on Python docs: LoRA vs RsLoRA across ranks", fontsize=10)
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------
# Command line


def summary_variance(res: dict[str, Any]) -> str:
    lines = [f"Variance of scale*A@B (A,B ~ N(0,1), d={res['dim']}, alpha={res['alpha']:g}, {res['seeds']} draws)",
             "| r | LoRA var | LoRA theory | RsLoRA var | RsLoRA theory |", "|---:|---:|---:|---:|---:|"]
    for row in res["rows"]:
        lines.append(f"| {row['rank']} | {row['lora']['var']:.4g} | {row['lora']['theory']:.4g} | "
                     f"{row['rslora']['var']:.4g} | {row['rslora']['theory']:.4g} |")
    lines.append(f"log-log slope: LoRA {res['slope']['lora']:+.4f}, RsLoRA {res['slope']['rslora']:+.4f}; "
                 f"max |measured/theory - 1|: LoRA {res['max_rel_err']['lora']:.4f}, "
                 f"RsLoRA {res['max_rel_err']['rslora']:.4f}")
    return "\n".join(lines)


def summary_learning(res: dict[str, Any]) -> str:
    lines = [f"base: {res['param_count']:,} params, {res['study']['base_steps']} steps, base val loss "
             f"{res['base']['final']['base_val_loss']:.4f}; on the target text before fine-tuning "
             f"{res['base_on_target']:.4f}",
             f"fine-tuning: {res['study']['ft_steps']} steps, mean over seeds {res['study']['ft_seeds']}",
             "| run | rank | scale | trainable | target val loss | seed spread | base val loss (forgetting) | s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, run in res["runs"].items():
        scale = f"{run['scale']:.4g}" if "scale" in run else "-"
        lines.append(f"| {name} | {run['rank'] or '-'} | {scale} | {run['trainable']:,} | "
                     f"{run['final']['target_val_loss']:.4f} | {run['final_target_spread']:.4f} | "
                     f"{run['final']['base_val_loss']:.4f} | "
                     f"{run['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = LearningConfig()
    ap.add_argument("--part", choices=("variance", "learning", "all"), default="all")
    ap.add_argument("--full", action="store_true", help=f"bigger model and longer runs: {FULL}")
    ap.add_argument("--out", default=str(REPO / "docs" / "figures"), help="folder for the JSON and PNG results")
    ap.add_argument("--workdir", default=d.workdir, help="base params cache and metrics.jsonl")
    ap.add_argument("--base-text", default=d.base_text, help="text the base model is trained on")
    ap.add_argument("--base-steps", type=int)
    ap.add_argument("--ft-steps", type=int)
    ap.add_argument("--ft-lr", type=float)
    ap.add_argument("--alpha", type=float)
    ap.add_argument("--ranks", help="comma-separated, e.g. 4,16,64,256")
    ap.add_argument("--ft-seeds", help="comma-separated fine-tuning seeds, e.g. 1 for a quicker look")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.part in ("variance", "all"):
        res = variance_study()
        _write_json(res, out / "lora_variance.json")
        plot_variance(res, out / "lora_variance.png")
        print(summary_variance(res))
    if args.part in ("learning", "all"):
        lc = dataclasses.replace(d, workdir=args.workdir, base_text=args.base_text, **(FULL if args.full else {}))
        changes = {k: v for k, v in (("base_steps", args.base_steps), ("ft_steps", args.ft_steps),
                                      ("ft_lr", args.ft_lr), ("alpha", args.alpha)) if v is not None}
        if args.ranks:
            changes["ranks"] = tuple(int(r) for r in args.ranks.split(","))
        if args.ft_seeds:
            changes["ft_seeds"] = tuple(int(s) for s in args.ft_seeds.split(","))
        lc = dataclasses.replace(lc, **changes)
        res = learning_study(lc)
        stem = "lora_rank_learning_full" if args.full else "lora_rank_learning"
        _write_json(res, out / f"{stem}.json")
        plot_learning(res, out / f"{stem}.png")
        print(summary_learning(res))


if __name__ == "__main__":
    main()
