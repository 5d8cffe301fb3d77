"""Train / val loss curves of a training workdir as a PNG: `python -m jaxgpt.plot WORKDIR [--out FILE]`."""

from __future__ import annotations

import argparse
import os
from typing import Any

from jaxgpt.io import atomic, paths
from jaxgpt.io.workdir import Workdir
from jaxgpt.train.metrics import read_metrics


def plot_metrics(workdir: str | os.PathLike, out: str | os.PathLike | None = None) -> Any:
    """Draw train loss (per logged step) and eval train/val loss from workdir/metrics.jsonl into loss.png (a local
    folder or a bucket: the metrics are read and the PNG written through `jaxgpt.io.paths`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wd = Workdir(workdir)
    if not wd.metrics.is_file() and not (wd.in_bucket and wd.metrics_parts.is_dir()):
        raise FileNotFoundError(f"{wd.metrics} does not exist; pass a training workdir")
    records = read_metrics(wd.metrics)
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    if train:
        ax.plot(*zip(*train), lw=0.8, alpha=0.6, label="train (step)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["train_loss"] for r in evals], "o-", ms=3, label="train (eval)")
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", ms=3, label="val (eval)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(wd.root.name)
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend()
    fig.tight_layout()
    path = paths.as_path(out) if out else wd.plot
    with atomic.file(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Redraw the loss curves of a training workdir.")
    p.add_argument("workdir", help="a training workdir: a local folder or a gs:// URL")
    p.add_argument("--out", default=None, help="PNG path or gs:// URL (default: WORKDIR/loss.png)")
    a = p.parse_args(argv)
    print(plot_metrics(a.workdir, a.out))


if __name__ == "__main__":
    main()
