"""KV cache: FLOPs per generated token with and without the cache, next to measured time per token.

    python -m experiments.kv_cache_flops           # CPU size, writes docs/figures/kvflops_*
    python -m experiments.kv_cache_flops --full    # GPT-2 124M shape, contexts up to 1024

Counting (matmul FLOPs, 2 per multiply-add; C = n_embd, L = n_layer, V = vocab_size). The token generated
at context length n (its query sees n keys, itself included) costs, per layer, 24 C^2 in the linear layers
(c_attn 6 C^2, attn.c_proj 2 C^2, mlp.c_fc 8 C^2, mlp.c_proj 8 C^2) plus attention over the keys:

  with the cache      F_c(n) = L (24 C^2 + 4 n C) + 2 C V            one new position: q.K^T 2nC, p.V 2nC
  without, dense      F_u(n) = L (24 n C^2 + 4 n^2 C) + 2 n C V = n F_c(n)
  without, causal     F_u'(n) = L (24 n C^2 + 2 n (n + 1) C) + 2 n C V

"Without" re-runs the whole n-token prefix (`jaxgpt.decode.generation.generate_uncached`). `dense` is what XLA
computes (all n^2 scores, then the causal mask), so the ratio is exactly n: 15x at 15 tokens, 1024x at 1024.
Counting only the unmasked scores (`causal`) gives slightly less. Summed over a whole generation of N
tokens from an empty context, the cached total is ~N F_c and the uncached ~N^2/2 F_c. The cache in
jaxgpt is a fixed buffer of max_len S slots (read in full, masked), so as implemented the cached step's
attention term is 4 S C, not 4 n C; the measurement below sizes the buffer to n, as `generate` does for a
sequence of total length n. The formula is checked against XLA's own count (`compiled.cost_analysis()`).

Measured (CPU, batch 1): the jitted cached step (one token, buffer of n) and the jitted uncached forward
over n tokens (what generate_uncached runs per token), median of interleaved rounds; plus an end-to-end
check of `generate` against `generate_uncached` for one prompt.

Outputs (docs/figures/, --full adds _full): kvflops_results.json, kvflops_ratio.png.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from jaxgpt.decode import generation as gen
from jaxgpt.decode.cache_kinds import new_cache
from jaxgpt.decode.options import DecodeOptions
from jaxgpt.nn.config import GPTConfig
from jaxgpt.nn.model import GPT, init_params


def flops_cached(cfg: GPTConfig, n: int, buffer: int | None = None) -> int:
    """Matmul FLOPs of one cached decode step at context n (attention over `buffer` slots when given)."""
    C, L, V = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    keys = n if buffer is None else buffer
    return L * (24 * C * C + 4 * keys * C) + 2 * C * V


def flops_uncached(cfg: GPTConfig, n: int, causal_only: bool = False) -> int:
    """Matmul FLOPs of re-running the n-token prefix to get the next token (logits at every position).

    causal_only=False counts the n^2 scores XLA computes before masking (= n * flops_cached(n));
    causal_only=True counts only the n (n + 1) / 2 scores a query can see.
    """
    C, L, V = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    scores = 2 * n * (n + 1) * C if causal_only else 4 * n * n * C
    return L * (24 * n * C * C + scores) + 2 * n * C * V


def flops_generation(cfg: GPTConfig, prompt: int, new: int, bucket: int = 64) -> dict[str, int]:
    """FLOPs to emit `new` tokens after a `prompt`-token prompt, as the two library paths compute them.

    generate: a prefill of the prompt, then new - 1 one-token steps, all attending over the whole buffer of
    S = prompt + new - 1 slots. generate_uncached: per token, a forward over the sequence so far padded up to
    a multiple of `bucket` (its default), capped at S.
    """
    C, L, V = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    S = prompt + new - 1  # the last emitted token is never fed back
    prefill = L * (24 * prompt * C * C + 4 * prompt * S * C) + 2 * prompt * C * V
    cached = prefill + (new - 1) * flops_cached(cfg, S, buffer=S)
    uncached = sum(flops_uncached(cfg, min(-(-(prompt + i) // bucket) * bucket, S)) for i in range(new))
    return {"cached": cached, "uncached": uncached}


def compiled_flops(compiled: Any) -> float:
    """XLA's own FLOP count of a compiled executable (`jax.jit(f).lower(...).compile()`)."""
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float(ca["flops"])


