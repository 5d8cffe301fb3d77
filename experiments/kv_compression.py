"""How much does a compressed KV cache cost in quality? int8, TurboQuant and a uniform baseline.

    python -m experiments.kv_compression            # CPU size: trains (or reuses) a small char model, writes docs/figures/
    python -m experiments.kv_compression --full     # a longer-trained, wider model and more text, for an accelerator

A char-level jaxgpt model is trained on Tiny Shakespeare through experiments/common.py (cached under
workdirs/experiments/kv_compression/). A trained model is needed: random weights make attention near-uniform,
which hides cache errors. On held-out windows of the validation split, for every cache kind of
`jaxgpt.decode.kv_compress` in the study (dense float32 reference, int8, turbo{4,3.5,3,2.5,2}, uniform{4,3.5,3,2.5,2}):

  perplexity        teacher-forced through the cache: a short prefix is prefilled (written compressed, as in
                    `generate`), then every true token is fed one at a time through `GPT.apply(cache=...)` in a
                    jitted lax.scan, accumulating the next-token NLL. Reported over the token-by-token positions
                    (and over the whole window). The dense cache must reproduce the full forward's NLL: checked.
  logit RMSE        root-mean-square difference of the logits from the dense cache's, same positions.
  greedy agreement  `generate(..., DecodeOptions(temperature=0, cache_kind=kind))` from several prompts: the
                    fraction of the N new tokens identical to the dense cache's tokens, and the first position
                    where they differ.
  decode tokens/s   the same greedy `generate` (prefill + lax.scan, compiled apart) timed on this machine.
  bits / bytes      `kv_compress.bits_per_value` (indices + norms/scales per token) and bytes per token of
                    `compressed_cache_bytes` for this model and for the GPT-2 124M shape at 1024 context.

Outputs (docs/figures/, --full adds _full): kv_compression.json, kv_compression.png (perplexity increase and
greedy agreement vs bits per value, TurboQuant vs uniform).
"""

from __future__ import annotations

import dataclasses
import math
import time
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from tqdm import tqdm

from experiments import common
from jaxgpt.decode import generation as gen
from jaxgpt.decode import kv_compress
from jaxgpt.decode.cache_kinds import new_cache, parse_kind
from jaxgpt.decode.kv_cache import KVCache
from jaxgpt.decode.options import DecodeOptions
from jaxgpt.nn.config import GPTConfig, param_count
from jaxgpt.nn.model import GPT

DENSE = "float32"  # the reference cache: the model's own compute dtype, uncompressed
TURBO = ("turbo4", "turbo3.5", "turbo3", "turbo2.5", "turbo2")
UNIFORM = ("uniform4", "uniform3.5", "uniform3", "uniform2.5", "uniform2")


@dataclasses.dataclass(frozen=True)
class KVStudy:
    kinds: tuple[str, ...] = (DENSE, "int8") + TURBO + UNIFORM
    # the model: GPT-2's head_dim of 64 (2 heads x 64), so bits per value match GPT-2's
    n_layer: int = 4
    n_head: int = 2
    n_embd: int = 128
    block_size: int = 128
    steps: int = 300
    batch_size: int = 16
    learning_rate: float = 3e-3
    min_lr: float = 3e-4
    warmup_iters: int = 30
    eval_iters: int = 20
    # perplexity: windows of block_size tokens, the first `prefix` prefilled, the rest fed one at a time
    eval_windows: int = 16
    prefix: int = 16
    # greedy agreement and decode speed: prompts of prompt_len tokens continued by new_tokens (one batch);
    # tokens/s is the best of speed_repeats timed calls after a first call that compiles
    prompts: int = 8
    prompt_len: int = 32
    new_tokens: int = 96
    speed_repeats: int = 3
    cache_seed: int = 0  # rotations / QJL matrices of the compressed caches
    seed: int = 1337  # training and data windows


