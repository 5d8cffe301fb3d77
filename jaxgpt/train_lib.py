"""Training: a pure jitted train step, evaluation, and the loop with orbax checkpoints, metrics and a sample.

The step is `train_step(state, batch, rng, frozen=None) -> (state, metrics)`: everything it reads is an
argument, the state is donated, and the batch is [A, B, T] (A gradient-accumulation micro-batches).
Parameters are split into `trainable` (in the state, seen by the optimizer) and `frozen` (an argument), and
`combine(trainable, frozen) -> params` rebuilds the model's params: identity for full training, LoRA's
`apply_lora` for adapters. Shardings plug in through `StepShardings` (in/out shardings of the jitted step).

Workdir layout:
  config.json        GPTConfig of the model (so a run restores without knowing its training config)
  tokenizer.json     tokenizer meta (`jaxgpt.tokenizer.from_meta`)
  train_config.json  the full training config
  checkpoints/<step>/{params, optimizer, meta}   orbax CheckpointManager (last k + best by val loss)
  metrics.jsonl      one JSON object per log / eval / event line
  loss.png, sample.txt
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxgpt import checkpoint, compilation_cache, host_memory
from jaxgpt import data as data_lib
from jaxgpt.config import GPTConfig
from jaxgpt.model import GPT, init_params

Params = Any
Batch = tuple[jax.Array, jax.Array]  # inputs, targets: [A, B, T] int32 each
# Peak dense bf16 FLOP/s by device kind (substring match), for the MFU estimate.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 125e12,
              "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6": 918e12}


@flax.struct.dataclass
class TrainState:
    """What the optimizer owns: the update count, the trainable params and the optimizer state."""

    step: jax.Array  # int32 scalar: updates applied so far
    params: Params  # the trainable params (all params in full training)
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class StepShardings:
    """In/out shardings for the jitted step (from a mesh); leave unset on one device."""

    state: Any  # TrainState-shaped pytree of shardings
    batch: Any  # sharding of the [A, B, T] batch arrays
    rng: Any  # sharding of the PRNG key (replicated)
    frozen: Any = None  # shardings of the frozen params (None when there are none)


def identity_combine(trainable: Params, frozen: Params) -> Params:
    """Full training: the trainable params are the params."""
    del frozen
    return trainable


def no_split(params: Params) -> tuple[Params, Params]:
    """Full training: everything is trainable, nothing frozen."""
    return params, None


# ---------------------------------------------------------------------------------------------------------
# Config


def base_config() -> ml_collections.ConfigDict:
    """Every training setting with its default (nanoGPT's names); configs/*.py start here and change a few."""
    c = ml_collections.ConfigDict()

    # model: GPTConfig fields; vocab_size 0 takes the vocabulary size of the data
    c.model = ml_collections.ConfigDict(GPTConfig().to_dict())
    c.model.vocab_size = 0
    c.mixed_precision = False  # True: bfloat16 compute, float32 master weights

    # starting point: "scratch", "hf" (a Hugging Face GPT-2 directory or Hub name) or "run" (a jaxgpt workdir)
    c.init_from = "scratch"
    c.init_path = ""
    c.init_which = "latest"  # for init_from="run": "latest", "best" or a step number

    # LoRA fine-tuning of a loaded model (rank 0 = off): only the adapters are trained and checkpointed; at the
    # end the adapters are saved to <workdir>/lora and merged into a Hugging Face export (<workdir>/hf)
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0
    c.lora.alpha = 16.0
    c.lora.targets = ("attn/c_attn",)  # path patterns (jaxgpt.lora), e.g. ("attn/c_attn/q", "attn/c_attn/v")
    c.lora.rank_stabilized = False  # True: RsLoRA scale alpha / sqrt(r) instead of alpha / r
    c.lora.export = True  # merged Hugging Face GPT-2 export at the end (GPT-2 architectures only)
    c.lora.export_dir = ""  # empty: <workdir>/hf

    # device mesh (jaxgpt.sharding): data * fsdp = the device count (-1: all the rest); the batch rows are
    # split over every device, parameters with >= min_shard_size elements over "fsdp"
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.min_shard_size = 2**14

    # data: a prepared directory (train.bin, val.bin, meta.json); empty dir means <workdir>/data, prepared
    # from `dataset` on first use
    c.data = ml_collections.ConfigDict()
    c.data.dataset = "pydoc"  # pydoc (built in) | shakespeare (downloaded, or data.input) | text (data.input)
    c.data.tokenizer = "char"  # char | gpt2
    c.data.input = ""  # local text file (offline copy of a named dataset)
    c.data.bpe_path = ""  # local gpt2.tiktoken for offline GPT-2 BPE ($JAXGPT_GPT2_BPE also works)
    c.data.dir = ""
    c.data.val_fraction = 0.1

    # optimisation (nanoGPT's names and defaults)
    c.seed = 1337
    c.batch_size = 12  # micro-batch
    c.grad_accum = 1  # micro-batches per step
    c.max_iters = 2000
    c.learning_rate = 1e-3
    c.decay_lr = True
    c.warmup_iters = 100
    c.lr_decay_iters = 2000
    c.min_lr = 1e-4
    c.weight_decay = 0.1
    c.beta1 = 0.9
    c.beta2 = 0.99
    c.eps = 1e-8
    c.grad_clip = 1.0  # 0 disables clipping

    # evaluation, logging, checkpoints
    c.eval_interval = 250
    c.eval_iters = 20
    c.eval_at_start = False
    c.log_interval = 10
    c.ckpt_interval = 250
    c.keep_checkpoints = 3  # the last k; the best by val loss is kept as well when keep_best
    c.keep_best = True
    c.async_checkpointing = False
    c.progress = True
    # keep freed host memory in the process (jaxgpt.host_memory): XLA:CPU's per-step buffers stop
    # page-faulting (CPU steps 1.2-1.5x faster on a 2-core VM); the process keeps its peak host memory until exit
    c.retain_host_memory = True
    # JAX's persistent compilation cache (jaxgpt.compilation_cache), set by train.py: a rerun, resume or new seed
    # of the same shapes loads its compiled steps instead of compiling them ('' = off). On by default on
    # accelerators; on CPU only with compilation_cache_on_cpu (some hosts reject XLA:CPU's cached executables)
    c.compilation_cache_dir = compilation_cache.DEFAULT_DIR
    c.compilation_cache_min_secs = compilation_cache.DEFAULT_MIN_SECS
    c.compilation_cache_on_cpu = False

    # the sample printed at the end
    c.sample_tokens = 500
    c.sample_prompt = ""
    c.temperature = 0.8
    c.top_k = 200
    return c


# ---------------------------------------------------------------------------------------------------------
# Config -> model config, optimizer


def model_config(config: ml_collections.ConfigDict, vocab_size: int | None = None) -> GPTConfig:
    """GPTConfig from config.model (vocab_size 0 means "from the data"), with the mixed-precision switch."""
    fields = dict(config.model.to_dict())
    if not fields.get("vocab_size"):
        if vocab_size is None:
            raise ValueError("config.model.vocab_size is 0 (from the data) but no data vocabulary is known")
        fields["vocab_size"] = vocab_size
    return apply_precision(GPTConfig.from_dict(fields), config)


def apply_precision(cfg: GPTConfig, config: ml_collections.ConfigDict) -> GPTConfig:
    """config.mixed_precision: bfloat16 compute with float32 master weights."""
    if config.get("mixed_precision", False):
        return cfg.replace(dtype="bfloat16", param_dtype="float32")
    return cfg


def lr_schedule(config: ml_collections.ConfigDict) -> Callable[[jax.Array], jax.Array]:
    """nanoGPT's schedule: linear warmup lr*(it+1)/(warmup+1), cosine to min_lr at lr_decay_iters, then min_lr."""
    lr, min_lr = float(config.learning_rate), float(config.min_lr)
    warmup, decay = int(config.warmup_iters), int(config.lr_decay_iters)
    if not config.decay_lr:
        return lambda count: jnp.full(jnp.shape(count), lr, jnp.float32)
    if decay <= warmup:
        raise ValueError(f"lr_decay_iters={decay} must be larger than warmup_iters={warmup}")

    def schedule(count: jax.Array) -> jax.Array:
        it = jnp.asarray(count, jnp.float32)
        warm = lr * (it + 1) / (warmup + 1)
        ratio = jnp.clip((it - warmup) / (decay - warmup), 0.0, 1.0)
        cosine = min_lr + 0.5 * (1.0 + jnp.cos(jnp.pi * ratio)) * (lr - min_lr)
        return jnp.where(it < warmup, warm, jnp.where(it > decay, min_lr, cosine))

    return schedule


def decay_mask(params: Params) -> Params:
    """Weight decay on 2-D (and larger) weights only: matmul kernels and embeddings, not biases or norms."""
    return jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with decoupled weight decay on 2-D weights and nanoGPT's schedule."""
    parts = []
    if config.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(float(config.grad_clip)))
    parts.append(optax.adamw(lr_schedule(config), b1=float(config.beta1), b2=float(config.beta2),
                             eps=float(config.eps), weight_decay=float(config.weight_decay), mask=decay_mask))
    return optax.chain(*parts)