def xla_flops(fn: Any, *args: Any) -> float:
    """XLA's own FLOP count of a jitted function for these arguments (compiled, not run)."""
    return compiled_flops(fn.lower(*args).compile())


@dataclasses.dataclass(frozen=True)
class KVStudy:
    # the measured model (random weights: time does not depend on them)
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    vocab_size: int = 65
    lengths: tuple[int, ...] = (16, 32, 64, 128, 256, 512)
    rounds: int = 5
    e2e_prompt: int = 16
    e2e_new: int = 112
    # the analytic table's model: GPT-2 124M
    table_preset: str = "gpt2"
    table_lengths: tuple[int, ...] = (1, 2, 4, 8, 15, 16, 32, 64, 128, 256, 512, 1024)
    seed: int = 0


FULL = KVStudy(n_layer=12, n_head=12, n_embd=768, vocab_size=50257,
               lengths=(16, 32, 64, 128, 256, 512, 1024), rounds=7, e2e_prompt=16, e2e_new=240)


def _time_once(fn: Any, *args: Any) -> float:
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t


def measure(s: KVStudy, progress: bool = True) -> dict[str, Any]:
    """Per-token seconds of the cached step and the uncached forward at each length, plus XLA's FLOP counts."""
    from tqdm.auto import tqdm

    cfg = GPTConfig(vocab_size=s.vocab_size, block_size=max(max(s.lengths), s.e2e_prompt + s.e2e_new),
                    n_layer=s.n_layer, n_head=s.n_head, n_embd=s.n_embd)
    params = init_params(cfg, s.seed)
    model = GPT(cfg)
    rng = np.random.default_rng(s.seed)

    @jax.jit
    def uncached(params: Any, tokens: jax.Array) -> jax.Array:  # tokens [1, n] -> logits [1, V] at the end
        return model.apply({"params": params}, tokens)[:, -1]

    @jax.jit
    def cached(params: Any, token: jax.Array, cache: Any) -> tuple[jax.Array, Any]:  # token [1, 1]
        logits, cache = model.apply({"params": params}, token, cache=cache)
        return logits[:, -1], cache

    rows = {}
    inputs = {}
    for n in s.lengths:
        tokens = jnp.asarray(rng.integers(0, s.vocab_size, (1, n)), jnp.int32)  # [1, n]
        cache = new_cache("float32", cfg, 1, n).replace(lengths=jnp.full((1,), n - 1, jnp.int32))  # n-1 tokens held
        # compiled once, outside the timing; XLA's FLOP count comes from the same executables
        c_step = cached.lower(params, tokens[:, -1:], cache).compile()
        c_full = uncached.lower(params, tokens).compile()
        inputs[n] = (tokens, cache, c_step, c_full)
        rows[n] = {"n": n, "xla_flops_cached": compiled_flops(c_step), "xla_flops_uncached": compiled_flops(c_full),
                   "flops_cached": flops_cached(cfg, n), "flops_uncached": flops_uncached(cfg, n),
                   "t_cached": [], "t_uncached": []}
    for _ in tqdm(range(s.rounds), desc="timing rounds", disable=not progress):
        for n in s.lengths:  # interleaved, so load from other processes hits both paths alike
            tokens, cache, c_step, c_full = inputs[n]
            rows[n]["t_cached"].append(_time_once(c_step, params, tokens[:, -1:], cache))
            rows[n]["t_uncached"].append(_time_once(c_full, params, tokens))
    out = []
    for n in s.lengths:
        r = rows[n]
        r["ms_cached"] = 1e3 * statistics.median(r.pop("t_cached"))
        r["ms_uncached"] = 1e3 * statistics.median(r.pop("t_uncached"))
        r["time_ratio"] = r["ms_uncached"] / r["ms_cached"]
        r["flops_ratio"] = r["flops_uncached"] / r["flops_cached"]
        out.append(r)

    # end to end: the library's two decoding paths, greedy, one prompt (second call: compiled)
    prompt = [int(t) for t in rng.integers(0, s.vocab_size, s.e2e_prompt)]
    e2e = {"prompt": s.e2e_prompt, "new_tokens": s.e2e_new}
    greedy = DecodeOptions(temperature=0.0)
    for name, fn in (("generate", gen.generate), ("generate_uncached", gen.generate_uncached)):
        jax.block_until_ready(fn(params, cfg, [prompt], s.e2e_new, greedy).tokens)
        t = time.perf_counter()
        toks = jax.block_until_ready(fn(params, cfg, [prompt], s.e2e_new, greedy).tokens)
        e2e[name] = {"s": time.perf_counter() - t, "tokens": np.asarray(toks)[0].tolist()}
        e2e[name]["ms_per_token"] = 1e3 * e2e[name]["s"] / s.e2e_new
    e2e["same_tokens"] = e2e["generate"]["tokens"] == e2e["generate_uncached"]["tokens"]
    e2e["speedup"] = e2e["generate_uncached"]["s"] / e2e["generate"]["s"]
    e2e["flops"] = flops_generation(cfg, s.e2e_prompt, s.e2e_new)
    e2e["flops_ratio"] = e2e["flops"]["uncached"] / e2e["flops"]["cached"]
    for name in ("generate", "generate_uncached"):
        del e2e[name]["tokens"]
    return {"model": cfg.to_dict(), "device": jax.devices()[0].device_kind, "rows": out, "end_to_end": e2e}