FULL = KVStudy(n_layer=6, n_head=6, n_embd=384, block_size=256, steps=3000, batch_size=32, learning_rate=1e-3,
               min_lr=1e-4, warmup_iters=200, eval_windows=64, prefix=32, prompts=32, prompt_len=64,
               new_tokens=192)


def _check(s: KVStudy, kinds: Sequence[str]) -> None:
    """Clear errors for settings the study cannot run."""
    if DENSE not in kinds:
        raise ValueError(f"kinds must include the dense reference {DENSE!r}; got {tuple(kinds)}")
    for k in kinds:
        parse_kind(k)  # ValueError naming the bad kind and the valid ones
    if not 0 < s.prefix < s.block_size:
        raise ValueError(f"prefix={s.prefix} must lie in 1 .. block_size-1={s.block_size - 1}")
    if s.prompt_len + s.new_tokens > s.block_size:
        raise ValueError(f"prompt_len + new_tokens = {s.prompt_len + s.new_tokens} exceeds block_size "
                         f"{s.block_size} (learned positions); shorten the prompts or the continuation")


# ---------------------------------------------------------------------------------------------------------
# Measurements


def _nll(logits: jax.Array, y: jax.Array) -> jax.Array:
    """Next-token NLL: logits [..., V], targets y [...] -> [...] float32."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0]


@partial(jax.jit, static_argnames=("cfg", "kind", "prefix", "seed"))
def teacher_forced(params: Any, x: jax.Array, y: jax.Array, *, cfg: GPTConfig, kind: str, prefix: int,
                   seed: int) -> tuple[jax.Array, jax.Array]:
    """NLL [B, T] and logits [B, T, V] of windows x, y [B, T] read through a `kind` cache.

    x[:, :prefix] is prefilled in one call (written compressed, then read back, as `generate` does); each
    later token is fed alone through `GPT.apply(cache=...)` inside lax.scan, so every key and value it
    attends to has gone through the cache's write and read.
    """
    B, T = x.shape
    model = GPT(cfg)
    cache = new_cache(kind, cfg, B, T, seed=seed)  # "float32" is the dense reference
    logits0, cache = model.apply({"params": params}, x[:, :prefix], cache=cache)  # [B, prefix, V]

    def step(cache: KVCache, tok: jax.Array) -> tuple[KVCache, jax.Array]:
        logits, cache = model.apply({"params": params}, tok[:, None], cache=cache)  # [B, 1, V]
        return cache, logits[:, 0]

    _, logits1 = lax.scan(step, cache, x[:, prefix:].T)  # [T - prefix, B, V]
    logits = jnp.concatenate([logits0, jnp.swapaxes(logits1, 0, 1)], axis=1)  # [B, T, V]
    return _nll(logits, y), logits


@partial(jax.jit, static_argnames=("cfg",))
def full_forward(params: Any, x: jax.Array, y: jax.Array, *, cfg: GPTConfig) -> tuple[jax.Array, jax.Array]:
    """NLL [B, T] and logits [B, T, V] of the plain causal forward pass, no cache."""
    logits = GPT(cfg).apply({"params": params}, x)
    return _nll(logits, y), logits


def greedy_timed(params: Any, cfg: GPTConfig, prompts: np.ndarray, n_new: int, kind: str,
                 repeats: int) -> tuple[np.ndarray, dict[str, float]]:
    """Greedy continuation [B, n_new] of prompts [B, P] with a `kind` cache (`jaxgpt.decode.generation`: prefill +
    lax.scan), and its speed: new tokens per second, best of `repeats` calls after the compiling one."""
    options = DecodeOptions(temperature=0.0, cache_kind=kind)
    t0 = time.perf_counter()
    toks = np.asarray(gen.generate(params, cfg, prompts, n_new, options).tokens)
    first_s = time.perf_counter() - t0  # compile + one run
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(gen.generate(params, cfg, prompts, n_new, options).tokens)
        best = min(best, time.perf_counter() - t0)
    speed = {"tokens_per_s": prompts.shape[0] * n_new / best, "seconds": best, "first_call_s": first_s}
    return toks, speed if repeats > 0 else {}


def bits_and_bytes(cfg: GPTConfig, kind: str, max_len: int) -> dict[str, float]:
    """Stored bits per value and bytes per cached token (all layers, keys + values) from kv_compress, for
    this model at max_len and for the GPT-2 124M shape at 1024 context (per-layer constants amortized)."""
    gpt2 = GPTConfig.preset("gpt2")
    return {"bits_per_value": kv_compress.bits_per_value(cfg, kind),
            "bytes_per_token": kv_compress.compressed_cache_bytes(cfg, 1, max_len, kind) / max_len,
            "gpt2_bytes_per_token": kv_compress.compressed_cache_bytes(gpt2, 1, 1024, kind) / 1024,
            "gpt2_x_smaller_than_bf16": (kv_compress.compressed_cache_bytes(gpt2, 1, 1024, "bfloat16")
                                         / kv_compress.compressed_cache_bytes(gpt2, 1, 1024, kind))}


def evaluate(s: KVStudy, cfg: GPTConfig, params: Any, x: np.ndarray, y: np.ndarray, prompts: np.ndarray,
             kinds: Sequence[str] | None = None, progress: bool = True) -> dict[str, Any]:
    """All measurements of every kind on windows x, y [N, T] and prompts [P, prompt_len].

    The dense reference comes first; every other kind is compared to it on the same tokens.
    """
    kinds = tuple(kinds or s.kinds)
    _check(s, kinds)
    kinds = (DENSE,) + tuple(k for k in kinds if k != DENSE)
    x, y = jnp.asarray(x), jnp.asarray(y)
    P = s.prefix
    nll_full, logits_full = full_forward(params, x, y, cfg=cfg)
    nll_full = np.asarray(nll_full, np.float64)

    ref: dict[str, Any] = {}
    out: dict[str, Any] = {}
    for kind in tqdm(kinds, desc="kv kinds", disable=not progress):
        nll, logits = teacher_forced(params, x, y, cfg=cfg, kind=kind, prefix=P, seed=s.cache_seed)
        nll = np.asarray(nll, np.float64)  # [N, T]
        toks, speed = greedy_timed(params, cfg, prompts, s.new_tokens, kind, s.speed_repeats)  # [P, new]
        if kind == DENSE:
            ref = {"logits": logits, "tokens": toks, "nll": nll}
        same = toks == ref["tokens"]  # [prompts, new_tokens]
        first_diff = np.where(same.all(axis=1), s.new_tokens, np.argmin(same, axis=1))
        r = {
            "perplexity": float(np.exp(nll[:, P:].mean())),  # the token-by-token positions
            "perplexity_window": float(np.exp(nll.mean())),  # all positions, prefix included
            "logit_rmse": float(jnp.sqrt(jnp.mean(jnp.square(logits[:, P:] - ref["logits"][:, P:])))),
            "nll_mean_abs_diff": float(np.abs(nll[:, P:] - ref["nll"][:, P:]).mean()),
            "greedy_agreement": float(same.mean()),
            "greedy_first_diff_mean": float(first_diff.mean()),
            **bits_and_bytes(cfg, kind, x.shape[1]),
            **speed,
        }
        out[kind] = r
    base = out[DENSE]["perplexity"]
    for r in out.values():
        r["ppl_increase_pct"] = 100.0 * (r["perplexity"] / base - 1.0)
        if "tokens_per_s" in r:
            r["speed_vs_dense"] = r["tokens_per_s"] / out[DENSE]["tokens_per_s"]
    # the check that makes the rest meaningful: the dense cache reproduces the full forward pass
    dense_nll = ref["nll"]
    check = {"full_forward_perplexity": float(np.exp(nll_full[:, P:].mean())),
             "dense_cache_perplexity": out[DENSE]["perplexity"],
             "max_abs_nll_diff": float(np.abs(dense_nll - nll_full).max()),
             "max_abs_logit_diff": float(jnp.max(jnp.abs(ref["logits"] - logits_full)))}
    check["rel_ppl_diff"] = abs(check["dense_cache_perplexity"] / check["full_forward_perplexity"] - 1.0)
    return {"kinds": out, "dense_check": check, "eval_tokens": int(x.shape[0] * (x.shape[1] - P)),
            "greedy_tokens": int(prompts.shape[0] * s.new_tokens)}


# ---------------------------------------------------------------------------------------------------------
# The study


def train_model(s: KVStudy, data_dir: Path, workdir: Path, fresh: bool, progress: bool) -> tuple[GPTConfig, Any, dict]:
    """Train (or reuse) the study's char model with common.train_run; returns (config, params, summary)."""
    fields = dict(n_layer=s.n_layer, n_head=s.n_head, n_embd=s.n_embd, block_size=s.block_size, dropout=0.0)
    spec = common.RunSpec(name="kv_model", model=fields, steps=s.steps, batch_size=s.batch_size,
                          learning_rate=s.learning_rate, min_lr=s.min_lr, warmup_iters=s.warmup_iters,
                          eval_iters=s.eval_iters, seed=s.seed)
    r = common.train_run(spec, data_dir, workdir / "model", fresh=fresh, progress=progress)
    if r.non_finite_step is not None:
        raise FloatingPointError(f"the study's model diverged at step {r.non_finite_step}; see {r.workdir}")
    return r.config, r.params(), {**r.summary(), "params": param_count(r.config)["total"]}