# ---------------------------------------------------------------------------------------------------------
# Loss, train step, eval step (pure)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross entropy: logits [..., V] float32, targets [...] int."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets).mean()


def make_loss_fn(cfg: GPTConfig, combine: Callable[[Params, Params], Params] = identity_combine):
    """loss(trainable, frozen, x [B, T], y [B, T], rng, deterministic) -> scalar float32."""
    model = GPT(cfg)

    def loss_fn(trainable: Params, frozen: Params, x: jax.Array, y: jax.Array, rng: jax.Array,
                deterministic: bool = False) -> jax.Array:
        logits = model.apply({"params": combine(trainable, frozen)}, x, deterministic=deterministic,
                             rngs={"dropout": rng})  # [B, T, V]
        return cross_entropy(logits, y)

    return loss_fn


def make_train_step(cfg: GPTConfig, tx: optax.GradientTransformation,
                    combine: Callable[[Params, Params], Params] = identity_combine,
                    shardings: StepShardings | None = None, donate: bool = True):
    """The jitted `train_step(state, batch, rng, frozen=None) -> (state, metrics)`.

    batch = (x, y), each [A, B, T]; the gradient is the mean over the A micro-batches (accumulated in float32
    with a scan). Dropout keys are fold_in(rng, step) then fold_in(., micro-batch), so they depend on the
    step number only. metrics: loss (mean over micro-batches), grad_norm (before clipping) and `finite`
    (loss, gradient and the new params are all finite).
    """
    loss_fn = make_loss_fn(cfg, combine)
    grad_fn = jax.value_and_grad(loss_fn)
    deterministic = cfg.dropout == 0.0

    def step_fn(state: TrainState, batch: Batch, rng: jax.Array, frozen: Params = None):
        x, y = batch  # [A, B, T]
        step_rng = jax.random.fold_in(rng, state.step)
        accum = x.shape[0]
        if accum == 1:
            loss, grads = grad_fn(state.params, frozen, x[0], y[0], jax.random.fold_in(step_rng, 0), deterministic)
        else:
            def micro(carry, inp):
                g_sum, l_sum = carry
                i, xi, yi = inp
                l, g = grad_fn(state.params, frozen, xi, yi, jax.random.fold_in(step_rng, i), deterministic)
                g_sum = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_sum, g)
                return (g_sum, l_sum + l), None

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            (g_sum, l_sum), _ = jax.lax.scan(micro, (zeros, jnp.zeros((), jnp.float32)),
                                             (jnp.arange(accum), x, y))
            grads = jax.tree.map(lambda g, p: (g / accum).astype(p.dtype), g_sum, state.params)
            loss = l_sum / accum
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        finite = finite & jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite}

    kwargs: dict[str, Any] = {"donate_argnums": (0,) if donate else ()}
    if shardings is not None:
        kwargs["in_shardings"] = (shardings.state, shardings.batch, shardings.rng, shardings.frozen)
        kwargs["out_shardings"] = (shardings.state, shardings.rng)  # metrics replicated (readable by every host)
    return jax.jit(step_fn, **kwargs)


