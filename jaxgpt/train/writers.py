"""Metric writers beside `metrics.jsonl`: TensorBoard event files and Weights & Biases.

Each has the interface of the training loop's `MetricsLog`: `write(record)` with records such as
{"kind": "train", "step": 10, "loss": ..., "lr": ..., "grad_norm": ..., "tokens_per_s": ..., "mfu": ...} or
{"kind": "eval", "step": 10, "val_loss": ...}, `write_many(records)` and `close()`. Every numeric field of a
"train" or "eval" record becomes the scalar `KIND/FIELD` at that step; other records (events) and fields
("time", strings) are skipped. TensorBoard events are written with tensorboardX's protobufs and checksum (NumPy +
protobuf: no TensorFlow or PyTorch); wandb is imported only when a project is set.

`Writers` fans records out to several writers. Writers marked `batched` (TensorBoard, W&B) get them in batches:
records wait in order in memory and go out together every `every` records, after `max_delay_s`, at `flush()`
(the loop flushes before every evaluation and checkpoint, at its end, and before a non-finite step stops it) and
at `close()`. The others (metrics.jsonl: one append, ~15 us) get each record at once, so a killed run keeps
every record it logged. In a bucket, which cannot append, metrics.jsonl is batched too and the TensorBoard
writer puts each batch in a new event file (see `TensorBoardWriter`).
"""

from __future__ import annotations

import math
import os
import socket
import struct
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterable

from jaxgpt.io import paths
from jaxgpt.io.workdir import Workdir

