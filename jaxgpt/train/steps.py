"""The pure, jitted pieces of training: train state, optimizer and schedule, loss, train and eval steps.

The step is `train_step(state, batch, rng, frozen=None) -> (state, metrics)`: everything it reads is an
argument, the state is donated, and the batch is [A, B, T] (A gradient-accumulation micro-batches).
Parameters are split into `trainable` (in the state, seen by the optimizer) and `frozen` (an argument), and
`combine(trainable, frozen) -> params` rebuilds the model's params: identity for full training, LoRA's
`wrap` for adapters. Shardings plug in through `StepShardings` (in/out shardings of the jitted step);
`mesh_shardings_fn` builds them from config.mesh. Benchmarks time these very functions.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers, scale_by_muon

from jaxgpt import sharding as sh
from jaxgpt.nn import stacking
from jaxgpt.nn.config import GPTConfig
from jaxgpt.nn.model import GPT
from jaxgpt.train.config import MeshConfig, OptimConfig

Params = Any
Batch = tuple[jax.Array, jax.Array]  # inputs, targets: [A, B, T] int32 each


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


def lr_schedule(optim: OptimConfig) -> Callable[[jax.Array], jax.Array]:
    """nanoGPT's schedule: linear warmup lr*(it+1)/(warmup+1), cosine to min_lr at lr_decay_iters, then min_lr."""
    lr, min_lr = float(optim.learning_rate), float(optim.min_lr)
    warmup, decay = int(optim.warmup_iters), int(optim.lr_decay_iters)
    if not optim.decay_lr:
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
    """Weight decay on 2-D (and larger) weights only: matmul kernels and embeddings, not biases or norms.
    A stacked block leaf's leading layer axis does not count."""
    return jax.tree_util.tree_map_with_path(lambda path, x: jnp.ndim(x) - stacking.in_stacked(path) >= 2, params)


# The blocks' 2-D matrices that Muon updates (attention and MLP projections, modded-nanogpt's split); every other
# leaf (wte, wpe, lm_head, norms, biases) stays with AdamW.
HIDDEN_MATRICES = ("c_attn", "c_q", "c_k", "c_v", "c_proj", "c_fc", "c_gate")
NS_COEFFS = (3.4445, -4.7750, 2.0315)  # Newton-Schulz quintic of modded-nanogpt and optax.contrib.muon
NS_STEPS = 5
_LAYER = re.compile(r"h_\d+$")  # an unrolled block's key


def is_hidden_matrix(path: Any, x: Any) -> bool:
    """A block's projection kernel, 2-D per layer (a stacked leaf [L, in, out] counts per layer)."""
    keys = [str(getattr(k, "key", "")) for k in path]
    in_block = any(k == stacking.STACKED or _LAYER.match(k) for k in keys)
    return (in_block and len(keys) >= 2 and keys[-1] == "kernel" and keys[-2] in HIDDEN_MATRICES
            and jnp.ndim(x) - stacking.in_stacked(path) == 2)


def muon_labels(params: Params) -> Params:
    """"muon" for each hidden matrix, "adamw" for every other leaf; refuses a tree without hidden matrices."""
    labels = jax.tree_util.tree_map_with_path(lambda p, x: "muon" if is_hidden_matrix(p, x) else "adamw", params)
    if "muon" not in jax.tree.leaves(labels):
        raise ValueError("config.optimizer='muon' found no 2-D hidden matrix (block kernels c_attn, c_q, c_k, c_v, "
                         "c_proj, c_fc, c_gate) among the trained params; use config.optimizer='adamw'")
    return labels


def _matrix_axes(updates: Params) -> Params:
    """Muon's dimension numbers for its (masked) leaves: the matrix is the last two axes, any leading axis (the
    layer of a stacked leaf) is a batch axis, so each layer's matrix is orthogonalised on its own."""
    return jax.tree.map(lambda x: MuonDimensionNumbers(reduction_axis=-2, output_axis=-1), updates)


def scale_by_shape() -> optax.GradientTransformation:
    """Each matrix update times sqrt(max(1, out / in)) over its last two axes [..., in, out] (Muon's width rule,
    as optax.contrib.muon's default)."""
    def update_fn(updates: Params, state: Any, params: Params = None) -> tuple[Params, Any]:
        del params
        return jax.tree.map(lambda u: u * max(1.0, u.shape[-1] / u.shape[-2]) ** 0.5, updates), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def muon_rule(optim: OptimConfig) -> optax.GradientTransformation:
    """Muon on matrices, as optax.contrib.muon's Muon branch: Nesterov momentum and Newton-Schulz
    orthogonalisation (optax.contrib.scale_by_muon), sqrt(max(1, out/in)) scaling, decoupled weight decay, then
    -muon_lr on nanoGPT's schedule shape (min_lr scaled by muon_lr / learning_rate)."""
    scale = float(optim.muon_lr) / float(optim.learning_rate)
    base = lr_schedule(optim)

    def schedule(count: jax.Array) -> jax.Array:  # AdamW's warmup + cosine, times muon_lr / learning_rate
        return base(count) * scale

    return optax.chain(
        scale_by_muon(ns_coeffs=NS_COEFFS, ns_steps=NS_STEPS, beta=float(optim.muon_momentum), nesterov=True,
                      weight_dimension_numbers=_matrix_axes),
        scale_by_shape(),
        optax.add_decayed_weights(float(optim.muon_weight_decay)),
        optax.scale_by_learning_rate(schedule))


def adamw_rule(optim: OptimConfig) -> optax.GradientTransformation:
    """AdamW with decoupled weight decay on 2-D weights and nanoGPT's schedule."""
    return optax.adamw(lr_schedule(optim), b1=float(optim.beta1), b2=float(optim.beta2), eps=float(optim.eps),
                       weight_decay=float(optim.weight_decay), mask=decay_mask)