def analytic_table(preset: str, lengths: Sequence[int]) -> dict[str, Any]:
    cfg = GPTConfig.preset(preset)
    rows = [{"n": n, "cached": flops_cached(cfg, n), "uncached": flops_uncached(cfg, n),
             "uncached_causal": flops_uncached(cfg, n, causal_only=True),
             "ratio": flops_uncached(cfg, n) / flops_cached(cfg, n),
             "ratio_causal": flops_uncached(cfg, n, causal_only=True) / flops_cached(cfg, n),
             "attention_only_ratio_causal": (n + 1) / 2} for n in lengths]
    return {"preset": preset, "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "vocab_size": cfg.vocab_size,
            "rows": rows}


FORMULAS = {
    "cached": "F_c(n) = L (24 C^2 + 4 n C) + 2 C V",
    "uncached_dense": "F_u(n) = L (24 n C^2 + 4 n^2 C) + 2 n C V = n F_c(n)",
    "uncached_causal": "F_u'(n) = L (24 n C^2 + 2 n (n+1) C) + 2 n C V",
    "ratio_dense": "F_u(n) / F_c(n) = n",
}


def run(s: KVStudy, *, out_dir: str | Path = common.FIGURES, suffix: str = "",
        progress: bool = True) -> dict[str, Any]:
    t0 = time.perf_counter()
    res = {"study": dataclasses.asdict(s), "formulas": FORMULAS,
           "analytic": analytic_table(s.table_preset, s.table_lengths), "measured": measure(s, progress)}
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    out = Path(out_dir)
    common.write_json(out / f"kvflops_results{suffix}.json", res)
    plot(res, out / f"kvflops_ratio{suffix}.png")
    return res


