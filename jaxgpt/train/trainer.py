"""The training loop: `train(config, workdir)`.

A short loop over the jitted `train_step` (jaxgpt.train.steps). Everything else has its own module: the config
(train_config), the run's starting point, identity and restore (runs), the batches (batches), metric
records and throughput (metrics, writers), and the periodic work as hooks with an interval (hooks).
Rerunning the same workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import jax
import ml_collections
import optax

from jaxgpt import sharding as sh
from jaxgpt.data import batches as batches_lib
from jaxgpt.io import checkpoint
from jaxgpt.io.lock import WorkdirLock
from jaxgpt.nn import weights
from jaxgpt.train import config as train_config
from jaxgpt.train import host_memory, metrics, steps, writers
from jaxgpt.train import run as runs
from jaxgpt.train.hooks import Checkpointer, Evaluator, Hook, Profiler, SignalStop

Params = Any


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
          tx: optax.GradientTransformation | None = None,
          split: Callable[[Params], tuple[Params, Params]] = steps.no_split,
          combine: Callable[[Params, Params], Params] = steps.identity_combine,
          shardings_fn: Callable[[steps.TrainState, Params], steps.StepShardings] | None = None) -> dict[str, Any]:
    """Train, or resume from the latest checkpoint in `workdir`; returns a summary dict.

    `tx` replaces the optimizer built from the config; `split(params) -> (trainable, frozen)` and
    `combine(trainable, frozen) -> params` choose what is trained; `shardings_fn(state, frozen)` places state,
    batches and frozen params on a mesh (default: a mesh over jax.devices() from config.mesh); with
    config.model.scan_layers in full training it is also called on the state in the loop's stacked layout
    (`steps.StateLayout`), which `tx` then updates too (block leaves [L, ...] under "h"). With
    config.lora.rank > 0 the loaded model is frozen and LoRA adapters are trained. Raises FloatingPointError
    naming the step when the loss (or gradient) stops being finite, and WorkdirLocked when another run holds
    `workdir` (process 0 holds its lock from the first write to the last: jaxgpt.io.lock), or WorkdirLost
    when another run took the lock over while this one stalled.
    """
    lock = WorkdirLock(workdir) if jax.process_index() == 0 else None
    with lock or contextlib.nullcontext():
        return _train(config, workdir, tx, split, combine, shardings_fn, lock.check if lock else lambda: None)


def _train(config: ml_collections.ConfigDict, workdir: str | os.PathLike, tx: optax.GradientTransformation | None,
           split: Callable, combine: Callable, shardings_fn: Callable | None,
           check_lock: Callable[[], None]) -> dict[str, Any]:
    from tqdm.auto import tqdm

    wd = Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    train_config.validate(config)
    if config.get("retain_host_memory", True):
        host_memory.retain_freed_memory()
    main = jax.process_index() == 0  # only process 0 writes metrics, JSON, the plot, the sample and exports
    s = _setup(config, wd, tx, runs.trainable_of(config, split, combine), shardings_fn, main)
    state, frozen, start, max_iters = s.state, s.frozen, s.start, int(config.max_iters)
    meter = metrics.Throughput(s.tokens_per_step, s.flops_per_token, metrics.device_peak_flops())
    bar = tqdm(total=max_iters, initial=start, disable=not (config.progress and main), dynamic_ncols=True, desc="train")
    ckpt_dir = wd / checkpoint.RUN_CKPT_DIR
    log = writers.Writers([metrics.MetricsLog(wd / "metrics.jsonl"), *writers.from_config(config, wd).writers]
                          if main else [metrics.NoLog()])
    step_metrics = metrics.StepMetrics(log, meter, int(config.log_interval), s.lr_fn, lambda *a: metrics.non_finite_error(
        *a, checkpointer.last_saved, ckpt_dir))
    evaluator = Evaluator(s.eval_step, s.data.eval_sets, frozen, log, bar.write)

    def flush(keep: int = 0) -> None:  # every write of the loop goes through here: stop first if the lock is lost
        check_lock()
        step_metrics.flush(keep=keep)

    checkpointer = Checkpointer(s.mngr, s.meta, evaluator, flush, start if s.resumed else None, s.unrolled)
    profiler = Profiler(tuple(config.profile_steps), wd / "profile", log) if config.get("profile_steps") else None
    hooks = [*([Hook(profiler, 1, at_end=False)] if profiler else []),  # first: the trace ends before evals
             Hook(lambda n, st: flush(keep=1), int(config.log_interval), at_end=False),
             Hook(lambda n, st: (flush(), evaluator(n, st)), int(config.eval_interval),
                  pauses_training=True),
             *_extra_hooks(config, s, log),
             Hook(checkpointer, int(config.ckpt_interval), pauses_training=True)]
    if s.resumed:
        log.write({"kind": "event", "event": "resume", "step": start, "time": time.time()})
    t_start, step = time.perf_counter(), start
    try:
        with SignalStop() as stop, s.data.prefetch(start) as feed, sh.activation_mesh(s.mesh):
            if start == 0 and config.eval_at_start and max_iters > 0:
                _evaluate_while_compiling(s, state, frozen, evaluator)
            while step < max_iters and not stop.signal:
                if profiler:
                    profiler.before_step(step)
                t_wait = time.perf_counter()
                _, host_batch = next(feed)
                meter.waited_for_data(time.perf_counter() - t_wait)
                state, m = s.train_step(state, s.data.place(host_batch), s.dropout_rng, frozen)
                step_metrics.add(step, m)
                step += 1
                bar.update(1)
                due = [h for h in hooks if h.due(step, max_iters)]
                if step == start + 1:  # the first step compiles: measure throughput from its end
                    flush()
                    meter.restart()
                for h in due:
                    h.fn(step, state)
                if any(h.pauses_training for h in due):
                    meter.restart()
            flush()
            if stop.signal:
                checkpointer(step, state)
                log.write({"kind": "event", "event": f"stopped by {stop.signal}", "step": step, "time": time.time()})
                bar.write(f"{stop.signal}: saved a checkpoint at step {step} in {ckpt_dir}; run the same command "
                          "again to resume")
    finally:
        bar.close()
        if profiler:
            profiler.stop()
        checkpointer.wait()
        s.mngr.close()
        with contextlib.suppress(OSError) if sys.exc_info()[0] else contextlib.nullcontext():
            log.close()  # on a full disk the writers' flush fails too: keep the error that stopped the run
    summary = {"start_step": start, "workdir": str(wd), "step": step, "wall_s": time.perf_counter() - t_start,
               **step_metrics.latest, **evaluator.last}
    if stop.signal:
        return {**summary, "interrupted": stop.signal}
    return {**summary, **_finish(config, wd, s, state, frozen, step, main)}


class _Setup:
    """Everything the loop needs, built once (see `_setup`)."""

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


def _setup(config: ml_collections.ConfigDict, wd: Path, tx: Any, trainable: runs.Trainable,
           shardings_fn: Callable | None, main: bool) -> _Setup:
    """Data, model, run identity, the (restored) train state placed on the mesh, and the jitted steps."""
    ddir = runs.ensure_data(config, wd)
    data_meta = runs.data_meta(ddir)
    init = runs.initial_model(config, data_meta)
    cfg, tok_meta = init.cfg, init.tokenizer
    if data_meta["vocab_size"] > cfg.vocab_size:
        raise ValueError(f"the data has {data_meta['vocab_size']} token ids but the model only "
                         f"{cfg.vocab_size}; set config.model.vocab_size >= {data_meta['vocab_size']} (or 0)")
    T, B, A, seed = cfg.block_size, int(config.batch_size), int(config.grad_accum), int(config.seed)
    runs.check_lora_export(cfg, config, trainable)
    mesh = None  # the mesh activations are pinned to (batch over every device); unknown for a given shardings_fn
    if shardings_fn is None:
        mesh, shardings_fn = steps.mesh_shardings_fn(config, B)
    lora_now = runs.lora_identity(config, trainable)
    mngr, ckpt_steps = runs.open_checkpoints(config, wd, cfg, lora_now)
    try:
        if main:
            runs.write_identity(wd, cfg, tok_meta, config, lora_now)
        lr_fn = jax.jit(steps.lr_schedule(config)) if tx is None else None  # for the log
        tx = tx or steps.make_optimizer(config)
        state, frozen = runs.initial_state(cfg, init.params, seed, tx, trainable, bool(ckpt_steps))
        del init
        start = ckpt_steps[-1] if ckpt_steps else 0
        shardings = shardings_fn(state, frozen) if shardings_fn else None
        if ckpt_steps:  # straight onto this run's mesh, whatever mesh saved it
            state = runs.restore_state(mngr, wd, start, state, shardings.state if shardings else None)
        place = batches_lib.place_fn(shardings.state if shardings else None)
        state = place(state, shardings.state) if shardings else place(state)
        frozen = place(frozen, shardings.frozen) if shardings and frozen is not None else frozen
        state, shardings, unrolled = _hold_in_layout(steps.StateLayout.of(cfg, trainable.combine, state.params),
                                                     state, frozen, shardings, shardings_fn)
        data = batches_lib.TrainBatches(ddir, seed=seed, accum=A, batch=B, block=T, eval_iters=int(config.eval_iters),
                                        batch_sharding=shardings.batch if shardings else None,
                                        vocab_size=cfg.vocab_size)
    except Exception:
        mngr.close()
        raise
    n_params = weights.count_params((state.params, frozen))
    n_params -= T * cfg.n_embd if cfg.pos_embedding == "learned" else 0
    return _Setup(
        cfg=cfg, tok_meta=tok_meta, trainable=trainable, mngr=mngr, mesh=mesh, state=state, frozen=frozen, start=start,
        unrolled=unrolled, resumed=bool(ckpt_steps), data=data, lr_fn=lr_fn, tokens_per_step=A * B * T,
        flops_per_token=metrics.flops_per_token(cfg.n_layer, T, cfg.n_embd, n_params),
        train_step=steps.make_train_step(cfg, tx, trainable.combine, shardings),
        eval_step=steps.make_eval_step(cfg, trainable.combine), dropout_rng=jax.random.fold_in(jax.random.PRNGKey(seed), 1),
        meta={"model": cfg.to_dict(), "tokenizer": tok_meta, "seed": seed, "data_dir": str(ddir)})


def _hold_in_layout(layout: steps.StateLayout, state: steps.TrainState, frozen: Params, shardings: Any,
                    shardings_fn: Callable | None) -> tuple[steps.TrainState, Any, Callable]:
    """The state in the loop's layout (stacked blocks for a scanned model), its shardings, and the jitted
    `unrolled(state)` that checkpoints and the end-of-run sample and exports read (identity when nothing is
    stacked)."""
    if not layout.stacked:
        return state, shardings, lambda st: st
    unrolled = jax.jit(layout.outward, out_shardings=shardings.state if shardings else None)
    if shardings is not None:
        shardings = shardings_fn(jax.eval_shape(layout.inward, state), frozen)
    state = jax.jit(layout.inward, out_shardings=shardings.state if shardings else None)(state)
    return state, shardings, unrolled


def _extra_hooks(config: ml_collections.ConfigDict, s: _Setup, log: Any) -> list[Hook]:
    """Optional periodic work: HellaSwag accuracy beside the validation loss (config.eval_hellaswag_every)."""
    every = int(config.get("eval_hellaswag_every", 0) or 0)
    if not every:
        return []
    from jaxgpt.data.tokenizer import from_meta
    from jaxgpt.eval import hellaswag

    examples = hellaswag.load_examples(config.get("hellaswag_path") or None, int(config.get("hellaswag_limit", 0))
                                       or None)
    tokenizer = from_meta(s.tok_meta, config.data.bpe_path or None)

    def run(step: int, state: steps.TrainState) -> None:
        params = s.trainable.combine(state.params, s.frozen)  # stacked params too: the model scans them
        r = hellaswag.evaluate(params, s.cfg, examples, tokenizer, batch_size=int(config.batch_size))
        log.write({"kind": "eval", "step": step, "hellaswag_acc": r["acc"], "hellaswag_acc_norm": r["acc_norm"],
                   "hellaswag_n": r["n"], "time": time.time()})

    return [Hook(run, every, pauses_training=True)]


def _evaluate_while_compiling(s: _Setup, state: steps.TrainState, frozen: Params, evaluator: Evaluator) -> None:
    """The step-0 evaluation, with the train step compiling in a background thread meanwhile (the first call
    then reuses it; a failure is left to that call to report)."""
    def compile_step() -> None:
        with sh.activation_mesh(s.mesh):  # the mesh context is per thread
            steps.compile_quietly(s.train_step, state, s.data.place(s.data.host(s.start)), s.dropout_rng, frozen)

    compiling = threading.Thread(target=compile_step, daemon=True)
    compiling.start()
    evaluator(0, state)
    compiling.join()


def _finish(config: ml_collections.ConfigDict, wd: Path, s: _Setup, state: steps.TrainState, frozen: Params,
            step: int, main: bool) -> dict[str, Any]:
    """After the last step: the loss plot, the LoRA adapters and merged export, and a sample."""
    from jaxgpt import plot

    out: dict[str, Any] = {}
    state = s.unrolled(state)
    if s.start >= int(config.max_iters):
        print(f"{wd} already holds a finished run at step {s.start}; raise --config.max_iters to train further, "
              "or use a new --workdir")
    if main:
        out["plot"] = str(plot.plot_metrics(wd))
    if s.trainable.lora is not None:
        out.update(runs.finish_lora(s.cfg, frozen, state.params, s.trainable.lora, config, wd, main))
    if config.sample_tokens > 0:
        text = runs.sample_text(s.cfg, s.trainable.combine(state.params, frozen), s.tok_meta, config)
        if main:
            (wd / "sample.txt").write_text(text)
            print(f"---------- sample (step {step}) ----------\n{text}\n----------------------------------")
        out["sample"] = text
    return out
