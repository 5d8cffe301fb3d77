"""Training benchmarks against PyTorch peers measured in the same run, on the same threads.

quality: nanoGPT's CPU recipe on Tiny Shakespeare characters (4 layers, 4 heads, 128 wide, block 64, batch 12,
         2000 iters, lr 1e-3 -> 1e-4, dropout 0, eval every 250 iters over 20 batches). jaxgpt runs it through
         `jaxgpt.train.trainer.train` (checkpoints, metrics and all); the peer is `NanoGPT` below, a faithful minimal
         re-implementation of nanoGPT's model.py and train.py loop (nanoGPT itself cannot be fetched here).
         Both report nanoGPT's val loss at iter 2000 (20 random batches) and, for a less noisy comparison,
         the mean val loss over the same 200 fixed batches.
speed:   train-step tokens/s at the shakespeare_char shape (6 layers, 6 heads, 384 wide, block 256,
         vocab 65, dropout 0.2): jaxgpt's jitted step vs transformers' GPT2LMHeadModel + torch AdamW (and
         the nanoGPT re-implementation), same batch, optimizer and clipping. Timed in interleaved rounds so
         that load from other processes hits both; the median round is reported, and the median of the
         per-round ratios against HF.

    python benchmarks/train.py quality --data ../shared/data/tinyshakespeare.txt
    python benchmarks/train.py speed --batch 8 --rounds 5
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


# ---------------------------------------------------------------------------------------------------------
# nanoGPT (model.py + the train.py loop), minimal and faithful: LayerNorm with optional bias, exact-erf GELU,
# tied embeddings, flash attention via scaled_dot_product_attention, its init, its optimizer groups and lr.


def nanogpt_model(n_layer: int, n_head: int, n_embd: int, block_size: int, vocab_size: int, dropout: float,
                  bias: bool):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class LayerNorm(nn.Module):
        def __init__(self, ndim, bias):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(ndim))
            self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

        def forward(self, x):
            return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)

    class CausalSelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
            self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
            self.resid_dropout = nn.Dropout(dropout)

        def forward(self, x):
            B, T, C = x.size()
            q, k, v = self.c_attn(x).split(n_embd, dim=2)
            k = k.view(B, T, n_head, C // n_head).transpose(1, 2)
            q = q.view(B, T, n_head, C // n_head).transpose(1, 2)
            v = v.view(B, T, n_head, C // n_head).transpose(1, 2)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=dropout if self.training else 0,
                                               is_causal=True)
            y = y.transpose(1, 2).contiguous().view(B, T, C)
            return self.resid_dropout(self.c_proj(y))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
            self.gelu = nn.GELU()
            self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
            self.dropout = nn.Dropout(dropout)

        def forward(self, x):
            return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.attn = LayerNorm(n_embd, bias), CausalSelfAttention()
            self.ln_2, self.mlp = LayerNorm(n_embd, bias), MLP()

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = nn.ModuleDict(dict(
                wte=nn.Embedding(vocab_size, n_embd), wpe=nn.Embedding(block_size, n_embd),
                drop=nn.Dropout(dropout), h=nn.ModuleList([Block() for _ in range(n_layer)]),
                ln_f=LayerNorm(n_embd, bias)))
            self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
            self.transformer.wte.weight = self.lm_head.weight  # weight tying
            self.apply(self._init_weights)
            for pn, p in self.named_parameters():
                if pn.endswith("c_proj.weight"):
                    torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

        def _init_weights(self, module):
            if isinstance(module, nn.Linear):
                torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if module.bias is not None:
                    torch.nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

        def forward(self, idx, targets):
            pos = torch.arange(0, idx.size(1), dtype=torch.long)
            x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
            for block in self.transformer.h:
                x = block(x)
            logits = self.lm_head(self.transformer.ln_f(x))
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)

    return GPT()


def torch_adamw(model, lr: float, weight_decay: float, betas: tuple[float, float]):
    """nanoGPT's configure_optimizers: decay on 2-D params, none on biases and norms (fused only on CUDA)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def nanogpt_lr(it: int, lr: float, min_lr: float, warmup: int, decay: int) -> float:
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > decay:
        return min_lr
    ratio = (it - warmup) / (decay - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def train_nanogpt(data_dir: Path, out_dir: Path, r: dict) -> tuple[object, dict]:
    """nanoGPT's train.py loop on CPU (compile=False, float32): returns (model, {val_loss, wall_s, ...})."""
    import torch

    torch.manual_seed(r["seed"])
    block_size, batch_size = r["block_size"], r["batch_size"]

    def get_batch(split):  # nanoGPT: a fresh memmap per batch, torch.randint offsets
        data = np.memmap(data_dir / f"{split}.bin", dtype=np.uint16, mode="r")
        ix = torch.randint(len(data) - block_size, (batch_size,))
        x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix])
        return x, y

    @torch.no_grad()
    def estimate_loss():
        out = {}
        model.eval()
        for split in ("train", "val"):
            losses = torch.zeros(r["eval_iters"])
            for k in range(r["eval_iters"]):
                x, y = get_batch(split)
                losses[k] = model(x, y).item()
            out[split] = losses.mean().item()
        model.train()
        return out

    t0, c0 = time.perf_counter(), time.process_time()
    model = nanogpt_model(r["n_layer"], r["n_head"], r["n_embd"], block_size, r["vocab_size"], r["dropout"],
                          r["bias"])
    optimizer = torch_adamw(model, r["lr"], r["weight_decay"], (0.9, r["beta2"]))
    x, y = get_batch("train")
    iter_num, best_val, history = 0, 1e9, []
    while True:
        lr = nanogpt_lr(iter_num, r["lr"], r["min_lr"], r["warmup"], r["max_iters"])
        for g in optimizer.param_groups:
            g["lr"] = lr
        if iter_num % r["eval_interval"] == 0 or iter_num == r["max_iters"]:  # (the latter: short test runs)
            losses = estimate_loss()
            history.append({"step": iter_num, **losses})
            if losses["val"] < best_val:
                best_val = losses["val"]
                if iter_num > 0:
                    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                "iter_num": iter_num, "best_val_loss": best_val}, out_dir / "ckpt.pt")
        loss = model(x, y)
        x, y = get_batch("train")  # prefetch the next batch, as nanoGPT does
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _ = loss.item()  # log_interval=1
        iter_num += 1
        if iter_num > r["max_iters"]:
            break
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    final = [h for h in history if h["step"] == r["max_iters"]][0]
    return model, {"val_loss": final["val"], "train_loss": final["train"], "wall_s": wall, "cpu_s": cpu,
                   "history": history}


