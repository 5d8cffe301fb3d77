"""Metric writers beside `metrics.jsonl`: TensorBoard event files and Weights & Biases.

Each has the interface of the training loop's `MetricsLog`: `write(record)` with records such as
{"kind": "train", "step": 10, "loss": ..., "lr": ..., "grad_norm": ..., "tokens_per_s": ..., "mfu": ...} or
{"kind": "eval", "step": 10, "val_loss": ...}, and `close()`. Every numeric field of a "train" or "eval" record
becomes the scalar `KIND/FIELD` at that step; other records (events) and fields ("time", strings) are skipped.
TensorBoard goes through tensorboardX (NumPy + protobuf: no TensorFlow or PyTorch); wandb is imported only
when a project is set.
"""

from __future__ import annotations

import math
import os
import sys
import uuid
from pathlib import Path
from typing import Any, Iterable

SCALAR_KINDS = ("train", "eval")
SKIP_FIELDS = ("kind", "step", "time")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """{"train/loss": 2.5, ...}: the finite-or-not numeric fields of a train/eval record; {} for other records."""
    kind = record.get("kind")
    if kind not in SCALAR_KINDS or "step" not in record:
        return {}
    return {f"{kind}/{k}": float(v) for k, v in record.items()
            if k not in SKIP_FIELDS and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _summary_writer_class() -> type:
    """tensorboardX's SummaryWriter, imported without PyTorch: tensorboardX imports torch when it is installed,
    only to accept torch tensors (seconds of start-up per run); the values written here are Python floats."""
    hide_torch = "torch" not in sys.modules
    if hide_torch:
        sys.modules["torch"] = None  # `import torch` inside tensorboardX raises ImportError, which it expects
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise ImportError("TensorBoard logging needs tensorboardX; pip install tensorboardX "
                          "(or set config.tensorboard=False)") from None
    finally:
        if hide_torch:
            del sys.modules["torch"]
    return SummaryWriter


class TensorBoardWriter:
    """Scalars into TensorBoard event files in `logdir` (`tensorboard --logdir WORKDIR/tensorboard`)."""

    def __init__(self, logdir: str | os.PathLike) -> None:
        summary_writer = _summary_writer_class()
        Path(logdir).mkdir(parents=True, exist_ok=True)
        self.writer = summary_writer(logdir=str(logdir), flush_secs=30)

    def write(self, record: dict[str, Any]) -> None:
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=int(record["step"]))

    def close(self) -> None:
        self.writer.close()


class WandbWriter:
    """Scalars to a Weights & Biases run; `WANDB_MODE=offline` keeps them on disk under `dir`.

    The run id is kept in `dir/wandb_run_id`, so a resumed training run continues the same W&B run. Each
    record is logged with its own `step` field as the x axis (not W&B's internal counter, which must only grow:
    a resumed run logs the steps after its checkpoint again).
    """

    def __init__(self, project: str, dir: str | os.PathLike, name: str | None = None,
                 config: dict[str, Any] | None = None, entity: str | None = None) -> None:
        try:
            import wandb
        except ImportError:
            raise ImportError("config.wandb.project is set but wandb is not installed; pip install wandb "
                              "or unset config.wandb.project") from None
        dir = Path(dir)
        dir.mkdir(parents=True, exist_ok=True)
        id_file = dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        self.run = wandb.init(project=project, entity=entity, name=name, config=config, dir=str(dir), id=run_id,
                              resume="allow")
        id_file.write_text(run_id)
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def write(self, record: dict[str, Any]) -> None:
        values = {k: v for k, v in scalars(record).items() if math.isfinite(v)}
        if values:
            self.run.log({"step": int(record["step"]), **values})

    def close(self) -> None:
        self.run.finish()


class Writers:
    """Several writers as one: `write` and `close` go to each."""

    def __init__(self, writers: Iterable[Any]) -> None:
        self.writers = list(writers)

    def write(self, record: dict[str, Any]) -> None:
        for w in self.writers:
            w.write(record)

    def close(self) -> None:
        for w in self.writers:
            w.close()


def from_config(config: Any, workdir: str | os.PathLike) -> Writers:
    """The writers a training config asks for: TensorBoard unless `config.tensorboard` is False, W&B when
    `config.wandb.project` is set (also `wandb.entity`, `wandb.name`). Reads the fields defensively, so configs
    without them get TensorBoard only."""
    workdir = Path(workdir)
    out = []
    if getattr(config, "tensorboard", True):
        out.append(TensorBoardWriter(workdir / "tensorboard"))
    wb = getattr(config, "wandb", None)
    project = getattr(wb, "project", None) if wb is not None else None
    if project:
        cfg = config.to_dict() if hasattr(config, "to_dict") else None
        out.append(WandbWriter(project, workdir, name=getattr(wb, "name", None) or workdir.name, config=cfg,
                               entity=getattr(wb, "entity", None) or None))
    return Writers(out)
