"""The training loop: `train(train_cfg, workdir)`.

Read top to bottom: open the run (`jaxgpt.train.run.open_run`: data, model, the train program, the restored
state), loop over the jitted `train_step` with hooks (log, evaluate, checkpoint, profile), finish (plot,
LoRA adapters and export, a sample). Rerunning the same workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Any, Callable

import jax
import ml_collections
import optax

from jaxgpt import sharding as sh
from jaxgpt.io.lock import WorkdirLock
from jaxgpt.io.workdir import Workdir
from jaxgpt.train import host_memory, metrics, steps, writers
from jaxgpt.train.hooks import Checkpointer, Evaluator, Hook, Profiler, SignalStop
from jaxgpt.train.run import Run, finish_lora, open_run, sample_text

Params = Any


def train(train_cfg: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
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
    wd = Workdir(workdir)
    main = jax.process_index() == 0  # only process 0 writes metrics, JSON, the plot, the sample and exports
    lock = WorkdirLock(wd.root) if main else None
    with lock or contextlib.nullcontext():
        wd.create()
        if train_cfg.retain_host_memory:
            host_memory.retain_freed_memory()
        run = open_run(train_cfg, wd, main=main, tx=tx, split=split, combine=combine, shardings_fn=shardings_fn)
        return _loop(run, train_cfg, main, lock.check if lock else lambda: None)


def _loop(run: Run, train_cfg: ml_collections.ConfigDict, main: bool, check_lock: Callable[[], None]) -> dict:
    """The steps from run.start to max_iters, with the hooks; then `_finish` (unless a signal stopped it)."""
    loop, wd, program = run.parts.loop, run.workdir, run.program
    state, frozen, start, max_iters = run.state, run.frozen, run.start, loop.max_iters
    meter = metrics.Throughput(run.tokens_per_step, run.flops_per_token, metrics.device_peak_flops())
    bar = progress_bar(max_iters, start, loop.progress and main)
    log = writers.Writers([metrics.MetricsLog(wd.metrics), *writers.from_config(train_cfg, wd.root).writers]
                          if main else [metrics.NoLog()])
    step_metrics = metrics.StepMetrics(log, meter, loop.log_interval, program.lr_fn, lambda *a: metrics.non_finite_error(
        *a, checkpointer.last_saved, wd.checkpoints))
    evaluator = Evaluator(program.eval_step, run.data.eval_sets, frozen, log, bar.write)

    def flush(keep: int = 0) -> None:  # every write of the loop goes through here: stop first if the lock is lost
        check_lock()
        step_metrics.flush(keep=keep)
        if step_metrics.latest:
            bar.set_postfix(bar_postfix(step_metrics.latest), refresh=False)

    checkpointer = Checkpointer(run.mngr, run.meta, evaluator, flush, start if run.resumed else None, run.unrolled)
    profiler = Profiler(loop.profile_steps, wd.profile, log) if loop.profile_steps else None
    hooks = [*([Hook(profiler, 1, at_end=False)] if profiler else []),  # first: the trace ends before evals
             Hook(lambda n, st: flush(keep=1), loop.log_interval, at_end=False),
             Hook(lambda n, st: (flush(), evaluator(n, st)), loop.eval_interval, pauses_training=True),
             *_extra_hooks(run, log),
             Hook(checkpointer, loop.ckpt_interval, pauses_training=True)]
    if run.resumed:
        log.write({"kind": "event", "event": "resume", "step": start, "time": time.time()})
    t_start, step = time.perf_counter(), start
    try:
        with SignalStop(bar.write) as stop, run.data.prefetch(start) as feed, sh.activation_mesh(program.mesh):
            if start == 0 and loop.eval_at_start and max_iters > 0:
                _evaluate_while_compiling(run, evaluator)
            while step < max_iters and not stop.signal:
                if profiler:
                    profiler.before_step(step)
                t_wait = time.perf_counter()
                _, host_batch = next(feed)
                meter.waited_for_data(time.perf_counter() - t_wait)
                state, m = program.train_step(state, run.data.place(host_batch), run.dropout_rng, frozen)
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
                stop.agreed()  # every process after the same step: a signal to any one stops them all
            flush()
            if stop.signal:
                _save_on_stop(stop, checkpointer, step, state, log, bar.write, wd)
    finally:
        bar.close()
        if profiler:
            profiler.stop()
        checkpointer.wait()
        run.mngr.close()
        with contextlib.suppress(OSError) if sys.exc_info()[0] else contextlib.nullcontext():
            log.close()  # on a full disk the writers' flush fails too: keep the error that stopped the run
    summary = {"start_step": start, "workdir": str(wd), "step": step, "wall_s": time.perf_counter() - t_start,
               **step_metrics.latest, **evaluator.last}
    if stop.signal:
        return {**summary, "interrupted": stop.signal}
    return {**summary, **_finish(run, state, step, main)}


def progress_bar(total: int, initial: int, enabled: bool) -> Any:
    """The run's tqdm bar: steps done, their rate and tqdm's ETA; `bar_postfix` adds loss and tokens/s."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, desc="train")