# ---------------------------------------------------------------------------------------------------------
# quality


def fixed_val_loss_jax(cfg, params, batches) -> float:
    from jaxgpt.train.steps import make_eval_step

    ev = make_eval_step(cfg)
    return float(np.mean([float(ev(params, x, y)) for x, y in batches]))


def fixed_val_loss_torch(model, batches) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        return float(np.mean([model(torch.from_numpy(x).long(), torch.from_numpy(y).long()).item()
                              for x, y in batches]))


def quality(args) -> dict:
    import jax

    from jaxgpt import data as data_lib
    from jaxgpt.io.workdir import Workdir
    from jaxgpt.train import compilation_cache
    from jaxgpt.train.trainer import train

    sys.path.insert(0, str(REPO))
    cfg_mod = _load_config(REPO / "configs" / "shakespeare_char_cpu.py")
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    cache = {"off": "", "fresh": str(tmp / "xla_cache")}.get(args.compilation_cache, args.compilation_cache)
    cache_dir = compilation_cache.enable(cache)  # train.py on CPU: --config.compilation_cache_on_cpu=True
    cache_state = "off" if not cache_dir else "warm" if any(Path(cache_dir).glob("*")) else "cold"
    data_dir = tmp / "data"
    meta = data_lib.prepare(data_dir, dataset="shakespeare", tokenizer="char", input_path=args.data)
    seeds = args.seeds or [args.seed]

    def jax_config(seed: int):
        config = cfg_mod.get_config()
        config.data.dir = str(data_dir)
        config.max_iters = config.lr_decay_iters = args.iters
        config.seed = seed
        config.progress = not args.quiet
        config.sample_tokens = 0
        config.retain_host_memory = args.retained
        return config

    config = jax_config(seeds[0])
    m = config.model
    recipe = dict(n_layer=m.n_layer, n_head=m.n_head, n_embd=m.n_embd, block_size=m.block_size,
                  vocab_size=meta["vocab_size"], dropout=m.dropout, bias=m.bias, batch_size=config.batch_size,
                  lr=config.learning_rate, min_lr=config.min_lr, warmup=config.warmup_iters,
                  max_iters=args.iters, beta2=config.beta2, weight_decay=config.weight_decay,
                  eval_interval=config.eval_interval, eval_iters=config.eval_iters)

    val = data_lib.load_split(data_dir, "val", m.block_size)
    fixed = [data_lib.get_batch(val, config.batch_size, m.block_size, data_lib.batch_rng(7, k, "val", stream=2))
             for k in range(200)]
    runs = []  # one record per (impl, seed)
    order = ["jaxgpt", "nanogpt-torch"] if not args.torch_first else ["nanogpt-torch", "jaxgpt"]
    for seed in seeds:
        for name in order:  # alternated, so slow phases of a shared machine hit both sides
            print(f"== {name}, seed {seed}: {args.iters} iters", flush=True)
            if name == "jaxgpt":
                wd = tmp / f"jaxgpt_run_{seed}"
                t0, c0 = time.perf_counter(), time.process_time()
                s = train(jax_config(seed), wd)
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                cfg, params, _ = Workdir(wd).load()
                r = {"val_loss": s["val_loss"], "train_loss": s["train_loss"], "wall_s": wall, "cpu_s": cpu,
                     "val_loss_200": fixed_val_loss_jax(cfg, params, fixed), "compile_cache": cache_state}
                cache_state = "warm" if cache_dir else "off"
            else:
                model, r = train_nanogpt(data_dir, tmp, {**recipe, "seed": seed})
                r.pop("history")
                r["val_loss_200"] = fixed_val_loss_torch(model, fixed)
            runs.append({"impl": name, "seed": seed, "compile_cache": "-", **r})
            print(json.dumps(runs[-1]), flush=True)

    def stats(name: str) -> dict:
        rs = [r for r in runs if r["impl"] == name]
        out = {}
        for k in ("val_loss", "val_loss_200", "wall_s", "cpu_s"):
            v = np.array([r[k] for r in rs], np.float64)
            out[k] = float(v.mean())
            out[k + "_std"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
        return out

    results = {name: stats(name) for name in order}
    j, t = results["jaxgpt"], results["nanogpt-torch"]
    for state in ("cold", "warm"):  # jaxgpt's wall time by compilation-cache state
        w = [r["wall_s"] for r in runs if r["impl"] == "jaxgpt" and r["compile_cache"] == state]
        if w:
            j[f"wall_s_{state}"], j[f"runs_{state}"] = float(np.mean(w)), len(w)
    out = {"recipe": recipe, "seeds": seeds, "runs": runs, "results": results,
           "wall_ratio_torch_over_jax": t["wall_s"] / j["wall_s"], "cpu_ratio_torch_over_jax": t["cpu_s"] / j["cpu_s"],
           "load_avg": os.getloadavg(), "threads": _threads(), "jax": jax.__version__,
           "retain_host_memory": args.retained, "compilation_cache": cache_dir}
    _print_table("quality, per run", [(r["impl"], r["seed"], f"{r['val_loss']:.4f}", f"{r['val_loss_200']:.4f}",
                                       f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}", r["compile_cache"]) for r in runs],
                 ("impl", "seed", "val@iter (20 batches)", "val (200 fixed)", "wall s", "cpu s", "compile cache"))
    _print_table(f"quality, mean +- std over {len(seeds)} seed(s)",
                 [(k, f"{v['val_loss']:.4f} +- {v['val_loss_std']:.4f}",
                   f"{v['val_loss_200']:.4f} +- {v['val_loss_200_std']:.4f}", f"{v['wall_s']:.1f}",
                   f"{v['cpu_s']:.1f}") for k, v in results.items()],
                 ("impl", "val@iter (20 batches)", "val (200 fixed)", "wall s", "cpu s"))
    print(f"nanogpt-torch / jaxgpt: wall time {out['wall_ratio_torch_over_jax']:.2f}x, "
          f"CPU time {out['cpu_ratio_torch_over_jax']:.2f}x")
    for state in ("cold", "warm"):
        if f"wall_s_{state}" in j:
            ratio = out[f"wall_ratio_torch_over_jax_{state}"] = t["wall_s"] / j[f"wall_s_{state}"]
            print(f"  jaxgpt runs with a {state} compilation cache ({j[f'runs_{state}']}): wall "
                  f"{j[f'wall_s_{state}']:.1f} s, nanogpt-torch / jaxgpt {ratio:.2f}x")
    return out


# ---------------------------------------------------------------------------------------------------------
# speed


def speed(args) -> dict:
    import jax
    import jax.numpy as jnp
    import torch
    import torch.nn.functional as F
    from transformers import GPT2Config, GPT2LMHeadModel

    from jaxgpt.nn.config import GPTConfig
    from jaxgpt.nn.model import init_params
    from jaxgpt.train.config import OptimConfig, base_config
    from jaxgpt.train.steps import init_state, make_optimizer, make_train_step

    L, H, C, T, V, p = args.n_layer, args.n_head, args.n_embd, args.block_size, args.vocab, args.dropout
    B = args.batch
    cfg = GPTConfig(vocab_size=V, block_size=T, n_layer=L, n_head=H, n_embd=C, dropout=p, bias=True)
    config = base_config()
    config.learning_rate, config.beta2, config.warmup_iters, config.lr_decay_iters = 1e-3, 0.99, 100, 5000
    tx = make_optimizer(OptimConfig.of(config))
    state = init_state(init_params(cfg, 0), tx)
    step_fn = make_train_step(cfg, tx)
    rng = jax.random.PRNGKey(1)
    gen = np.random.default_rng(0)
    x = gen.integers(0, V, (1, B, T)).astype(np.int32)
    y = gen.integers(0, V, (1, B, T)).astype(np.int32)
    batch = (jnp.asarray(x), jnp.asarray(y))

    def jax_steps(n: int) -> float:
        nonlocal state
        t0 = time.perf_counter()
        for _ in range(n):
            state, m = step_fn(state, batch, rng)
        jax.block_until_ready(m["loss"])
        return time.perf_counter() - t0

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=T, n_embd=C, n_layer=L, n_head=H, resid_pdrop=p,
                                    embd_pdrop=p, attn_pdrop=p, activation_function="gelu_new"))
    hf.train()
    hf_opt = torch_adamw(hf, 1e-3, 0.1, (0.9, 0.99))
    ng = nanogpt_model(L, H, C, T, V, p, True)
    ng.train()
    ng_opt = torch_adamw(ng, 1e-3, 0.1, (0.9, 0.99))
    tx_, ty_ = torch.from_numpy(x[0]).long(), torch.from_numpy(y[0]).long()

    def torch_steps(model, opt, loss_of, n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            loss = loss_of(model)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss.item()
        return time.perf_counter() - t0

    hf_loss = lambda m: F.cross_entropy(m(tx_).logits.view(-1, V), ty_.view(-1))  # noqa: E731
    ng_loss = lambda m: m(tx_, ty_)  # noqa: E731
    peers = {"jaxgpt": jax_steps,
             "hf-gpt2+torch-adamw": lambda n: torch_steps(hf, hf_opt, hf_loss, n),
             "nanogpt-torch": lambda n: torch_steps(ng, ng_opt, ng_loss, n)}
    for f in peers.values():  # warm up (compile, allocator)
        f(args.warmup)
    times = {k: [] for k in peers}
    cpu = {k: [] for k in peers}  # process CPU seconds: robust to other load on the machine when single-threaded
    for _ in range(args.rounds):
        for k, f in peers.items():
            c0 = time.process_time()
            times[k].append(f(args.steps))
            cpu[k].append(time.process_time() - c0)
    tokens = B * T * args.steps
    tps = {k: tokens / float(np.median(v)) for k, v in times.items()}
    tps_cpu = {k: tokens / float(np.median(v)) for k, v in cpu.items()}
    hf_name = "hf-gpt2+torch-adamw"
    # the same ratio round by round (HF's time over this one's in the same round), then the median: load that
    # hits one whole round cancels, so it swings less between runs than the ratio of the medians
    paired = {k: float(np.median(np.asarray(times[hf_name]) / np.asarray(v))) for k, v in times.items()}
    rows = [(k, f"{tps[k]:,.0f}", f"{tps[k] / tps[hf_name]:.2f}x", f"{paired[k]:.2f}x", f"{tps_cpu[k]:,.0f}",
             f"{tps_cpu[k] / tps_cpu[hf_name]:.2f}x") for k in peers]
    _print_table("speed", rows, ("impl", "tokens/s wall", "vs HF", "vs HF per round", "tokens per CPU-s", "vs HF"))
    return {"shape": dict(n_layer=L, n_head=H, n_embd=C, block_size=T, vocab_size=V, dropout=p, batch=B),
            "tokens_per_s": tps, "tokens_per_cpu_s": tps_cpu, "rounds_s": times, "rounds_cpu_s": cpu,
            "ratio_jax_over_hf": tps["jaxgpt"] / tps[hf_name], "ratio_jax_over_hf_cpu": tps_cpu["jaxgpt"] / tps_cpu[hf_name],
            "ratio_jax_over_hf_per_round": paired["jaxgpt"],
            "ratio_jax_over_nanogpt": tps["jaxgpt"] / tps["nanogpt-torch"], "threads": _threads(),
            "load_avg": os.getloadavg(), "jax": jax.__version__, "torch": torch.__version__,
            "retain_host_memory": args.retained}


# ---------------------------------------------------------------------------------------------------------


def _threads() -> dict:
    import torch

    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


def _load_config(path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _print_table(title: str, rows: list[tuple], header: tuple) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


def main() -> None:
    p = argparse.ArgumentParser(description=inspect.cleandoc(__doc__).splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--data", default=str(DEFAULT_DATA), help="tinyshakespeare.txt")
    q.add_argument("--iters", type=int, default=2000)
    q.add_argument("--torch-first", action="store_true", help="run the PyTorch peer first")
    q.add_argument("--seed", type=int, default=1337, help="nanoGPT's seed (jaxgpt: config.seed)")
    q.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="several seeds (overrides --seed): per-run rows and mean +- std per implementation")
    q.add_argument("--quiet", action="store_true")
    q.add_argument("--compilation-cache", default="fresh",
                   help="jaxgpt's compilation cache: 'fresh' (a new empty directory: the first jaxgpt run compiles, "
                        "later ones load; rows say cold/warm), 'off', or a directory")
    s = sub.add_parser("speed")
    s.add_argument("--batch", type=int, default=8, help="sequences per step (the recipe uses 64)")
    s.add_argument("--n-layer", type=int, default=6)
    s.add_argument("--n-head", type=int, default=6)
    s.add_argument("--n-embd", type=int, default=384)
    s.add_argument("--block-size", type=int, default=256)
    s.add_argument("--vocab", type=int, default=65)
    s.add_argument("--dropout", type=float, default=0.2)
    s.add_argument("--steps", type=int, default=3, help="steps per timed round")
    s.add_argument("--rounds", type=int, default=5)
    s.add_argument("--warmup", type=int, default=2)
    for sp in (q, s):
        sp.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores, as XLA uses)")
        sp.add_argument("--json", default="", help="write the results here")
        sp.add_argument("--no-retain", action="store_true",
                        help="leave glibc malloc as it is (default: jaxgpt.train.host_memory.retain_freed_memory(), "
                             "as train.py does, set before any thread starts so that every peer has it)")
    args = p.parse_args()
    from jaxgpt.train import host_memory

    args.retained = False if args.no_retain else host_memory.retain_freed_memory()
    import torch

    torch.set_num_threads(args.threads or os.cpu_count())
    out = quality(args) if args.cmd == "quality" else speed(args)
    print(json.dumps(out, indent=1, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
