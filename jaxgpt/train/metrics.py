"""Run metrics: the metrics.jsonl log, throughput and MFU, and the check that stops a run at a non-finite step.

`MetricsLog` appends JSON objects, one per line and whole lines only (a killed run keeps every line it wrote);
in a bucket, which cannot append, it writes each batch of records as one new object instead (see `MetricsLog`);
`read_metrics` reads both back (the plot, tests). `StepMetrics` holds the device metrics of dispatched steps
until the host fetches them, so the host never blocks on the step it has just queued. The loop writes through
`jaxgpt.train.writers.Writers`, which appends each record to metrics.jsonl at once and hands TensorBoard and
W&B theirs in batches; `StepMetrics.flush()` (keep=0: before every evaluation and checkpoint, and at the end)
writes those out too.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Protocol

from jaxgpt.io import paths

# Peak dense bf16 FLOP/s by device kind (substring match), for the MFU estimate.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 125e12,
              "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6": 918e12}


class Writer(Protocol):
    """Where metric records go: metrics.jsonl, TensorBoard, W&B (`jaxgpt.train.writers`)."""

    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class MetricsLog:
    """Append-only JSON lines, written whole (a killed run keeps every line it wrote).

    In a bucket (a gs:// path) an object cannot be appended to, and rewriting metrics.jsonl whole at each
    flush would upload the whole log again every time (quadratic in the run's length). There the log is
    `batched` (`writers.Writers` hands it records every 64 records, 5 s, before each evaluation and checkpoint
    and at the end), and each batch becomes one new object `metrics.jsonl.parts/NNNNNNNN.jsonl`, numbered on
    from the parts already there: each flush uploads only its own records, in one atomic object write. A run
    killed between flushes loses the records since the last one (never those before a checkpoint). Reading
    costs one listing and one request per part; `read_metrics` reads metrics.jsonl (a workdir copied into the
    bucket) and then the parts, in order.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        if paths.is_url(path):
            self.path = paths.as_path(path)
            self.parts = paths.parts_of(self.path)
            self.next_part = paths.next_part(self.parts)
            self.batched = True
            return
        self.path = Path(path)
        self.parts = None
        # a writer killed mid-line leaves a partial last line: end it so that new records stay readable
        if self.path.is_file() and self.path.stat().st_size:
            with open(self.path, "rb+") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")

    def write(self, record: dict[str, Any]) -> None:
        """Append one line whole or not at all: a failed write (a full disk) is cut back to the last complete
        line before the error is raised, so readers never meet a partial record."""
        self.write_many([record])

    def write_many(self, records: list[dict[str, Any]]) -> None:
        """Append one line per record with one open and (usually) one write; a failed write is cut back to the
        lines that were complete before it, as `write` does."""
        if not records:
            return
        if self.parts is not None:
            self._write_part("".join(json.dumps(r) + "\n" for r in records))
            return
        data = memoryview("".join(json.dumps(r) + "\n" for r in records).encode())
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            end = os.lseek(fd, 0, os.SEEK_END)
            try:
                while data:
                    data = data[os.write(fd, data):]
            except OSError as e:
                try:
                    os.ftruncate(fd, end)
                except OSError:
                    pass
                raise OSError(e.errno, f"cannot append to {self.path} ({e.strerror}); its complete lines are "
                              "kept. Free space on that disk, then run the same command to resume") from e
        finally:
            os.close(fd)

    def _write_part(self, text: str) -> None:
        """One object holding these lines (in a bucket), written whole or not at all."""
        part = self.parts / paths.part_name(self.next_part, ".jsonl")
        try:
            part.write_text(text)
        except OSError as e:
            raise OSError(e.errno, f"cannot write {part} ({type(e).__name__}: {e}); the records written before "
                          "are kept. Check the bucket and its permissions, then run the same command to resume") from e
        self.next_part += 1

    def close(self) -> None:
        pass


class NoLog:
    """The metrics log of processes other than 0 in a multi-host run: they compute but do not write."""

    def write(self, record: dict[str, Any]) -> None:
        del record

    def write_many(self, records: list[dict[str, Any]]) -> None:
        del records

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl; records of the same kind and step are merged, later fields winning (a resumed
    run rewrites the steps after its checkpoint; HellaSwag adds its fields to a step's evaluation). A truncated
    last line (a killed writer) is skipped."""
    out: dict[tuple[str, int], dict[str, Any]] = {}
    events = []
    for line in _lines(path):
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "step" in r and r.get("kind") in ("train", "eval"):
            key = (r["kind"], int(r["step"]))
            out[key] = {**out.get(key, {}), **r}
        else:
            events.append(r)
    return sorted(out.values(), key=lambda r: (r["step"], r["kind"])) + events


def _lines(path: str | os.PathLike) -> list[str]:
    """The lines of a metrics.jsonl and then, in a bucket, of its parts in write order (`MetricsLog`)."""
    p = paths.as_path(path)
    texts = [p.read_text()] if p.is_file() else []
    if paths.is_url(p):
        texts += [part.read_text() for part in paths.sorted_parts(paths.parts_of(p))]
    return [line for text in texts for line in text.splitlines()]


# ---------------------------------------------------------------------------------------------------------
# Throughput and MFU


def flops_per_token(n_layer: int, block_size: int, n_embd: int, n_params: int) -> float:
    """Training FLOPs per token: 6N (forward + backward matmuls) + 12 L T C (attention scores and values)."""
    return 6.0 * n_params + 12.0 * n_layer * block_size * n_embd


def device_peak_flops(device: Any | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of a known accelerator; None on CPU or an unknown device."""
    import jax

    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return None
    kind = getattr(device, "device_kind", "")
    for name, peak in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return peak
    return None


class Throughput:
    """Tokens/s over the steps finished since the last `restart` (compilation, evaluation and checkpoints are
    not training time: the loop restarts the meter after them), and the share of that time the loop waited for
    its next batch (`data_wait`: near 0 when the batches are built ahead of the steps)."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak_flops: float | None) -> None:
        self.tokens_per_step, self.fpt, self.peak = tokens_per_step, flops_per_token, peak_flops
        self.restart()

    def restart(self) -> None:
        self.t0, self.dispatched, self.finished, self.waited = time.perf_counter(), 0, 0, 0.0

    def waited_for_data(self, seconds: float) -> None:
        self.waited += seconds

    def data_wait(self) -> float | None:
        dt = time.perf_counter() - self.t0
        return self.waited / dt if dt > 0 else None

    def dispatched_one(self) -> None:
        self.dispatched += 1

    def finished_some(self, n: int) -> tuple[float | None, float | None]:
        """n more steps are finished (fetched): (tokens/s, MFU) since the restart, None where unknown."""
        self.finished = min(self.finished + n, self.dispatched)  # steps dispatched before the restart do not count
        dt = time.perf_counter() - self.t0
        tps = self.tokens_per_step * self.finished / dt if self.finished and dt > 0 else None
        mfu = self.fpt * tps / self.peak if self.peak and tps else None
        return tps, mfu


def non_finite_error(step: int, loss: float, grad_norm: float, last_saved: int | None, ckpt_dir: Path) -> FloatingPointError:
    """The error a run stops with when a step's loss, gradient or parameters stop being finite."""
    what = (f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {grad_norm}"
            if not math.isfinite(grad_norm) else "the parameters became non-finite in the update")
    kept = f"step {last_saved}" if last_saved is not None else "none yet"
    return FloatingPointError(f"{what} at step {step}; training stopped. The last good checkpoint ({kept}) is kept "
                              f"in {ckpt_dir}; lower the learning rate or set grad_clip, then rerun to resume from it")


class StepMetrics:
    """Device metrics of dispatched steps, fetched in batches; logs them and stops at a non-finite step.

    `flush(keep=1)` leaves the newest step pending: the host then waits on step N-1 while step N is queued,
    so the device never idles on logging. The records go to `log.write`; a log that batches (`writers.Writers`
    for TensorBoard and W&B) is flushed by `flush()` (keep=0) and before a non-finite step stops the run.
    """

    LR_BLOCK = 256  # learning rates are looked up for this many steps at a time

    def __init__(self, log: Writer, meter: Throughput, log_interval: int, lr_fn: Callable | None,
                 on_non_finite: Callable[[int, float, float], Exception]) -> None:
        self.log, self.meter, self.log_interval, self.lr_fn = log, meter, log_interval, lr_fn
        self.on_non_finite = on_non_finite
        self.pending: list[tuple[int, Any]] = []
        self.latest: dict[str, Any] = {}  # loss, tokens_per_s, mfu of the newest fetched step
        self._lr_blocks: dict[int, Any] = {}  # first step of a block -> lr_fn of its LR_BLOCK steps

    def lrs(self, steps: list[int]) -> list[Any]:
        """lr_fn at these steps, from blocks of LR_BLOCK steps computed once each: one small device program
        every LR_BLOCK steps instead of one a step (each wakes the device's threads, which on a CPU are the
        threads running the train step). lr_fn is elementwise, so a block holds what a call per step gives."""
        import numpy as np

        out = []
        for step in steps:
            first = step - step % self.LR_BLOCK
            block = self._lr_blocks.get(first)
            if block is None:
                if len(self._lr_blocks) >= 4:  # steps only grow (a resume starts a new run): keep a few
                    self._lr_blocks.pop(min(self._lr_blocks))
                block = self._lr_blocks[first] = np.asarray(
                    self.lr_fn(np.arange(first, first + self.LR_BLOCK, dtype=np.int32)))
            out.append(block[step - first])
        return out

    def add(self, step: int, metrics: Any) -> None:
        self.pending.append((step, metrics))
        self.meter.dispatched_one()

    def flush(self, keep: int = 0) -> None:
        """Fetch and log every pending step but the newest `keep`; keep=0 also writes out the log's batch."""
        done = self.pending[:len(self.pending) - keep]
        if done:
            self._fetch(done)
        if not keep:
            self._flush_log()

    def _flush_log(self) -> None:
        flush = getattr(self.log, "flush", None)
        if flush is not None:
            flush()

    def _fetch(self, done: list[tuple[int, Any]]) -> None:
        import jax

        values = jax.device_get([m for _, m in done])
        del self.pending[:len(done)]
        steps = [step for step, _ in done]
        lrs = self.lrs(steps) if self.lr_fn else None
        tps, mfu = self.meter.finished_some(len(done))
        for i, (step, m) in enumerate(zip(steps, values)):
            if not bool(m["finite"]):
                self.log.write({"kind": "event", "event": "non-finite", "step": step, "loss": str(float(m["loss"])),
                                "time": time.time()})
                self.pending.clear()
                self._flush_log()  # the steps before it and the event reach the files before the run stops
                raise self.on_non_finite(step, float(m["loss"]), float(m["grad_norm"]))
            if step % self.log_interval == 0 or step == steps[-1]:
                self.log.write({"kind": "train", "step": step, "loss": float(m["loss"]),
                                "grad_norm": float(m["grad_norm"]), "lr": float(lrs[i]) if lrs is not None else None,
                                "tokens_per_s": tps, "mfu": mfu, "data_wait": self.meter.data_wait(),
                                "time": time.time()})
        self.latest = {"loss": float(values[-1]["loss"]), "tokens_per_s": tps, "mfu": mfu}
