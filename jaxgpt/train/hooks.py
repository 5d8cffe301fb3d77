"""The periodic work of the training loop, each a hook with an interval: log metrics, evaluate, checkpoint,
profile; and the signal handler that stops a run cleanly.

A hook is `Hook(fn, every)`: the loop calls `fn(step, state)` after every step where `step % every == 0`
(and after the last step when `at_end`). Hooks that do not train (evaluation, checkpoints) mark
`pauses_training`, so the throughput meter restarts after them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import numpy as np

from jaxgpt.io import checkpoint, paths
from jaxgpt.sharding import gather_to_host
from jaxgpt.train.steps import TrainState


@dataclasses.dataclass
class Hook:
    fn: Callable[[int, TrainState], Any]
    every: int
    at_end: bool = True
    pauses_training: bool = False

    def due(self, step: int, last: int) -> bool:
        return self.every > 0 and (step % self.every == 0 or (self.at_end and step == last))


class Evaluator:
    """Mean loss over the fixed evaluation batches of each split; `last` holds the newest result. With several
    processes every one calls it together (a loss split over hosts is all-gathered) and every one gets it."""

    def __init__(self, eval_step: Callable, eval_sets: dict[str, list], frozen: Any, log: Any,
                 print_fn: Callable[[str], None] = print) -> None:
        self.eval_step, self.eval_sets, self.frozen, self.log, self.print = eval_step, eval_sets, frozen, log, print_fn
        self.last: dict[str, float] = {}
        self.last_step: int | None = None

    def __call__(self, step: int, state: TrainState) -> dict[str, float]:
        out = {}
        for name, batches in self.eval_sets.items():
            losses = gather_to_host([self.eval_step(state.params, x, y, self.frozen) for x, y in batches])  # [n]
            out[f"{name}_loss"] = float(np.mean(np.asarray(losses, np.float64)))
        self.log.write({"kind": "eval", "step": step, **out, "time": time.time()})
        self.print(f"step {step}: train loss {out['train_loss']:.4f}, val loss {out['val_loss']:.4f}")
        self.last, self.last_step = out, step
        return out


class Checkpointer:
    """Saves the train state (with the newest evaluation of the same step, which ranks it for keep_best).

    A save that fails (a full disk, a lost mount) stops the run with `save_error`: the previous checkpoint
    stays complete, since orbax commits a step by renaming it only once every file is written.
    """

    def __init__(self, mngr: Any, meta: dict[str, Any], evaluator: Evaluator, before_save: Callable[[], None],
                 last_saved: int | None, unrolled: Callable[[TrainState], TrainState] = lambda state: state) -> None:
        self.mngr, self.meta, self.evaluator, self.before_save = mngr, meta, evaluator, before_save
        self.unrolled = unrolled  # the loop's state layout -> the checkpoints' (unrolled) one
        self.last_saved = last_saved  # the newest step saved, or being saved in the background
        self.kept = last_saved  # the newest complete step
        self.in_flight: int | None = None

    def __call__(self, step: int, state: TrainState) -> None:
        if step == self.last_saved:
            return
        self.before_save()  # never write a checkpoint past a non-finite step
        self.wait()
        metrics = self.evaluator.last if self.evaluator.last_step == step else {}
        state = self.unrolled(state)
        try:
            checkpoint.save_run_step(self.mngr, step, params=state.params,
                                     optimizer={"step": state.step, "opt_state": state.opt_state},
                                     meta={"step": step, **self.meta, **metrics}, val_loss=metrics.get("val_loss"))
        except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many types for one failed write
            raise save_error(step, paths.as_path(self.mngr.directory), self.kept, e) from e
        self.last_saved = self.in_flight = step

    def wait(self) -> None:
        """Wait for a background save; its failure is raised as `save_error`."""
        try:
            self.mngr.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise save_error(self.in_flight, paths.as_path(self.mngr.directory), self.kept, e) from e
        if self.in_flight is not None:
            self.kept, self.in_flight = self.in_flight, None


def _mount_point(path: Path) -> Path:
    path = path.absolute()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def save_error(step: int | None, ckpt_dir: Path, kept: int | None, e: BaseException) -> OSError:
    """The one-line error a failed checkpoint save stops the run with: the step, the disk and its free space,
    and the checkpoint that is kept. The failed step's partial folder is removed, freeing its space."""
    for partial in ckpt_dir.glob(f"{step}{checkpoint.ORBAX_TMP_MARKER}*"):
        shutil.rmtree(partial, ignore_errors=True)
    chain, cause = [], e
    while cause is not None and len(chain) < 8:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    full = any(getattr(c, "errno", None) == errno.ENOSPC or "No space left" in str(c) for c in chain)
    what = "the disk is full" if full else f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
    kept_msg = f"step {kept} is kept and restorable" if kept is not None else "there is no earlier checkpoint"
    if paths.is_url(ckpt_dir):  # a bucket has no disk to measure: name it and the error
        return OSError(getattr(e, "errno", None) or errno.EIO,
                       f"saving checkpoint step {step} to {ckpt_dir} failed ({what}; bucket "
                       f"{paths.bucket_and_key(ckpt_dir)[0]}); training stopped. The last complete checkpoint: "
                       f"{kept_msg}. Check the bucket's quota and permissions, then run the same command to resume")
    try:
        free = f"{shutil.disk_usage(ckpt_dir).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    return OSError(errno.ENOSPC if full else getattr(e, "errno", None) or errno.EIO,
                   f"saving checkpoint step {step} to {ckpt_dir} failed ({what}; the disk mounted at "
                   f"{_mount_point(ckpt_dir)} has {free}); training stopped. The last complete checkpoint: "
                   f"{kept_msg}. Free space there (or move the workdir), then run the same command to resume")


