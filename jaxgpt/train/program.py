"""The train program: mesh -> optimizer -> state layout -> shardings -> the jitted train and eval steps.

`build_program` is the one builder: the trainer runs its steps, `jaxgpt.aot` lowers and compiles the same
steps for a TPU topology, and `benchmarks/train_throughput.py` times them, so what AOT reports on is by
construction what training runs. It needs only the abstract train state (shapes and dtypes).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxgpt.nn.config import GPTConfig
from jaxgpt.nn.model import init_params
from jaxgpt.sharding import abstract_on
from jaxgpt.train import steps
from jaxgpt.train.config import MeshConfig, OptimConfig

Params = Any


@dataclasses.dataclass(frozen=True)
class Trainable:
    """What is trained: `split(params) -> (trainable, frozen)` and `combine(trainable, frozen) -> params`
    (identity for full training, LoRA's `wrap` for adapters); lora: its LoraConfig, or None."""

    split: Callable[[Params], tuple[Params, Params]] = steps.no_split
    combine: Callable[[Params, Params], Params] = steps.identity_combine
    lora: Any = None


@dataclasses.dataclass(frozen=True)
class TrainProgram:
    """The jitted steps of a run and where their arrays live.

    `saved_shardings` place the state as checkpoints hold it (unrolled blocks) and `shardings` as the loop holds
    it (`layout`: stacked blocks for a scanned model in full training); both are None for a custom placement
    that returned None. `state` and `frozen` are the abstract (ShapeDtypeStruct) trees in the loop's layout.
    """

    model_cfg: GPTConfig
    tx: optax.GradientTransformation
    mesh: Any
    layout: steps.StateLayout
    saved_shardings: steps.StepShardings | None
    shardings: steps.StepShardings | None
    state: steps.TrainState
    frozen: Params
    batch_shape: tuple[int, int, int]  # [A, B, T]
    train_step: Callable
    eval_step: Callable
    lr_fn: Callable | None  # the learning rate at a step, for the log (None for a custom optimizer)

    def abstract_args(self) -> tuple:
        """(state, (x, y), rng, frozen) as ShapeDtypeStructs on their shardings: `train_step.lower(*args)`."""
        s = self.shardings
        batch = jax.ShapeDtypeStruct(self.batch_shape, jnp.int32, sharding=s.batch if s else None)
        rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=s.rng if s else None)
        if s is None:
            return self.state, (batch, batch), rng, self.frozen
        frozen = self.frozen if self.frozen is None else abstract_on(self.frozen, s.frozen)
        return abstract_on(self.state, s.state), (batch, batch), rng, frozen


def abstract_state(model_cfg: GPTConfig, tx: optax.GradientTransformation, trainable: Trainable,
                   seed: int = 0) -> tuple[steps.TrainState, Params]:
    """(state, frozen) of a fresh run as ShapeDtypeStructs, in the saved (unrolled) layout."""
    def fresh() -> tuple[steps.TrainState, Params]:
        params, frozen = trainable.split(init_params(model_cfg, seed))
        return steps.init_state(params, tx), frozen

    return jax.eval_shape(fresh)


def build_program(model_cfg: GPTConfig, optim: OptimConfig | None, mesh_cfg: MeshConfig, *, grad_accum: int,
                  batch_rows: int, devices: Any = None, tx: optax.GradientTransformation | None = None,
                  trainable: Trainable = Trainable(), shardings_fn: Callable | None = None) -> TrainProgram:
    """The program of a run: `batch_rows` rows a micro-batch over `devices` (default jax.devices()),
    `grad_accum` micro-batches a step. `tx` replaces the optimizer of `optim`; `shardings_fn(state, frozen)`
    replaces the placement of `mesh_cfg` (its mesh is then unknown: None)."""
    mesh = None
    if shardings_fn is None:
        mesh, shardings_fn = steps.mesh_shardings_fn(mesh_cfg, batch_rows, devices=devices)
    lr_fn = jax.jit(steps.lr_schedule(optim)) if tx is None else None
    tx = tx or steps.make_optimizer(optim)
    state, frozen = abstract_state(model_cfg, tx, trainable)
    saved = shardings_fn(state, frozen)
    layout = steps.StateLayout.of(model_cfg, trainable.combine, state.params)
    shardings = saved
    if layout.stacked:
        state = jax.eval_shape(layout.inward, state)
        shardings = shardings_fn(state, frozen) if saved is not None else None
    return TrainProgram(
        model_cfg=model_cfg, tx=tx, mesh=mesh, layout=layout, saved_shardings=saved, shardings=shardings,
        state=state, frozen=frozen, batch_shape=(grad_accum, batch_rows, model_cfg.block_size),
        train_step=steps.make_train_step(model_cfg, tx, trainable.combine, shardings),
        eval_step=steps.make_eval_step(model_cfg, trainable.combine), lr_fn=lr_fn)