def plot(res: dict[str, Any], path: Path) -> Path:
    plt = common.pyplot()
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 4))
    an = res["analytic"]
    n = [r["n"] for r in an["rows"]]
    a.loglog(n, [r["cached"] / 1e9 for r in an["rows"]], "o-", ms=3, label="with cache  F_c(n)")
    a.loglog(n, [r["uncached"] / 1e9 for r in an["rows"]], "o-", ms=3, label="without, dense  n F_c(n)")
    a.loglog(n, [r["uncached_causal"] / 1e9 for r in an["rows"]], "--", label="without, causal scores only")
    r15 = next((r for r in an["rows"] if r["n"] == 15), None)
    if r15:
        a.annotate(f"n=15: {r15['ratio']:.0f}x", (15, r15["uncached"] / 1e9), textcoords="offset points",
                   xytext=(-60, 10), fontsize=8, arrowprops=dict(arrowstyle="->", lw=0.6))
    a.set_xlabel("context length n")
    a.set_ylabel("GFLOPs per generated token")
    a.set_title(f"{an['preset']} (L{an['n_layer']}, C{an['n_embd']}, V{an['vocab_size']}): analytic", fontsize=9)
    a.grid(alpha=0.3, which="both")
    a.legend(fontsize=8)

    m = res["measured"]
    mn = [r["n"] for r in m["rows"]]
    b.loglog(mn, [r["ms_cached"] for r in m["rows"]], "o-", ms=3, label="cached step")
    b.loglog(mn, [r["ms_uncached"] for r in m["rows"]], "o-", ms=3, label="uncached forward")
    b.set_xlabel("context length n")
    b.set_ylabel("ms per generated token (median)")
    mc = m["model"]
    b.set_title(f"measured, {m['device']}, L{mc['n_layer']} C{mc['n_embd']} V{mc['vocab_size']}, batch 1",
                fontsize=9)
    b.grid(alpha=0.3, which="both")
    b.legend(fontsize=8)

    c.loglog(mn, [r["flops_ratio"] for r in m["rows"]], "k-", label="FLOPs ratio (= n)")
    c.loglog(mn, [r["xla_flops_uncached"] / r["xla_flops_cached"] for r in m["rows"]], "s", ms=4, mfc="none",
             color="tab:green", label="FLOPs ratio, XLA's count")
    c.loglog(mn, [r["time_ratio"] for r in m["rows"]], "o-", ms=4, color="tab:red", label="time ratio, measured")
    c.set_xlabel("context length n")
    c.set_ylabel("uncached / cached, per token")
    c.set_title("what the cache saves: counted vs measured", fontsize=9)
    c.grid(alpha=0.3, which="both")
    c.legend(fontsize=8)
    for ax in (b, c):  # label the measured lengths themselves, not log-scale minor ticks
        ax.set_xticks(mn, [str(v) for v in mn])
        ax.xaxis.set_minor_locator(plt.NullLocator())
    fig.suptitle("KV cache: work per generated token with and without the cache", fontsize=10)
    fig.tight_layout()
    return common.save_figure(fig, path)


def summary(res: dict[str, Any]) -> str:
    an = res["analytic"]
    t1 = common.markdown_table(
        ["n", "cached GFLOPs", "uncached GFLOPs", "ratio (dense)", "ratio (causal)"],
        [[r["n"], f"{r['cached'] / 1e9:.4f}", f"{r['uncached'] / 1e9:.3f}", f"{r['ratio']:.0f}",
          f"{r['ratio_causal']:.2f}"] for r in an["rows"]])
    m = res["measured"]
    t2 = common.markdown_table(
        ["n", "cached ms", "uncached ms", "time ratio", "FLOPs ratio", "XLA FLOPs / formula (cached, uncached)"],
        [[r["n"], f"{r['ms_cached']:.3f}", f"{r['ms_uncached']:.3f}", f"{r['time_ratio']:.2f}",
          f"{r['flops_ratio']:.0f}", f"{r['xla_flops_cached'] / r['flops_cached']:.3f}, "
          f"{r['xla_flops_uncached'] / r['flops_uncached']:.3f}"] for r in m["rows"]])
    e = m["end_to_end"]
    t3 = (f"end to end, {e['prompt']}-token prompt + {e['new_tokens']} tokens: generate "
          f"{e['generate']['ms_per_token']:.2f} ms/token, generate_uncached {e['generate_uncached']['ms_per_token']:.2f}"
          f" ms/token: {e['speedup']:.1f}x (FLOPs ratio {e['flops_ratio']:.1f}x); same tokens: {e['same_tokens']}")
    return f"{an['preset']}, analytic:\n{t1}\n\nmeasured:\n{t2}\n\n{t3}"


def main(argv: Sequence[str] | None = None) -> None:
    a = common.study_args(__doc__, str(FULL), argv)
    res = run(FULL if a.full else KVStudy(), out_dir=a.out, suffix="_full" if a.full else "", progress=not a.quiet)
    print(summary(res))


if __name__ == "__main__":
    main()
