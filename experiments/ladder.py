"""The ladder: GPT-2 to a modern LLM, one switch per rung, on nanoGPT's CPU recipe (configs/ladder.py).

    python -m experiments.ladder                 # 8 rungs x 3 seeds x 2000 steps, writes docs/figures/ladder*
    python -m experiments.ladder --steps 1000 --seeds 0 1    # a shorter ladder

Rungs (each keeps the ones before it): GPT-2 -> RoPE -> RMSNorm -> SwiGLU -> QK-norm -> GQA -> untied head ->
Muon. For every rung and seed the run is jaxgpt's trainer on Tiny Shakespeare characters (configs/ladder.py's
settings), evaluated every `eval_interval` steps on `eval_iters` random validation batches. Per rung:

- the validation loss at the step budget (median over seeds, with min and max);
- the steps to reach the GPT-2 rung's final validation loss (the target: the median over its seeds), linearly
  interpolated between the two evaluations that straddle it (None when a run never reaches it);
- the median ms per training step (from the trainer's tokens/s, evaluation excluded) and the 1-minute load
  average before and after the run: on a shared machine the wall time is the least reliable number here;
- wall time to the target = steps to target x ms/step, and its ratio to GPT-2's whole budget (steps x ms/step);
- KV-cache bytes per token (an empty jaxgpt.decode dense cache of the rung's config, by shape: K and V of every
  layer, float32) and the parameter count.

Seeds run in the outer loop (every rung of seed 0 first), and the JSON is rewritten after every run, so a run that
is cut off keeps every finished rung; rerunning reuses finished runs (experiments.common's run folders).
Outputs (docs/figures/): ladder.json, ladder.png (val loss per rung, median over seeds; steps to target).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from experiments import common

if str(common.REPO) not in sys.path:  # configs/*.py import their siblings as `configs.x`
    sys.path.insert(0, str(common.REPO))
from configs import ladder as ladder_config


@dataclasses.dataclass(frozen=True)
class LadderStudy:
    rungs: tuple[str, ...] = ladder_config.rung_names()
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 2000  # nanoGPT's CPU recipe
    eval_interval: int = 50
    eval_iters: int = 20
    # the model shape and optimizer settings below are configs/shakespeare_char_cpu.py's
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    batch_size: int = 12
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 0  # 0: steps / 20 (the recipe's 100 of 2000)
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    cost_rounds: int = 5  # rounds of step_costs after the runs (0: none)


def recipe_model(s: LadderStudy) -> dict[str, Any]:
    """The GPTConfig fields every rung shares (configs/shakespeare_char_cpu.py at the study's shape)."""
    c = ladder_config.get_config("gpt2")
    model = {k: c.model[k] for k in ("dropout", "bias", "attention")}
    return {**model, "n_layer": s.n_layer, "n_head": s.n_head, "n_embd": s.n_embd, "block_size": s.block_size}


def rung_spec(s: LadderStudy, rung: str, seed: int) -> common.RunSpec:
    model, train = ladder_config.switches(rung)
    return common.RunSpec(name=f"{rung}_seed{seed}", model={**recipe_model(s), **model}, steps=s.steps,
                          batch_size=s.batch_size, learning_rate=s.learning_rate, min_lr=s.min_lr,
                          warmup_iters=s.warmup_iters or s.steps // 20, grad_clip=s.grad_clip, weight_decay=s.weight_decay,
                          eval_interval=s.eval_interval, eval_iters=s.eval_iters, seed=seed, train=train)


def kv_bytes_per_token(cfg: Any) -> int:
    """Bytes one token takes in an empty dense KV cache of `cfg` (float32), counted from the cache's shapes."""
    from jaxgpt.decode import new_cache

    length = 16
    cache = jax.eval_shape(lambda: new_cache("dense", cfg, batch=1, max_len=length, dtype="float32"))
    per_position = [x.size * x.dtype.itemsize for x in jax.tree.leaves(cache) if length in x.shape]
    return sum(per_position) // length


def ms_per_step(r: common.RunResult, tokens_per_step: int) -> float | None:
    """Median ms per training step over the run's log records (tokens/s since the last evaluation)."""
    from jaxgpt.train import metrics

    tps = [float(x["tokens_per_s"]) for x in metrics.read_metrics(Path(r.workdir) / "metrics.jsonl")
           if x.get("kind") == "train" and x.get("tokens_per_s")]
    return 1000.0 * tokens_per_step / float(np.median(tps)) if tps else None


def step_costs(s: LadderStudy, vocab_size: int, rounds: int = 5, steps_per_round: int = 20) -> dict[str, Any]:
    """ms per train step of every rung measured back to back: each round times `steps_per_round` steps of every
    rung in turn (programs compiled once, before the first round), so every rung sees the same load; the median
    over rounds per rung, and each round's ratio to GPT-2's, whose median is the load-independent cost."""
    import jax.numpy as jnp

    from jaxgpt.nn.config import GPTConfig
    from jaxgpt.nn.model import init_params
    from jaxgpt.train import steps as steps_lib
    from jaxgpt.train.config import MeshConfig, OptimConfig
    from jaxgpt.train.program import build_program

    progs = {}
    x = jnp.asarray(np.random.default_rng(0).integers(0, vocab_size, (1, s.batch_size, s.block_size)), jnp.int32)
    for rung in s.rungs:
        spec = rung_spec(s, rung, 0)
        c = common.training_config(spec, "unused")
        cfg = GPTConfig.from_dict({**c.model.to_dict(), "vocab_size": vocab_size})
        prog = build_program(cfg, OptimConfig.of(c), MeshConfig.of(c.mesh), grad_accum=1, batch_rows=s.batch_size)
        state = prog.layout.inward(steps_lib.init_state(init_params(cfg, 0), prog.tx))
        state, m = prog.train_step(state, (x, x), jax.random.PRNGKey(0), None)  # compiles
        jax.block_until_ready(m)
        progs[rung] = [prog, state]
    times: dict[str, list[float]] = {r: [] for r in s.rungs}
    for _ in range(rounds):
        for rung, ps in progs.items():
            t0 = time.perf_counter()
            for _ in range(steps_per_round):
                ps[1], m = ps[0].train_step(ps[1], (x, x), jax.random.PRNGKey(0), None)
            jax.block_until_ready(m)
            times[rung].append(1000.0 * (time.perf_counter() - t0) / steps_per_round)
    base = times[s.rungs[0]]
    return {"rounds": rounds, "steps_per_round": steps_per_round, "load": round(os.getloadavg()[0], 2),
            "ms_per_step": {r: float(np.median(t)) for r, t in times.items()},
            "vs_gpt2": {r: float(np.median(np.asarray(t) / np.asarray(base))) for r, t in times.items()}}


def steps_to(evals: Sequence[dict[str, float]], target: float) -> float | None:
    """The first step at which the val loss reaches `target`, linearly interpolated between the evaluation before
    and the one at or below it; None if no evaluation reaches it."""
    prev = None
    for e in evals:
        if e["val_loss"] <= target:
            if prev is None:
                return float(e["step"])
            (s0, v0), (s1, v1) = (prev["step"], prev["val_loss"]), (e["step"], e["val_loss"])
            return float(s0 + (s1 - s0) * (v0 - target) / (v0 - v1))
        prev = e
    return None


def one_run(s: LadderStudy, rung: str, seed: int, data_dir: Path, root: Path, fresh: bool,
            progress: bool) -> dict[str, Any]:
    from jaxgpt.nn.model import count_params

    load_before = os.getloadavg()[0]
    r = common.train_run(rung_spec(s, rung, seed), data_dir, root, fresh=fresh, progress=progress)
    return {"rung": rung, "seed": seed, "evals": [{"step": int(e["step"]), "val_loss": float(e["val_loss"])}
                                                  for e in r.evals],
            "final_val_loss": r.val_loss, "ms_per_step": ms_per_step(r, s.batch_size * s.block_size),
            "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2),
            "wall_s": round(r.wall_s, 1), "non_finite_step": r.non_finite_step,
            "params": count_params(r.params()), "kv_bytes_per_token": kv_bytes_per_token(r.config)}


def _spread(values: Sequence[float | None]) -> dict[str, Any]:
    """median, min, max of the known values, and how many of them there are of all."""
    known = [v for v in values if v is not None]
    if not known:
        return {"median": None, "min": None, "max": None, "n": 0, "of": len(values)}
    return {"median": float(np.median(known)), "min": float(min(known)), "max": float(max(known)),
            "n": len(known), "of": len(values)}


def summarize(s: LadderStudy, runs: Sequence[dict[str, Any]], cost: dict[str, Any] | None = None) -> dict[str, Any]:
    """Per rung: final val loss, steps and wall time to the GPT-2 target, over the seeds finished so far. Wall time
    to the target against GPT-2's whole budget comes twice: with each run's own ms/step (taken at whatever load
    the machine had then), and with the step cost of `step_costs` (every rung timed back to back) when given."""
    base = [r for r in runs if r["rung"] == s.rungs[0]]
    target = float(np.median([r["final_val_loss"] for r in base])) if base else None
    base_ms = _spread([r["ms_per_step"] for r in base])["median"]
    rows = []
    for rung in s.rungs:
        rs = [r for r in runs if r["rung"] == rung]
        if not rs:
            continue
        to_target = [steps_to(r["evals"], target) if target is not None else None for r in rs]
        ms = _spread([r["ms_per_step"] for r in rs])
        ratios = [t * r["ms_per_step"] / (s.steps * base_ms) if t is not None and base_ms else None
                  for t, r in zip(to_target, rs)]
        model, train = ladder_config.switches(rung)
        rows.append({"rung": rung, "switches": {"model": model, "train": train}, "seeds": [r["seed"] for r in rs],
                     "final_val_loss": _spread([r["final_val_loss"] for r in rs]),
                     "steps_to_target": _spread(to_target), "ms_per_step": ms,
                     "wall_to_target_vs_gpt2": _spread(ratios),
                     "wall_to_target_vs_gpt2_back_to_back": _spread(
                         [t * cost["vs_gpt2"][rung] / s.steps if t is not None and cost else None for t in to_target]),
                     "load": [r["load_before"] for r in rs] + [r["load_after"] for r in rs],
                     "params": rs[0]["params"], "kv_bytes_per_token": rs[0]["kv_bytes_per_token"]})
    return {"target_val_loss": target, "gpt2_ms_per_step": base_ms, "rungs": rows}


def run(s: LadderStudy, *, data_dir: str | Path | None = None, workdir: str | Path | None = None,
        out_dir: str | Path = common.FIGURES, suffix: str = "", fresh: bool = False,
        progress: bool = True) -> dict[str, Any]:
    """Train every rung for every seed (seeds outermost), rewriting the JSON after each run; then the figure."""
    ddir, root, out = common.char_data(data_dir), Path(workdir) if workdir else common.RUNS, Path(out_dir)
    t0, runs = time.perf_counter(), []
    res: dict[str, Any] = {}
    for seed in s.seeds:
        for rung in s.rungs:
            runs.append(one_run(s, rung, seed, ddir, root, fresh, progress))
            res = {"study": dataclasses.asdict(s), "dataset": "Tiny Shakespeare (characters)",
                   "command": "python -m experiments.ladder " + " ".join(sys.argv[1:]),
                   "cpu_count": os.cpu_count(), "wall_s": round(time.perf_counter() - t0, 1),
                   "summary": summarize(s, runs), "runs": runs}
            common.write_json(out / f"ladder{suffix}.json", res)
    if s.cost_rounds:
        res = with_step_costs(s, res, ddir)
        common.write_json(out / f"ladder{suffix}.json", res)
    plot(res, out / f"ladder{suffix}.png")
    return res


def with_step_costs(s: LadderStudy, res: dict[str, Any], data_dir: Path) -> dict[str, Any]:
    """`res` with the back-to-back step costs of every rung (`step_costs`) and its summary recomputed."""
    from jaxgpt import data as data_lib

    cost = step_costs(s, int(data_lib.load_meta(data_dir)["vocab_size"]), rounds=s.cost_rounds)
    return {**res, "step_cost": cost, "summary": summarize(s, res["runs"], cost)}


def cost_only(path: Path, data_dir: str | Path | None, rounds: int) -> dict[str, Any]:
    """Add the back-to-back step costs to a finished ladder's JSON, with the study it was run with."""
    import json

    res = json.loads(path.read_text())
    s = LadderStudy(**{**res["study"], "rungs": tuple(res["study"]["rungs"]), "seeds": tuple(res["study"]["seeds"]),
                       "cost_rounds": rounds})
    res = with_step_costs(s, {**res, "study": dataclasses.asdict(s)}, common.char_data(data_dir))
    common.write_json(path, res)
    plot(res, path.with_suffix(".png"))
    return res


def plot(res: dict[str, Any], path: Path) -> Path:
    """Left: val loss per rung (median over seeds, band min-max) and the target; right: steps to the target."""
    plt = common.pyplot()
    s, summ = res["study"], res["summary"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.6), gridspec_kw={"width_ratios": [1.4, 1]})
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(s["rungs"])))
    for color, rung in zip(colors, s["rungs"]):
        rs = [r for r in res["runs"] if r["rung"] == rung]
        if not rs:
            continue
        n = min(len(r["evals"]) for r in rs)
        steps_ = [e["step"] for e in rs[0]["evals"][:n]]
        vals = np.asarray([[e["val_loss"] for e in r["evals"][:n]] for r in rs])  # [seeds, evals]
        ax.plot(steps_, np.median(vals, 0), color=color, lw=1.3, label=f"{rung} ({len(rs)} seeds)")
        ax.fill_between(steps_, vals.min(0), vals.max(0), color=color, alpha=0.15)
    if summ["target_val_loss"] is not None:
        ax.axhline(summ["target_val_loss"], color="k", ls="--", lw=0.8, label="target: GPT-2's final val")
        lowest = min(r["final_val_loss"]["min"] for r in summ["rungs"])
        ax.set_ylim(lowest - 0.05, summ["target_val_loss"] + 0.9)
    ax.set_xlabel("step")
    ax.set_ylabel("val loss (nats/char)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    rows = summ["rungs"]
    ys = np.arange(len(rows))
    med = [r["steps_to_target"]["median"] or np.nan for r in rows]
    lo = [m - (r["steps_to_target"]["min"] or m) for m, r in zip(med, rows)]
    hi = [(r["steps_to_target"]["max"] or m) - m for m, r in zip(med, rows)]
    bx.barh(ys, med, xerr=[lo, hi], color=colors[:len(rows)], capsize=3)
    for y, r, m, h in zip(ys, rows, med, hi):
        w = r.get("wall_to_target_vs_gpt2_back_to_back", {}).get("median") or r["wall_to_target_vs_gpt2"]["median"]
        reached = f"{r['steps_to_target']['n']}/{r['steps_to_target']['of']} seeds"
        text = f"  {m:.0f} steps, wall {w:.2f}x GPT-2's ({reached})" if np.isfinite(m) else f" not reached ({reached})"
        bx.text(0 if not np.isfinite(m) else m + h, y, text, va="center", fontsize=7)
    bx.set_yticks(list(ys), [r["rung"] for r in rows], fontsize=8)
    bx.invert_yaxis()
    bx.set_xlim(0, s["steps"] * 1.45)
    bx.set_xlabel("steps to GPT-2's final val loss (median, min-max over seeds); wall: x step cost")
    bx.grid(alpha=0.3, axis="x")
    fig.suptitle(f"GPT-2 to a modern LLM, one switch per rung: {s['n_layer']} layers x {s['n_embd']}, "
                 f"{s['steps']} steps, Tiny Shakespeare characters", fontsize=10)
    fig.tight_layout()
    return common.save_figure(fig, path)


def table(res: dict[str, Any]) -> str:
    """The Markdown table of docs/design.md's ladder section."""
    def spread(d: dict[str, Any], fmt: str) -> str:
        if d["median"] is None:
            return f"not reached (0/{d['of']})"
        tail = "" if d["n"] == d["of"] else f", {d['n']}/{d['of']} reached"
        return f"{d['median']:{fmt}} [{d['min']:{fmt}}, {d['max']:{fmt}}]{tail}"

    rows = []
    for r in res["summary"]["rungs"]:
        cost = res.get("step_cost", {}).get("vs_gpt2", {}).get(r["rung"])
        rows.append([r["rung"], f"{r['params']:,}", f"{r['kv_bytes_per_token']:,}",
                     spread(r["final_val_loss"], ".3f"), spread(r["steps_to_target"], ".0f"),
                     spread(r["ms_per_step"], ".1f"), f"{min(r['load']):.1f}-{max(r['load']):.1f}",
                     spread(r["wall_to_target_vs_gpt2"], ".2f"), "-" if cost is None else f"{cost:.2f}",
                     "-" if cost is None else spread(r["wall_to_target_vs_gpt2_back_to_back"], ".2f")])
    return common.markdown_table(["rung (+ all above)", "params", "KV bytes/token", "final val loss",
                                  "steps to GPT-2's final val", "ms/step (in its runs)", "load (1 min)",
                                  "wall to target / GPT-2's (runs' ms/step)", "step cost / GPT-2's (back to back)",
                                  "wall to target / GPT-2's (back to back)"], rows)


def main(argv: Sequence[str] | None = None) -> None:
    def extra(ap):
        ap.add_argument("--steps", type=int, default=LadderStudy.steps, help="training steps per run")
        ap.add_argument("--seeds", type=int, nargs="+", default=list(LadderStudy.seeds))
        ap.add_argument("--eval-interval", type=int, default=LadderStudy.eval_interval)
        ap.add_argument("--eval-iters", type=int, default=LadderStudy.eval_iters)
        ap.add_argument("--cost-rounds", type=int, default=LadderStudy.cost_rounds,
                        help="rounds of back-to-back step timing after the runs (0: none)")
        ap.add_argument("--cost-only", action="store_true",
                        help="only add the back-to-back step costs to an existing ladder.json (and redraw)")
        ap.add_argument("--rungs", nargs="+", default=list(LadderStudy.rungs), choices=ladder_config.rung_names())

    a = common.study_args(__doc__, "no bigger version: the ladder is a CPU study", argv, extra)
    study = LadderStudy(steps=a.steps, seeds=tuple(a.seeds), rungs=tuple(a.rungs), eval_interval=a.eval_interval,
                        eval_iters=a.eval_iters, cost_rounds=a.cost_rounds)
    if a.cost_only:
        res = cost_only(Path(a.out) / "ladder.json", a.data_dir, a.cost_rounds)
    else:
        res = run(study, data_dir=a.data_dir, workdir=a.workdir, out_dir=a.out, fresh=a.fresh,
                  progress=not a.quiet)
    print(f"target (GPT-2's final val loss, median over seeds): {res['summary']['target_val_loss']:.4f}")
    print(table(res))


if __name__ == "__main__":
    main()