SCALAR_KINDS = ("train", "eval")
SKIP_FIELDS = ("kind", "step", "time")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """{"train/loss": 2.5, ...}: the finite-or-not numeric fields of a train/eval record; {} for other records."""
    kind = record.get("kind")
    if kind not in SCALAR_KINDS or "step" not in record:
        return {}
    return {f"{kind}/{k}": float(v) for k, v in record.items()
            if k not in SKIP_FIELDS and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _tensorboardx() -> Any:
    """tensorboardX's protobufs and record checksum, imported without PyTorch: tensorboardX imports torch when it
    is installed, only to accept torch tensors (seconds of start-up per run); the values written here are Python
    floats."""
    hide_torch = "torch" not in sys.modules
    if hide_torch:
        sys.modules["torch"] = None  # `import torch` inside tensorboardX raises ImportError, which it expects
    try:
        import tensorboardX.proto.event_pb2
        import tensorboardX.proto.summary_pb2
        import tensorboardX.record_writer
    except ImportError:
        raise ImportError("TensorBoard logging needs tensorboardX; pip install tensorboardX "
                          "(or set config.tensorboard=False)") from None
    finally:
        if hide_torch:
            del sys.modules["torch"]
    return tensorboardX


class TensorBoardWriter:
    """Scalars into a TensorBoard event file in `logdir` (`tensorboard --logdir WORKDIR/tensorboard`).

    One event per record, holding every scalar of the record (at the record's step and time), appended to the
    file in the calling thread: `write_many` frames a batch of events (TFRecord: length, masked CRC-32C, data,
    masked CRC-32C) and writes it with one `write` and a flush to the OS, without tensorboardX's writer
    thread and its per-scalar inter-process queue. `close` fsyncs the file.

    In a bucket (a gs:// logdir), where an object cannot be appended to, each batch becomes its own event file
    `events.out.tfevents.<time>.<host>.NNNNNNNN` (numbered in write order, each an atomic object write holding
    the version event and the batch's events): TensorBoard reads a folder's event files in name order, so they
    read as one log, and each flush uploads only its own events.
    """

    batched = True  # `Writers` hands it records in batches

    def __init__(self, logdir: str | os.PathLike) -> None:
        tbx = _tensorboardx()
        self._Event, self._Summary = tbx.proto.event_pb2.Event, tbx.proto.summary_pb2.Summary
        self._crc = tbx.record_writer.masked_crc32c
        now = time.time()
        name = f"events.out.tfevents.{str(now)[:10]}.{socket.gethostname()}"
        self._version = self._frame(self._Event(wall_time=now, file_version="brain.Event:2"))
        if paths.is_url(logdir):  # one object per batch, numbered
            self.path, self._file, self._part = paths.as_path(logdir) / name, None, 0
            self._put(b"")
            return
        Path(logdir).mkdir(parents=True, exist_ok=True)
        self.path = Path(logdir) / name
        self._file = open(self.path, "ab")  # noqa: SIM115 - held open until close()
        self._file.write(self._version)
        self._file.flush()

    def _put(self, frames: bytes) -> None:
        """The next event file of a bucket logdir: the version event, then `frames`."""
        self.path.with_name(f"{self.path.name}.{self._part:08d}").write_bytes(self._version + frames)
        self._part += 1

    def _frame(self, event: Any) -> bytes:
        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        return b"".join((header, struct.pack("<I", self._crc(header)), data, struct.pack("<I", self._crc(data))))

    def _event(self, record: dict[str, Any]) -> Any:
        values = scalars(record)
        if not values:
            return None
        summary = self._Summary(value=[self._Summary.Value(tag=tag, simple_value=v) for tag, v in values.items()])
        t = record.get("time")
        return self._Event(wall_time=float(t) if isinstance(t, (int, float)) else time.time(),
                           step=int(record["step"]), summary=summary)

    def write(self, record: dict[str, Any]) -> None:
        self.write_many([record])

    def write_many(self, records: Iterable[dict[str, Any]]) -> None:
        frames = [self._frame(e) for e in map(self._event, records) if e is not None]
        if frames and self._file is None:
            self._put(b"".join(frames))
        elif frames:
            self._file.write(b"".join(frames))
            self._file.flush()

    def close(self) -> None:
        if self._file is None or self._file.closed:
            return
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()


class WandbWriter:
    """Scalars to a Weights & Biases run; `WANDB_MODE=offline` keeps them on disk under `dir`.

    The run id is kept in `dir/wandb_run_id`, so a resumed training run continues the same W&B run. Each
    record is logged with its own `step` field as the x axis (not W&B's internal counter, which must only grow:
    a resumed run logs the steps after its checkpoint again). W&B writes its own files on a local disk: for a
    bucket `dir` (the workdir) they go to this machine's `paths.local_cache` of it; the run id stays in the bucket.
    """

    batched = True

    def __init__(self, project: str, dir: str | os.PathLike, name: str | None = None,
                 config: dict[str, Any] | None = None, entity: str | None = None) -> None:
        try:
            import wandb
        except ImportError:
            raise ImportError("config.wandb.project is set but wandb is not installed; pip install wandb "
                              "or unset config.wandb.project") from None
        dir = paths.as_path(dir)
        local = paths.local_cache(dir) if paths.is_url(dir) else Path(dir)
        local.mkdir(parents=True, exist_ok=True)
        id_file = dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        self.run = wandb.init(project=project, entity=entity, name=name, config=config, dir=str(local), id=run_id,
                              resume="allow")
        id_file.write_text(run_id)
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def write(self, record: dict[str, Any]) -> None:
        values = {k: v for k, v in scalars(record).items() if math.isfinite(v)}
        if values:
            self.run.log({"step": int(record["step"]), **values})

    def write_many(self, records: Iterable[dict[str, Any]]) -> None:
        for r in records:
            self.write(r)

    def close(self) -> None:
        self.run.finish()


class Writers:
    """Several writers as one. `write` hands the record at once to every writer not marked `batched`, and keeps
    it (in order) for the batched ones, which get the kept records together (`write_many` where a writer has
    it) when `every` are kept, when the oldest has waited `max_delay_s` (checked at the next `write`), at
    `flush()` and at `close()`; every=1 hands each record at once to all. A writer's error (a full disk) is
    raised by the write or flush that hands it the record or batch, after the other writers got theirs; a
    batch then counts as handed out, so `close` does not write it a second time."""

    EVERY = 64  # records per batch: about 4 s of nanoGPT's CPU recipe at log_interval=1
    MAX_DELAY_S = 5.0

    def __init__(self, writers: Iterable[Any], every: int = EVERY, max_delay_s: float = MAX_DELAY_S) -> None:
        self.writers = list(writers)
        self.every, self.max_delay_s = max(1, int(every)), float(max_delay_s)
        self.now = [w for w in self.writers if not getattr(w, "batched", False)]
        self.batched = [w for w in self.writers if getattr(w, "batched", False)]
        self.kept: list[dict[str, Any]] = []
        self.first_kept = 0.0  # time.monotonic() of the oldest kept record

    def write(self, record: dict[str, Any]) -> None:
        errors = _each(self.now, lambda w: w.write(record))
        if self.batched:
            if not self.kept:
                self.first_kept = time.monotonic()
            self.kept.append(record)
            if len(self.kept) >= self.every or time.monotonic() - self.first_kept >= self.max_delay_s:
                errors += _each([self], Writers.flush)
        if errors:
            raise errors[0]

    def flush(self) -> None:
        """Hand every kept record to every batched writer, in order."""
        batch, self.kept = self.kept, []
        if not batch:
            return
        errors = _each(self.batched, lambda w: w.write_many(batch) if hasattr(w, "write_many")
                       else [w.write(r) for r in batch])
        if errors:
            raise errors[0]

    def close(self) -> None:
        """Flush, then close every writer (each one even when the flush or another close fails)."""
        errors = _each([self], Writers.flush) + _each(self.writers, lambda w: w.close())
        if errors:
            raise errors[0]


def _each(items: list[Any], fn: Any) -> list[Exception]:
    """fn(item) for every item; the errors, in order (so one failing writer does not starve the others)."""
    errors = []
    for item in items:
        try:
            fn(item)
        except Exception as e:  # noqa: BLE001 - raised by the caller after the others had their turn
            errors.append(e)
    return errors


def from_config(config: Any, workdir: str | os.PathLike) -> Writers:
    """The writers a training config asks for: TensorBoard unless `config.tensorboard` is False, W&B when
    `config.wandb.project` is set (also `wandb.entity`, `wandb.name`). Reads the fields defensively, so configs
    without them get TensorBoard only."""
    wd = Workdir(workdir)
    out = []
    if getattr(config, "tensorboard", True):
        out.append(TensorBoardWriter(wd.tensorboard))
    wb = getattr(config, "wandb", None)
    project = getattr(wb, "project", None) if wb is not None else None
    if project:
        cfg = config.to_dict() if hasattr(config, "to_dict") else None
        out.append(WandbWriter(project, wd.root, name=getattr(wb, "name", None) or wd.root.name, config=cfg,
                               entity=getattr(wb, "entity", None) or None))
    return Writers(out)