def make_optimizer(optim: OptimConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW on every leaf (optimizer "adamw"), or Muon on the blocks' hidden matrices
    and the same AdamW on the rest (optimizer "muon", `muon_labels`)."""
    parts = []
    if optim.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(float(optim.grad_clip)))
    if optim.optimizer == "adamw":
        parts.append(adamw_rule(optim))
    elif optim.optimizer == "muon":
        parts.append(optax.partition({"muon": muon_rule(optim), "adamw": adamw_rule(optim)}, muon_labels))
    else:
        raise ValueError(f"optimizer={optim.optimizer!r} is not valid; use 'adamw' or 'muon'")
    return optax.chain(*parts)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross entropy: logits [..., V] float32, targets [...] int."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets).mean()


def make_loss_fn(model_cfg: GPTConfig, combine: Callable[[Params, Params], Params] = identity_combine):
    """loss(trainable, frozen, x [B, T], y [B, T], rng, deterministic) -> scalar float32."""
    model = GPT(model_cfg)

    def loss_fn(trainable: Params, frozen: Params, x: jax.Array, y: jax.Array, rng: jax.Array,
                deterministic: bool = False) -> jax.Array:
        logits = model.apply({"params": combine(trainable, frozen)}, x, deterministic=deterministic,
                             rngs={"dropout": rng})  # [B, T, V]
        return cross_entropy(logits, y)

    return loss_fn


def make_train_step(model_cfg: GPTConfig, tx: optax.GradientTransformation,
                    combine: Callable[[Params, Params], Params] = identity_combine,
                    shardings: StepShardings | None = None, donate: bool = True):
    """The jitted `train_step(state, batch, rng, frozen=None) -> (state, metrics)`.

    batch = (x, y), each [A, B, T]; the gradient is the mean over the A micro-batches (accumulated in float32
    with a scan). Dropout keys are fold_in(rng, step) then fold_in(., micro-batch), so they depend on the
    step number only. metrics: loss (mean over micro-batches), grad_norm (before clipping) and `finite`
    (loss, gradient and the new params are all finite).
    """
    loss_fn = make_loss_fn(model_cfg, combine)
    grad_fn = jax.value_and_grad(loss_fn)
    deterministic = model_cfg.dropout == 0.0

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


def make_eval_step(model_cfg: GPTConfig, combine: Callable[[Params, Params], Params] = identity_combine):
    """The jitted `eval_step(trainable, x [B, T], y [B, T], frozen=None) -> loss` (no dropout)."""
    loss_fn = make_loss_fn(model_cfg, combine)

    def eval_fn(trainable: Params, x: jax.Array, y: jax.Array, frozen: Params = None) -> jax.Array:
        return loss_fn(trainable, frozen, x, y, jax.random.PRNGKey(0), True)

    return jax.jit(eval_fn)


def compile_quietly(fn: Any, *args: Any) -> None:
    """AOT-compile a jitted function for these arguments (jit's own cache keeps it); errors are left to the call."""
    try:
        fn.lower(*args).compile()
    except Exception:  # noqa: BLE001 - the real call raises the same error where it can be handled
        pass


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """How the loop holds the train state between its edges (checkpoints, evaluations on the side, exports).

    Stacked for a scanned model in full training: every block leaf of the params and of AdamW's moments as one
    [L, ...] array (`jaxgpt.nn.stacking.stack_tree`), so the optimizer's program does not grow with depth and the
    model scans the params as they come. Unrolled otherwise (LoRA's adapters are small, and blocks that differ
    cannot stack). Checkpoints always hold the unrolled layout, so either kind of run resumes the other's.
    """

    stacked: bool = False

    @classmethod
    def of(cls, model_cfg: GPTConfig, combine: Callable[[Params, Params], Params], params: Params) -> "StateLayout":
        blocks = [params.get(f"h_{i}") for i in range(model_cfg.n_layer)] if isinstance(params, dict) else []
        return cls(model_cfg.scan_layers and combine is identity_combine and stacking.same_structure(blocks))

    def inward(self, state: Any) -> Any:
        """Unrolled -> the loop's layout (pure: jit it with the loop's shardings)."""
        return stacking.stack_tree(state) if self.stacked else state

    def outward(self, state: Any) -> Any:
        """The loop's layout -> unrolled."""
        return stacking.unstack_tree(state) if self.stacked else state


def init_state(params: Params, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def mesh_shardings_fn(mesh_cfg: MeshConfig, batch_rows: int, devices: Any = None):
    """A Mesh over `devices` (default jax.devices()) and the `shardings_fn(state, frozen)` that places the train
    state (large leaves over "fsdp"), the [A, B, T] batch (rows over every device) and the frozen params.
    `devices` may be a compile-only TPU topology's (jaxgpt.aot)."""
    mesh = sh.make_mesh(int(mesh_cfg.data), int(mesh_cfg.fsdp), devices=devices)
    if batch_rows % mesh.size:
        raise ValueError(f"config.batch_size={batch_rows} cannot be split over the {mesh.size} devices of the mesh "
                         f"(data={mesh.shape[sh.DATA]}, fsdp={mesh.shape[sh.FSDP]}); use a batch_size that is a "
                         f"multiple of {mesh.size}")
    m = int(mesh_cfg.min_shard_size)

    def shardings_fn(state: TrainState, frozen: Params) -> StepShardings:
        return StepShardings(state=sh.tree_shardings(state, mesh, m), batch=sh.batch_sharding(mesh, batch_dim=1),
                             rng=sh.replicated(mesh),
                             frozen=None if frozen is None else sh.param_shardings(frozen, mesh, m))

    return mesh, shardings_fn