def make_eval_step(cfg: GPTConfig, combine: Callable[[Params, Params], Params] = identity_combine):
    """The jitted `eval_step(trainable, x [B, T], y [B, T], frozen=None) -> loss` (no dropout)."""
    loss_fn = make_loss_fn(cfg, combine)

    def eval_fn(trainable: Params, x: jax.Array, y: jax.Array, frozen: Params = None) -> jax.Array:
        return loss_fn(trainable, frozen, x, y, jax.random.PRNGKey(0), True)

    return jax.jit(eval_fn)


def _compile_quietly(fn: Any, *args: Any) -> None:
    """AOT-compile a jitted function for these arguments (jit's own cache keeps it); errors are left to the call."""
    try:
        fn.lower(*args).compile()
    except Exception:  # noqa: BLE001 - the real call raises the same error where it can be handled
        pass


def init_state(params: Params, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


# ---------------------------------------------------------------------------------------------------------
# Throughput and MFU


def flops_per_token(cfg: GPTConfig, n_params: int) -> float:
    """Training FLOPs per token: 6N (forward + backward matmuls) + 12 L T C (attention scores and values)."""
    return 6.0 * n_params + 12.0 * cfg.n_layer * cfg.block_size * cfg.n_embd


def device_peak_flops(device: Any | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of a known accelerator; None on CPU or an unknown device."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return None
    kind = getattr(device, "device_kind", "")
    for name, peak in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return peak
    return None


# ---------------------------------------------------------------------------------------------------------
# Sampling (a sliding window over block_size, one jitted loop)


def sample_tokens(cfg: GPTConfig, params: Params, prompt: list[int], n: int, *, temperature: float = 0.8,
                  top_k: int = 0, seed: int = 0) -> list[int]:
    """n new tokens after `prompt`, by temperature / top-k sampling; the context slides past block_size."""
    if not prompt:
        raise ValueError("sample_tokens needs a non-empty prompt")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    model = GPT(cfg)
    T = cfg.block_size
    ctx = list(prompt)[-T:]
    buf = np.zeros((1, T), np.int32)
    buf[0, : len(ctx)] = ctx
    k = min(int(top_k), cfg.vocab_size) if top_k else 0

    @jax.jit
    def run(params, buf, cur, key):
        def body(i, carry):
            buf, cur, key, out = carry
            logits = model.apply({"params": params}, buf)[0]  # [T, V]
            logit = jax.lax.dynamic_index_in_dim(logits, cur - 1, keepdims=False) / temperature  # [V]
            if k:
                kth = jax.lax.top_k(logit, k)[0][-1]
                logit = jnp.where(logit < kth, -jnp.inf, logit)
            key, sub = jax.random.split(key)
            tok = jax.random.categorical(sub, logit).astype(jnp.int32)
            out = out.at[i].set(tok)
            full = cur == T
            buf = jnp.where(full, jnp.roll(buf, -1, axis=1), buf)
            cur = jnp.where(full, cur - 1, cur)
            buf = jax.lax.dynamic_update_slice(buf, tok[None, None], (0, cur))
            return buf, cur + 1, key, out

        init = (buf, cur, key, jnp.zeros((n,), jnp.int32))
        return jax.lax.fori_loop(0, n, body, init)[3]

    out = run(params, jnp.asarray(buf), jnp.int32(len(ctx)), jax.random.PRNGKey(seed))
    return [int(t) for t in np.asarray(out)]


# ---------------------------------------------------------------------------------------------------------
# Metrics log


class MetricsLog:
    """Append-only JSON lines (flushed per line, so a killed run keeps what it logged)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        # a writer killed mid-line leaves a partial last line: end it so that new records stay readable
        if self.path.is_file() and self.path.stat().st_size:
            with open(self.path, "rb+") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl; for records of the same kind and step the last one wins (a resumed run
    rewrites the steps after its checkpoint). A truncated last line (a killed writer) is skipped."""
    out: dict[tuple[str, int], dict[str, Any]] = {}
    events = []
    p = Path(path)
    if not p.is_file():
        return []
    for line in p.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "step" in r and r.get("kind") in ("train", "eval"):
            out[(r["kind"], int(r["step"]))] = r
        else:
            events.append(r)
    return sorted(out.values(), key=lambda r: (r["step"], r["kind"])) + events



# ---------------------------------------------------------------------------------------------------------
# Starting point: data, model config, initial params


class Initial(NamedTuple):
    cfg: GPTConfig
    params: Params | None  # None: from scratch, init_params(cfg, config.seed)
    tokenizer: dict[str, Any]


def data_dir_of(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> Path:
    """config.data.dir, or <workdir>/data when it is empty."""
    return Path(config.data.dir) if config.data.dir else Path(workdir) / "data"


def ensure_data(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> Path:
    """The prepared dataset directory, tokenizing config.data.dataset into it when it is missing."""
    d = data_dir_of(config, workdir)
    if not (d / "meta.json").is_file():
        data_lib.prepare(d, dataset=config.data.dataset, tokenizer=config.data.tokenizer,
                         input_path=config.data.input or None, bpe_path=config.data.bpe_path or None,
                         val_fraction=float(config.data.val_fraction))
    return d


def initial_model(config: ml_collections.ConfigDict, data_meta: dict[str, Any]) -> Initial:
    """Model config, starting params and tokenizer meta: from scratch, a Hugging Face GPT-2 dir, or a jaxgpt run."""
    src = config.init_from
    if src == "scratch":
        cfg = model_config(config, data_meta["vocab_size"])
        tok = {k: v for k, v in data_meta.items() if k in ("kind", "chars", "vocab_size")}
        return Initial(cfg, None, tok)  # initialised by `train` unless a checkpoint supplies the values
    if src not in ("hf", "run"):
        raise ValueError(f"config.init_from={src!r} is not valid; use 'scratch', 'hf' or 'run'")
    if not config.init_path:
        raise ValueError(f"config.init_from={src!r} needs config.init_path (a directory or a model name)")
    if src == "hf":
        cfg, params = checkpoint.load_hf_gpt2(config.init_path)
        tok = {"kind": "gpt2", "vocab_size": 50257}
    else:
        cfg, params, tok = checkpoint.load_run(config.init_path, config.init_which)
    if data_meta.get("kind") != tok.get("kind") or data_meta.get("chars") != tok.get("chars"):
        raise ValueError(f"the training data uses the {data_meta.get('kind')!r} tokenizer but {config.init_path} "
                         f"was trained with {tok.get('kind')!r} (or another char vocabulary); prepare the data "
                         "with the model's tokenizer")
    cfg, params = override_model(cfg, params, config)
    return Initial(cfg, params, tok)


FINETUNE_OVERRIDES = ("dropout", "dtype", "param_dtype", "attention", "block_size")


def override_model(cfg: GPTConfig, params: Params, config: ml_collections.ConfigDict) -> tuple[GPTConfig, Params]:
    """Fine-tuning changes to a loaded model: dropout, dtypes, attention, and a smaller block_size (crops wpe)."""
    # 0 / "" mean "keep the loaded value" (dropout is always a setting: 0.0 turns it off)
    changes = {k: v for k, v in config.model.to_dict().items()
               if (k == "dropout" or v not in (0, "", None)) and v != getattr(cfg, k, None)}
    bad = sorted(set(changes) - set(FINETUNE_OVERRIDES))
    if bad:
        raise ValueError(f"config.model sets {bad}, which the loaded model fixes; when fine-tuning, config.model "
                         f"may set only {list(FINETUNE_OVERRIDES)}")
    if changes.get("block_size", 0) > cfg.block_size:
        raise ValueError(f"config.model.block_size={changes['block_size']} exceeds the loaded model's "
                         f"{cfg.block_size}; use at most {cfg.block_size}")
    cfg = apply_precision(cfg.replace(**changes), config)
    if "block_size" in changes and "wpe" in params:
        params = {**params, "wpe": {"embedding": params["wpe"]["embedding"][: cfg.block_size]}}
    params = jax.tree.map(lambda p: jnp.asarray(p, cfg.params_dtype), params)
    return cfg, params


def validate(config: ml_collections.ConfigDict) -> None:
    """One-line errors for training settings that cannot work."""
    for name in ("batch_size", "grad_accum", "max_iters", "eval_interval", "eval_iters", "log_interval",
                 "ckpt_interval", "keep_checkpoints"):
        v = config[name]
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"config.{name}={v!r} is not valid; use a positive integer")
    if not float(config.learning_rate) > 0:
        raise ValueError(f"config.learning_rate={config.learning_rate} is not valid; use a value > 0")
    if not 0.0 <= float(config.beta1) < 1.0 or not 0.0 <= float(config.beta2) < 1.0:
        raise ValueError(f"config.beta1={config.beta1} / beta2={config.beta2} are not valid; use values in [0, 1)")


def lora_config_of(config: ml_collections.ConfigDict):
    """The jaxgpt.lora.LoraConfig of config.lora, or None when config.lora.rank is 0 (LoRA off)."""
    from jaxgpt import lora

    lc = config.get("lora")
    if lc is None or lc.rank == 0:
        return None
    if config.init_from == "scratch":
        raise ValueError("config.lora.rank > 0 fine-tunes a loaded model, but config.init_from='scratch'; set "
                         "config.init_from to 'hf' or 'run' (and config.init_path), or config.lora.rank=0")
    targets = (lc.targets,) if isinstance(lc.targets, str) else tuple(lc.targets)
    try:
        return lora.LoraConfig(rank=lc.rank, alpha=float(lc.alpha), targets=targets,
                               rank_stabilized=lc.rank_stabilized)
    except ValueError as e:
        raise ValueError(f"config.lora: {e}") from None


def mesh_shardings_fn(config: ml_collections.ConfigDict, batch_rows: int):
    """A Mesh over jax.devices() from config.mesh and the `shardings_fn(state, frozen)` that places the train
    state (large leaves over "fsdp"), the [A, B, T] batch (rows over every device) and the frozen params."""
    from jaxgpt import sharding as sh

    mc = config.get("mesh") or ml_collections.ConfigDict(dict(data=-1, fsdp=1, min_shard_size=sh.DEFAULT_MIN_SIZE))
    mesh = sh.make_mesh(int(mc.data), int(mc.fsdp))
    if batch_rows % mesh.size:
        raise ValueError(f"config.batch_size={batch_rows} cannot be split over the {mesh.size} devices of the mesh "
                         f"(data={mesh.shape[sh.DATA]}, fsdp={mesh.shape[sh.FSDP]}); use a batch_size that is a "
                         f"multiple of {mesh.size}")
    m = int(mc.min_shard_size)

    def shardings_fn(state: TrainState, frozen: Params) -> StepShardings:
        return StepShardings(state=sh.tree_shardings(state, mesh, m), batch=sh.batch_sharding(mesh, batch_dim=1),
                             rng=sh.replicated(mesh),
                             frozen=None if frozen is None else sh.param_shardings(frozen, mesh, m))

    return mesh, shardings_fn


class _NoLog:
    """The metrics log of processes other than 0 in a multi-host run: they compute but do not write."""

    def write(self, record: dict[str, Any]) -> None:
        del record


def _write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temporary name, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------
# The loop

LORA_RUN_FILE = "lora_run.json"  # LoRA settings and base of a LoRA run (its checkpoints hold adapters only)


class _Stop:
    """Signal handler for SIGTERM / SIGINT: the loop checks it between steps and saves before leaving."""

    def __init__(self) -> None:
        self.signal: str | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        if self.signal is not None:  # a second signal: leave at once
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
          tx: optax.GradientTransformation | None = None,
          split: Callable[[Params], tuple[Params, Params]] = no_split,
          combine: Callable[[Params, Params], Params] = identity_combine,
          shardings_fn: Callable[[TrainState, Params], StepShardings] | None = None) -> dict[str, Any]:
    """Train, or resume from the latest checkpoint in `workdir`; returns a summary dict.

    `tx` replaces the optimizer built from the config; `split(params) -> (trainable, frozen)` and
    `combine(trainable, frozen) -> params` choose what is trained (LoRA); `shardings_fn(state, frozen)`
    places state, batches and frozen params on a mesh (default: a mesh over jax.devices() from config.mesh).
    With config.lora.rank > 0 the loaded model is frozen and LoRA adapters are trained (see `lora_config_of`).
    Raises FloatingPointError naming the step when the loss (or gradient) stops being finite.
    """
    import orbax.checkpoint as ocp
    from tqdm.auto import tqdm

    from jaxgpt import lora, plot
    from jaxgpt import sharding as sh

    wd = Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    validate(config)
    if config.get("retain_host_memory", True):
        host_memory.retain_freed_memory()
    main = jax.process_index() == 0  # only process 0 writes metrics, JSON, the plot, the sample and exports
    lora_cfg = lora_config_of(config)
    if lora_cfg is not None:
        if split is not no_split or combine is not identity_combine:
            raise ValueError("config.lora.rank > 0 chooses split/combine itself; pass either LoRA settings or "
                             "split/combine, not both")
        seed_ = int(config.seed)
        split = lambda params: (lora.init_lora(jax.random.PRNGKey(seed_), params, lora_cfg,  # noqa: E731
                                               jax.tree.leaves(params)[0].dtype), params)
        combine = lambda adapters, base: lora.apply_lora(base, adapters, lora_cfg)  # noqa: E731
    ddir = ensure_data(config, wd)
    data_meta = data_lib.load_meta(ddir)
    init = initial_model(config, data_meta)
    cfg, tok_meta = init.cfg, init.tokenizer
    if data_meta["vocab_size"] > cfg.vocab_size:
        raise ValueError(f"the data has {data_meta['vocab_size']} token ids but the model only "
                         f"{cfg.vocab_size}; set config.model.vocab_size >= {data_meta['vocab_size']} (or 0)")
    T, B, A = cfg.block_size, int(config.batch_size), int(config.grad_accum)
    if lora_cfg is not None and config.lora.export:  # refuse before training, not after
        gpt2_arch = (cfg.pos_embedding == "learned" and cfg.norm == "layernorm" and cfg.norm_position == "pre"
                     and cfg.bias)
        if not gpt2_arch:
            raise ValueError("config.lora.export=True needs a GPT-2 architecture (learned positions, pre-LN "
                             "LayerNorm, biases) for the Hugging Face export; set config.lora.export=False to "
                             "keep the adapters only")
    mesh = None
    if shardings_fn is None:
        mesh, shardings_fn = mesh_shardings_fn(config, B)
    train_data = data_lib.load_split(ddir, "train", T)
    val_data = data_lib.load_split(ddir, "val", T)
    seed = int(config.seed)

    # --- the run's identity and its checkpoints: refuse to resume over another model
    mngr = checkpoint.run_checkpoint_manager(wd, keep=config.keep_checkpoints, keep_best=config.keep_best,
                                             async_save=config.async_checkpointing)
    try:
        steps = sorted(mngr.all_steps())
        checkpoint.check_run_checkpoints(wd, steps)
        cfg_file = wd / "config.json"
        if steps and cfg_file.is_file() and json.loads(cfg_file.read_text()) != cfg.to_dict():
            saved = json.loads(cfg_file.read_text())
            diff = {k: (saved.get(k), v) for k, v in cfg.to_dict().items() if saved.get(k) != v}
            raise ValueError(f"{wd} holds a run of another model (saved, now: {diff}); resume with the same "
                             "config or use a new --workdir")
        # LoRA runs checkpoint the adapters alone: their settings and base are part of the run's identity
        lora_file = wd / LORA_RUN_FILE
        lora_now = None if lora_cfg is None else {**lora_cfg.to_dict(), "init_from": config.init_from,
                                                  "init_path": str(config.init_path)}
        lora_saved = json.loads(lora_file.read_text()) if lora_file.is_file() else None
        if steps and lora_saved != lora_now:
            raise ValueError(f"{wd} holds a run with LoRA settings {lora_saved} but config.lora gives {lora_now}; "
                             "resume with the same config.lora, init_from and init_path, or use a new --workdir")
    except Exception:
        mngr.close()
        raise
    if main:
        _write_json(cfg_file, cfg.to_dict())
        _write_json(wd / "tokenizer.json", tok_meta)
        _write_json(wd / "train_config.json", json.loads(config.to_json_best_effort()))
        if lora_now is not None:
            _write_json(lora_file, lora_now)

    params = init.params
    del init
    lr_fn = jax.jit(lr_schedule(config)) if tx is None else None  # for the log (eagerly: ~10 ms a call on CPU)
    tx = tx or make_optimizer(config)
    abstract = jax.eval_shape(lambda: split(init_params(cfg, seed))) if params is None and steps else None
    if abstract is not None and not jax.tree.leaves(abstract[1]):
        # resuming a run from scratch: the structure is enough, the checkpoint holds the values
        frozen = None
        state = jax.eval_shape(lambda t: init_state(t, tx), abstract[0])
    else:
        trainable, frozen = split(init_params(cfg, seed) if params is None else params)
        state = init_state(trainable, tx)
    del params
    log = MetricsLog(wd / "metrics.jsonl") if main else _NoLog()
    start = steps[-1] if steps else 0
    if steps:
        try:
            r = checkpoint.restore_run_step(mngr, start, params=state.params,
                                            optimizer={"step": state.step, "opt_state": state.opt_state})
        except Exception:
            mngr.close()
            raise
        opt = r["optimizer"]
        state = TrainState(step=jnp.asarray(opt["step"], jnp.int32), params=r["params"], opt_state=opt["opt_state"])
        if int(state.step) != start:
            mngr.close()
            raise ValueError(f"checkpoint {wd / checkpoint.RUN_CKPT_DIR / str(start)} holds step {int(state.step)}; "
                             "it is corrupt: move it aside to resume from an earlier step")
        log.write({"kind": "event", "event": "resume", "step": start, "time": time.time()})

    shardings = shardings_fn(state, frozen) if shardings_fn else None
    # one process: device_put (shardings may be pytree prefixes); several: each process keeps its own pieces
    place = jax.device_put if jax.process_count() == 1 else sh.shard_params
    if shardings is not None:
        state = place(state, shardings.state)
        if frozen is not None:
            frozen = place(frozen, shardings.frozen)
    else:
        state = jax.device_put(state)
    train_step = make_train_step(cfg, tx, combine, shardings)
    eval_step = make_eval_step(cfg, combine)
    dropout_rng = jax.random.fold_in(jax.random.PRNGKey(seed), 1)

    def batch_at(step: int) -> Batch:
        x, y = data_lib.get_batch(train_data, A * B, T, data_lib.batch_rng(seed, step, "train"))
        batch = (x.reshape(A, B, T), y.reshape(A, B, T))  # [A, B, T] each
        return place(batch, (shardings.batch,) * 2) if shardings is not None else jax.device_put(batch)

    # fixed evaluation batches (their own RNG stream), so successive evaluations are comparable
    eval_sets = {split_name: [data_lib.get_batch(d, B, T, data_lib.batch_rng(seed, k, split_name, stream=1))
                              for k in range(config.eval_iters)]
                 for split_name, d in (("train", train_data), ("val", val_data))}

    def evaluate(step: int) -> dict[str, float]:
        out = {}
        for name, batches in eval_sets.items():
            losses = jax.device_get([eval_step(state.params, x, y, frozen) for x, y in batches])
            out[f"{name}_loss"] = float(np.mean(np.asarray(losses, np.float64)))
        log.write({"kind": "eval", "step": step, **out, "time": time.time()})
        return out

    n_params = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves((state.params, frozen)))
    n_params -= cfg.block_size * cfg.n_embd if cfg.pos_embedding == "learned" else 0
    tokens_per_step = A * B * T
    peak = device_peak_flops()
    fpt = flops_per_token(cfg, n_params)

    stop = _Stop()
    old_handlers = {}
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGTERM, signal.SIGINT):
            old_handlers[s] = signal.signal(s, stop)

    max_iters = int(config.max_iters)
    pending: list[tuple[int, dict[str, jax.Array]]] = []  # (step, device metrics) not yet checked
    summary: dict[str, Any] = {"start_step": start, "workdir": str(wd)}
    last_eval: dict[str, float] = {}
    last_saved = start if steps else None
    timer = {"t": time.perf_counter(), "steps": 0}
    bar = tqdm(total=max_iters, initial=start, disable=not (config.progress and main), dynamic_ncols=True, desc="train")

    def flush(keep: int = 0) -> None:
        """Bring pending step metrics to the host, stop on a non-finite one, log them.

        keep=1 leaves the newest step pending: fetching only steps before it lets the host wait on step N-1
        while step N is already queued, so the device never idles on logging.
        """
        done = pending[:len(pending) - keep]
        if not done:
            return
        values = jax.device_get([m for _, m in done])
        steps_done = [step for step, _ in done]
        lrs = np.asarray(lr_fn(np.asarray(steps_done, np.int32))) if lr_fn else None
        now = time.perf_counter()
        dt = now - timer["t"]
        n = min(len(done), timer["steps"])  # finished steps dispatched since the timer started
        tps = tokens_per_step * n / dt if n and dt > 0 else None
        mfu = fpt * tps / peak if peak and tps else None
        for i, ((step, _), m) in enumerate(zip(done, values)):
            if not bool(m["finite"]):
                loss, gnorm = float(m["loss"]), float(m["grad_norm"])
                what = (f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {gnorm}"
                        if not math.isfinite(gnorm) else "the parameters became non-finite in the update")
                log.write({"kind": "event", "event": "non-finite", "step": step, "loss": str(loss),
                           "time": time.time()})
                pending.clear()
                kept = f"step {last_saved}" if last_saved is not None else "none yet"
                raise FloatingPointError(
                    f"{what} at step {step}; training stopped. The last good checkpoint ({kept}) is kept in "
                    f"{wd / checkpoint.RUN_CKPT_DIR}; lower the learning rate or set grad_clip, then rerun to "
                    "resume from it")
            if step % config.log_interval == 0 or step == done[-1][0]:
                log.write({"kind": "train", "step": step, "loss": float(m["loss"]),
                           "grad_norm": float(m["grad_norm"]), "lr": float(lrs[i]) if lrs is not None else None,
                           "tokens_per_s": tps, "mfu": mfu, "time": time.time()})
        summary.update(loss=float(values[-1]["loss"]), tokens_per_s=tps, mfu=mfu)
        bar.set_postfix(loss=f"{float(values[-1]['loss']):.4f}", tok_s=f"{tps:,.0f}" if tps else "-",
                        mfu=f"{mfu:.1%}" if mfu else "n/a")
        del pending[:len(done)]
        timer["t"], timer["steps"] = now, timer["steps"] - n

    def save(step: int, metrics: dict[str, float] | None) -> None:
        nonlocal last_saved
        if step == last_saved:
            return
        flush()  # never write a checkpoint past a non-finite step
        meta = {"step": step, "model": cfg.to_dict(), "tokenizer": tok_meta, "seed": seed, "data_dir": str(ddir),
                **(metrics or {})}
        mngr.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            optimizer=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state}),
            meta=ocp.args.JsonSave(meta)),
            metrics={"val_loss": metrics["val_loss"]} if metrics else None, force=True)
        last_saved = step

    t_start = time.perf_counter()
    step = start
    try:
        if start == 0 and config.eval_at_start and max_iters > 0:
            # compile the train step in the background while the first evaluation runs (the call below then
            # reuses it); a failure is left to that call to report
            compiling = threading.Thread(target=_compile_quietly, daemon=True,
                                         args=(train_step, state, batch_at(start), dropout_rng, frozen))
            compiling.start()
            last_eval = evaluate(0)
            compiling.join()
        while step < max_iters and not stop.signal:
            state, m = train_step(state, batch_at(step), dropout_rng, frozen)
            pending.append((step, m))
            step += 1
            bar.update(1)
            if step == start + 1:  # the first step compiles: measure throughput from its end
                flush()
                timer["t"], timer["steps"] = time.perf_counter(), 0
            else:
                timer["steps"] += 1
                if step % config.log_interval == 0 or len(pending) >= 100:
                    flush(keep=1)
            is_eval = step % config.eval_interval == 0 or step == max_iters
            if is_eval:
                flush()
                last_eval = evaluate(step)
                bar.write(f"step {step}: train loss {last_eval['train_loss']:.4f}, "
                          f"val loss {last_eval['val_loss']:.4f}")
            is_save = step % config.ckpt_interval == 0 or step == max_iters
            if is_save:
                save(step, last_eval if is_eval else None)
            if is_eval or is_save:  # evaluation and saving are not training time
                timer["t"], timer["steps"] = time.perf_counter(), 0
        flush()
        if stop.signal:
            save(step, None)
            log.write({"kind": "event", "event": f"stopped by {stop.signal}", "step": step, "time": time.time()})
            bar.write(f"{stop.signal}: saved a checkpoint at step {step} in {wd / checkpoint.RUN_CKPT_DIR}; "
                      "run the same command again to resume")
            summary["interrupted"] = stop.signal
    finally:
        bar.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
        mngr.wait_until_finished()
        mngr.close()

    summary.update(step=step, wall_s=time.perf_counter() - t_start, **last_eval)
    if stop.signal:
        return summary
    if start >= max_iters:
        print(f"{wd} already holds a finished run at step {start}; raise --config.max_iters to train further, "
              "or use a new --workdir")
    if main:
        summary["plot"] = str(plot.plot_metrics(wd))
    if lora_cfg is not None:
        summary.update(finish_lora(cfg, frozen, state.params, lora_cfg, config, wd, main))
    if config.sample_tokens > 0:
        text = sample_text(cfg, combine(state.params, frozen), tok_meta, config)
        if main:
            (wd / "sample.txt").write_text(text)
            print(f"---------- sample (step {step}) ----------\n{text}\n----------------------------------")
        summary["sample"] = text
    return summary