def data_inputs(s: KVStudy, data_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Held-out windows x, y [eval_windows, block_size] and prompts [prompts, prompt_len] from the val split."""
    x, y = common.val_windows(data_dir, s.block_size, s.eval_windows, s.seed)
    px, _ = common.val_windows(data_dir, s.prompt_len, s.prompts, s.seed + 1)
    return np.asarray(x, np.int32), np.asarray(y, np.int32), np.asarray(px, np.int32)


def write_outputs(res: dict[str, Any], out_dir: str | Path, suffix: str = "") -> tuple[Path, Path]:
    """kv_compression{suffix}.json and .png under out_dir (atomic writes)."""
    out = Path(out_dir)
    j = common.write_json(out / f"kv_compression{suffix}.json", res)
    p = plot(res, out / f"kv_compression{suffix}.png")
    return j, p


def run(s: KVStudy, *, data_dir: str | Path | None = None, workdir: str | Path | None = None,
        out_dir: str | Path = common.FIGURES, suffix: str = "", fresh: bool = False,
        progress: bool = True) -> dict[str, Any]:
    """Train or reuse the model, measure every kind, write JSON and PNG."""
    _check(s, s.kinds)
    ddir = common.char_data(data_dir)
    wd = Path(workdir) if workdir else common.WORKDIRS / "kv_compression"
    t0 = time.perf_counter()
    cfg, params, model_summary = train_model(s, ddir, wd, fresh, progress)
    x, y, prompts = data_inputs(s, ddir)
    res = evaluate(s, cfg, params, x, y, prompts, progress=progress)
    res.update({"study": dataclasses.asdict(s), "model": {**model_summary, "config": cfg.to_dict()},
                "dataset": "Tiny Shakespeare, characters (validation split)", "device": jax.devices()[0].device_kind,
                "wall_s": round(time.perf_counter() - t0, 1)})
    write_outputs(res, out_dir, suffix)
    return res


# ---------------------------------------------------------------------------------------------------------
# Figure and table


def plot(res: dict[str, Any], path: Path) -> Path:
    plt = common.pyplot()
    ks = res["kinds"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for family, color, marker in (("turbo", "tab:red", "o"), ("uniform", "tab:gray", "s")):
        names = [k for k in ks if k.startswith(family) and not k.endswith("-prod")]
        names.sort(key=lambda k: ks[k]["bits_per_value"])
        bits = [ks[k]["bits_per_value"] for k in names]
        label = "TurboQuant (rotation + Lloyd-Max)" if family == "turbo" else "uniform per coordinate (no rotation)"
        a.plot(bits, [max(ks[k]["ppl_increase_pct"], 1e-3) for k in names], marker + "-", color=color, label=label)
        b.plot(bits, [100 * ks[k]["greedy_agreement"] for k in names], marker + "-", color=color, label=label)
        for k, bx in zip(names, bits):
            a.annotate(k.replace(family, ""), (bx, max(ks[k]["ppl_increase_pct"], 1e-3)), fontsize=7,
                       textcoords="offset points", xytext=(3, 3))
    if "int8" in ks:
        r = ks["int8"]
        a.plot([r["bits_per_value"]], [max(r["ppl_increase_pct"], 1e-3)], "D", color="tab:blue", label="int8 absmax")
        b.plot([r["bits_per_value"]], [100 * r["greedy_agreement"]], "D", color="tab:blue", label="int8 absmax")
    a.axhline(1.0, color="k", ls=":", lw=1)
    a.text(a.get_xlim()[0], 1.0, " 1% goal", fontsize=8, va="bottom")
    a.set_yscale("log")
    a.set_xlabel("stored bits per value (indices + norms / scales)")
    a.set_ylabel("perplexity increase over the dense cache (%)")
    a.set_title("teacher-forced, token by token through the cache", fontsize=9)
    b.set_xlabel("stored bits per value (indices + norms / scales)")
    b.set_ylabel("greedy tokens identical to the dense cache's (%)")
    b.set_title(f"greedy decoding, {res['study']['new_tokens']} new tokens x {res['study']['prompts']} prompts",
                fontsize=9)
    for ax in (a, b):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    m = res.get("model", {}).get("config", {})
    fig.suptitle(f"KV-cache compression on a trained char model ({m.get('n_layer', '?')} layers x "
                 f"{m.get('n_embd', '?')} wide, head_dim {m.get('n_embd', 0) // max(m.get('n_head', 1), 1)}); "
                 f"dense perplexity {ks['float32']['perplexity']:.3f}", fontsize=10)
    fig.tight_layout()
    return common.save_figure(fig, path)


def summary(res: dict[str, Any]) -> str:
    rows = []
    for k, r in res["kinds"].items():
        speed = f"{r['tokens_per_s']:.0f} ({r['speed_vs_dense']:.2f}x)" if "tokens_per_s" in r else "-"
        rows.append([k, f"{r['bits_per_value']:.2f}", f"{r['bytes_per_token']:.0f}",
                     f"{r['gpt2_x_smaller_than_bf16']:.2f}x", f"{r['perplexity']:.4f}",
                     f"{r['ppl_increase_pct']:+.2f}%", f"{r['logit_rmse']:.4f}",
                     f"{100 * r['greedy_agreement']:.1f}%", f"{r['greedy_first_diff_mean']:.0f}", speed])
    c = res["dense_check"]
    note = (f"\ndense cache vs full forward: perplexity {c['dense_cache_perplexity']:.6f} vs "
            f"{c['full_forward_perplexity']:.6f} (max |dNLL| {c['max_abs_nll_diff']:.1e})")
    return common.markdown_table(
        ["cache", "bits/value", "bytes/token", "GPT-2 124M vs bf16", "perplexity", "vs dense", "logit RMSE",
         "greedy agreement", "first diff (mean)", "decode tok/s"], rows) + note


def main(argv: Sequence[str] | None = None) -> None:
    a = common.study_args(__doc__, str(FULL), argv)
    res = run(FULL if a.full else KVStudy(), data_dir=a.data_dir,
              workdir=a.workdir or (common.WORKDIRS / ("kv_compression_full" if a.full else "kv_compression")),
              out_dir=a.out, suffix="_full" if a.full else "", fresh=a.fresh, progress=not a.quiet)
    print(summary(res))


if __name__ == "__main__":
    main()