def bar_postfix(latest: dict[str, Any]) -> dict[str, str]:
    """The progress bar's postfix from the newest train record: loss and tokens/s (tqdm adds the ETA)."""
    out = {"loss": f"{latest['loss']:.4f}"}
    tps = latest.get("tokens_per_s")
    if tps:
        out["tok/s"] = f"{tps / 1e3:.1f}k" if tps >= 1e4 else f"{tps:.0f}"
    return out


def _save_on_stop(stop: SignalStop, checkpointer: Checkpointer, step: int, state: steps.TrainState, log: Any,
                  print_fn: Callable[[str], None], wd: Workdir) -> None:
    """The checkpoint of a stopped run, written to the end (a second signal meanwhile does not cut it short)."""
    with stop.saving():
        checkpointer(step, state)
        checkpointer.wait()
    log.write({"kind": "event", "event": f"stopped by {stop.signal.split()[0]}", "by": stop.signal, "step": step,
               "time": time.time()})
    print_fn(f"{stop.signal}: saved a checkpoint at step {step} in {wd.checkpoints}; run the same command again "
             "to resume")


def _extra_hooks(run: Run, log: Any) -> list[Hook]:
    """Optional periodic work: HellaSwag accuracy beside the validation loss (config.eval_hellaswag_every), and
    `hellaswag_loss`, the mean loss per token of the correct endings (a smooth signal where accuracy is noisy)."""
    loop = run.parts.loop
    if not loop.eval_hellaswag_every:
        return []
    from jaxgpt.data.tokenizer import from_meta
    from jaxgpt.eval import hellaswag

    examples = hellaswag.load_examples(loop.hellaswag_path or None, loop.hellaswag_limit or None)
    tokenizer = from_meta(run.tok_meta, run.parts.data.bpe_path or None)

    def evaluate(step: int, state: steps.TrainState) -> None:
        params = run.trainable.combine(state.params, run.frozen)  # stacked params too: the model scans them
        r = hellaswag.evaluate(params, run.model_cfg, examples, tokenizer, batch_size=loop.batch_size, details=True)
        log.write({"kind": "eval", "step": step, "hellaswag_acc": r["acc"], "hellaswag_acc_norm": r["acc_norm"],
                   "hellaswag_loss": hellaswag.label_loss(r, examples), "hellaswag_n": r["n"], "time": time.time()})

    return [Hook(evaluate, loop.eval_hellaswag_every, pauses_training=True)]


def _evaluate_while_compiling(run: Run, evaluator: Evaluator) -> None:
    """The step-0 evaluation, with the train step compiling in a background thread meanwhile (the first call
    then reuses it; a failure is left to that call to report)."""
    def compile_step() -> None:
        with sh.activation_mesh(run.program.mesh):  # the mesh context is per thread
            steps.compile_quietly(run.program.train_step, run.state, run.data.place(run.data.host(run.start)),
                                  run.dropout_rng, run.frozen)

    compiling = threading.Thread(target=compile_step, daemon=True)
    compiling.start()
    evaluator(0, run.state)
    compiling.join()


def _finish(run: Run, state: steps.TrainState, step: int, main: bool) -> dict[str, Any]:
    """After the last step: the loss plot, the LoRA adapters and merged export, and a sample."""
    from jaxgpt import plot

    out: dict[str, Any] = {}
    state = run.unrolled(state)
    if run.start >= run.parts.loop.max_iters:
        print(f"{run.workdir} already holds a finished run at step {run.start}; raise --config.max_iters to train "
              "further, or use a new --workdir")
    if main:
        out["plot"] = str(plot.plot_metrics(run.workdir.root))
    if run.trainable.lora is not None:
        out.update(finish_lora(run, state, main))
    if run.parts.sample.sample_tokens > 0:
        text = sample_text(run, run.trainable.combine(state.params, run.frozen))
        if main:
            run.workdir.sample.write_text(text)
            print(f"---------- sample (step {step}) ----------\n{text}\n----------------------------------")
        out["sample"] = text
    return out