def finish_lora(cfg: GPTConfig, base: Params, adapters: Params, lora_cfg: Any, config: ml_collections.ConfigDict,
                workdir: Path, main: bool = True) -> dict[str, Any]:
    """End of a LoRA run: the adapters alone to <workdir>/lora (jaxgpt.lora.load_adapters reads them) and,
    when config.lora.export, merge(base, adapters) as a Hugging Face GPT-2 directory (config.lora.export_dir,
    default <workdir>/hf). Both are written atomically, replacing the previous ones."""
    from jaxgpt import lora

    out: dict[str, Any] = {"lora_trainable": lora.lora_param_count(base, lora_cfg)["trainable"]}
    adapters = jax.device_get(adapters)
    merged = lora.merge(base, adapters, lora_cfg) if config.lora.export else None
    if not main:
        return out
    out["adapters"] = str(lora.save_adapters(workdir / "lora", adapters, lora_cfg, force=True))
    if merged is not None:
        out["export"] = str(checkpoint.export_hf_gpt2(cfg, merged, config.lora.export_dir or workdir / "hf"))
    return out


def sample_text(cfg: GPTConfig, params: Params, tok_meta: dict[str, Any], config: ml_collections.ConfigDict) -> str:
    """config.sample_tokens tokens after config.sample_prompt (default: a newline, or <|endoftext|> for BPE)."""
    from jaxgpt.tokenizer import from_meta

    tok = from_meta(tok_meta, config.data.bpe_path or None)
    prompt = config.sample_prompt
    if prompt:
        ids = tok.encode(prompt)
    elif tok.eot_id is not None:
        ids = [tok.eot_id]
    else:
        ids = tok.encode("\n") if "\n" in tok_meta.get("chars", "") else [0]
    out = sample_tokens(cfg, params, ids, int(config.sample_tokens), temperature=float(config.temperature),
                        top_k=int(config.top_k), seed=int(config.seed))
    return prompt + tok.decode(out)