class Profiler:
    """A `jax.profiler` trace of steps first..last (inclusive, 0-based) into `out_dir`; TensorBoard's profile
    plugin or Perfetto reads it. The loop runs it before the other hooks, so an evaluation or checkpoint due
    after step `last` stays out of the trace."""

    def __init__(self, steps: tuple[int, int], out_dir: Path, log: Any) -> None:
        self.first, self.last = steps
        self.out_dir, self.log, self.active = out_dir, log, False

    def before_step(self, step: int) -> None:
        if step == self.first and not self.active:
            jax.profiler.start_trace(str(self.out_dir))
            self.active = True

    def __call__(self, step: int, state: TrainState) -> None:
        if self.active and step > self.last:  # `step` steps are done: 0 .. step - 1
            jax.block_until_ready(state.step)
            self.stop()
            self.log.write({"kind": "event", "event": "profile", "step": step, "dir": str(self.out_dir),
                            "time": time.time()})

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False


class SignalStop:
    """SIGTERM / SIGINT set `signal`; the loop asks `agreed()` after every step and saves before leaving.

    With several processes a signal reaches one host (a preempted VM) while the others step on: `agreed()` is a
    vote every process casts after the same step (an all-gather of each one's signal, one int per device), so all
    of them leave after the same step and write one checkpoint together. The vote of step n is read after step
    n + 1 is dispatched (the host never waits on the device for it), so a run stops at most one step after the
    signal. With one process there is no vote: the run stops after the step the signal arrived in.

    A second signal while the stop's checkpoint is being written (`saving()`) is reported and the save finishes
    first; anywhere else it leaves at once (KeyboardInterrupt). Installed only in the main thread; handlers are
    restored on exit.
    """

    def __init__(self, print_fn: Callable[[str], None] = print) -> None:
        self.signal: str | None = None  # the stop every process agreed on (with one process: this one's signal)
        self.local: str | None = None  # the signal this process received
        self.print = print_fn
        self.old: dict[int, Any] = {}
        self.in_save = False
        self.vote = StopVote() if jax.process_count() > 1 else None

    def __call__(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.local is None:
            self.local = name
            if self.vote is None:
                self.signal = name
            return
        if self.in_save:
            self.print(f"{name} again: the checkpoint is being written; the run exits as soon as it is complete")
            return
        raise KeyboardInterrupt

    def agreed(self) -> str | None:
        """Called by every process after each step: the stop they all agree on, or None to go on."""
        if self.vote is not None and self.signal is None:
            self.signal = self.vote.cast(self.local)
        return self.signal

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """While the stop's checkpoint is written a second signal does not interrupt it."""
        self.in_save = True
        try:
            yield
        finally:
            self.in_save = False

    def __enter__(self) -> "SignalStop":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self.old[s] = signal.signal(s, self)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self.old.items():
            signal.signal(s, h)


class StopVote:
    """Every process's stop signal, all-gathered after each step (several processes only).

    `cast(local)` sends this process's signal (None: go on) and returns the result of the previous cast: None,
    or "SIGTERM (process 1 of 2)" naming the first process that got one. Every process casts at the same steps,
    so every process reads the same answer at the same step. Each cast is one tiny jitted all-gather (an int32
    per device) dispatched without waiting; reading the previous one waits only for the step before the last.
    """

    def __init__(self) -> None:
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        devices = np.asarray(jax.devices(), dtype=object)
        mesh = Mesh(devices, ("p",))
        self.owner = [d.process_index for d in devices]  # [D] the process of each device's entry
        self.n_processes = jax.process_count()
        self.sharding = NamedSharding(mesh, PartitionSpec("p"))
        self.gather = jax.jit(lambda codes: codes, out_shardings=NamedSharding(mesh, PartitionSpec()))
        self.n_local = len(jax.local_devices())
        self.pending: jax.Array | None = None

    def cast(self, local: str | None) -> str | None:
        code = int(signal.Signals[local]) if local else 0
        local_codes = np.full(self.n_local, code, np.int32)  # [local devices]
        codes = jax.make_array_from_process_local_data(self.sharding, local_codes, (len(self.owner),))  # [D]
        previous, self.pending = self.pending, self.gather(codes)  # [D] replicated on every device
        return None if previous is None else self.read(np.asarray(previous))

    def read(self, codes: np.ndarray) -> str | None:
        """codes [D]: the signal number each device's process sent (0: none) -> the agreed stop, or None."""
        hit = np.flatnonzero(codes)
        if not hit.size:
            return None
        process = self.owner[int(hit[0])]
        return f"{signal.Signals(int(codes[hit[0]])).name} (process {process} of {self.n_processes})"
