"""Shared pieces of the design-choice studies: data, one training run, measurements, JSON and figures.

Training goes through `jaxgpt.train.trainer.train` (its optimizer, schedule, jitted step, evaluation, metrics
JSONL and checkpoints); `train_run` is the one place that turns a study's `RunSpec` into a training config
and reads the run back (loss curve, evaluations, divergence, final params). Runs that diverge are results,
not errors: training stops at the first non-finite step and `train_run` records where.

Every run lives in workdirs/experiments/runs/<key>/ (metrics.jsonl, loss.png, the final checkpoint), where
<key> is a hash of its full training config: a run two studies share (e.g. the tied char model of the
tying study is the learned-positions model of the positions study) is trained once, and a finished run is
reused, so a study can be re-plotted without training again; an interrupted run (Ctrl-C: training saves a
checkpoint) resumes where it stopped. `fresh=True` (the studies' --fresh flag) trains every run again.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxgpt import data as data_lib
from jaxgpt.io.workdir import Workdir
from jaxgpt.nn.config import GPTConfig
from jaxgpt.nn.model import GPT
from jaxgpt.train import config as train_config
from jaxgpt.train import metrics, steps, trainer

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHAKESPEARE = SHARED / "data" / "tinyshakespeare.txt"
GPT2_BPE = SHARED / "data" / "gpt2.tiktoken"
FIGURES = REPO / "docs" / "figures"
WORKDIRS = REPO / "workdirs" / "experiments"
RUNS = WORKDIRS / "runs"


# ---------------------------------------------------------------------------------------------------------
# Data


def char_data(data_dir: str | os.PathLike | None = None, text: str | os.PathLike = SHAKESPEARE) -> Path:
    """A prepared char-level dataset of `text` (train.bin / val.bin / meta.json), tokenized on first use."""
    d = Path(data_dir) if data_dir else WORKDIRS / "data" / "shakespeare_char"
    if not (d / "meta.json").is_file():
        if not Path(text).is_file():
            raise FileNotFoundError(f"{text} does not exist; the studies read Tiny Shakespeare from "
                                    f"{SHAKESPEARE} (the shared data folder beside the repository)")
        try:
            data_lib.prepare(d, dataset="text", tokenizer="char", input_path=text)
        except FileExistsError:  # prepared meanwhile by another study running at the same time
            pass
    return d


def bpe_data(data_dir: str | os.PathLike | None = None, text: str | os.PathLike = SHAKESPEARE,
             bpe_path: str | os.PathLike = GPT2_BPE) -> Path:
    """A prepared GPT-2 BPE dataset of `text` (offline ranks file from the shared folder), tokenized on first use."""
    d = Path(data_dir) if data_dir else WORKDIRS / "data" / "shakespeare_gpt2"
    if not (d / "meta.json").is_file():
        for f in (text, bpe_path):
            if not Path(f).is_file():
                raise FileNotFoundError(f"{f} does not exist; it belongs in the shared data folder {SHARED / 'data'}")
        try:
            data_lib.prepare(d, dataset="text", tokenizer="gpt2", input_path=text, bpe_path=bpe_path)
        except FileExistsError:
            pass
    return d


def unigram_entropy(data_dir: str | os.PathLike, split: str = "train") -> float:
    """Entropy (nats/token) of the token frequencies of a split: the loss of a model that ignores the context.

    A run that ends at this loss has learned the character frequencies and nothing else (stalled).
    """
    ids = data_lib.load_split(data_dir, split, 1)
    p = np.bincount(np.asarray(ids)).astype(np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum())


def val_windows(data_dir: str | os.PathLike, length: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n fixed random windows of the validation split: inputs x [n, length] and targets y [n, length]."""
    val = data_lib.load_split(data_dir, "val", length)
    return data_lib.get_batch(val, n, length, data_lib.batch_rng(seed, 0, "val", stream=7))


# ---------------------------------------------------------------------------------------------------------
# One training run through jaxgpt.train.trainer


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training run: the model switches plus the optimisation settings a study varies.

    `model` holds GPTConfig fields (vocab_size comes from the data). warmup_iters=0 turns warm-up off; the
    learning rate then starts at its peak and follows the cosine to min_lr at `steps`.
    """

    name: str
    model: dict[str, Any]
    steps: int = 250
    batch_size: int = 16
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 25
    grad_clip: float = 1.0
    weight_decay: float = 0.1
    eval_interval: int = 0  # 0: evaluate once, at the end
    eval_iters: int = 10
    seed: int = 1337
    train: dict[str, Any] = dataclasses.field(default_factory=dict)  # other training-config keys (e.g. optimizer)


def training_config(spec: RunSpec, data_dir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The training config for a RunSpec: its defaults plus the spec; no sample, one checkpoint at the end."""
    c = train_config.base_config()
    for k, v in spec.model.items():
        if k not in c.model:
            raise ValueError(f"RunSpec {spec.name!r}: unknown model field {k!r}; use GPTConfig fields")
        c.model[k] = v
    c.model.vocab_size = 0  # from the data
    c.data.dir = str(data_dir)
    c.seed = spec.seed
    c.batch_size = spec.batch_size
    c.max_iters = spec.steps
    c.learning_rate = spec.learning_rate
    c.min_lr = spec.min_lr
    c.warmup_iters = spec.warmup_iters
    c.lr_decay_iters = spec.steps
    c.grad_clip = spec.grad_clip
    c.weight_decay = spec.weight_decay
    c.eval_interval = spec.eval_interval or spec.steps
    c.eval_iters = spec.eval_iters
    c.log_interval = 1  # every step's loss: the curves are the result
    c.ckpt_interval = spec.steps
    c.keep_checkpoints = 1
    c.keep_best = False
    c.sample_tokens = 0
    for k, v in spec.train.items():
        if k not in c or isinstance(c[k], ml_collections.ConfigDict):
            raise ValueError(f"RunSpec {spec.name!r}: {k!r} is not a training-config key; see jaxgpt/train/config.py")
        c[k] = v
    return c


@dataclasses.dataclass
class RunResult:
    """What a study reads back from one run."""

    name: str
    config: GPTConfig
    steps: list[int]  # every trained step
    loss: list[float]  # train loss per step (the micro-batch the step trained on)
    grad_norm: list[float]
    lr: list[float]
    evals: list[dict[str, float]]  # {"step", "train_loss", "val_loss"}
    non_finite_step: int | None  # first step whose loss / gradient / update was not finite
    wall_s: float
    workdir: Path

    @property
    def val_loss(self) -> float:
        """Val loss of the last evaluation (nan when the run diverged before it)."""
        return float(self.evals[-1]["val_loss"]) if self.evals else float("nan")

    def final_loss(self, frac: float = 0.1) -> float:
        """Mean train loss over the last `frac` of the logged steps (inf when the run went non-finite)."""
        if self.non_finite_step is not None or not self.loss:
            return float("inf")
        k = max(1, int(len(self.loss) * frac))
        return float(np.mean(self.loss[-k:]))

    def diverged(self, threshold: float) -> bool:
        """Non-finite at some step, or ending above `threshold` (studies use ln V: worse than a uniform guess)."""
        return self.non_finite_step is not None or not self.final_loss() <= threshold

    def outcome(self, threshold: float, unigram: float, margin: float = 0.05) -> str:
        """"diverged" (see `diverged`), "stalled" (ends within `margin` of the unigram entropy or above: it has
        learned token frequencies only) or "trained"."""
        if self.diverged(threshold):
            return "diverged"
        return "stalled" if self.final_loss() > unigram - margin else "trained"

    def params(self) -> Any:
        """The final params, restored from the run's checkpoint."""
        return Workdir(self.workdir).load("latest")[1]

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "final_train_loss": _num(self.final_loss()), "val_loss": _num(self.val_loss),
                "non_finite_step": self.non_finite_step, "wall_s": round(self.wall_s, 2),
                "workdir": str(self.workdir)}


def _num(x: float) -> float | None:
    """JSON has no inf / nan: None stands for them."""
    return float(x) if math.isfinite(x) else None


def _config_key(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The training config as plain JSON, without the display-only settings."""
    d = json.loads(config.to_json_best_effort())
    d.pop("progress", None)
    return d


def run_dir(spec: RunSpec, data_dir: str | os.PathLike, root: str | os.PathLike = RUNS) -> Path:
    """root/<12 hex digits of the hash of the run's full training config>."""
    key = json.dumps(_config_key(training_config(spec, data_dir)), sort_keys=True)
    return Path(root) / hashlib.sha256(key.encode()).hexdigest()[:12]


def _same_config(wd: Path, config: ml_collections.ConfigDict) -> bool:
    """True when wd holds a run (finished or not) of exactly this training config."""
    f = wd / "train_config.json"
    if not f.is_file():
        return False
    saved = json.loads(f.read_text())
    saved.pop("progress", None)
    return saved == _config_key(config)


def _finished(wd: Path, config: ml_collections.ConfigDict, steps: int) -> bool:
    """True when wd holds a complete run of exactly this config (ended at `steps` or by going non-finite)."""
    if not (wd / "run.json").is_file() or not _same_config(wd, config):
        return False
    records = metrics.read_metrics(wd / "metrics.jsonl")
    if any(r.get("event") == "non-finite" for r in records):
        return True
    return any(r.get("kind") == "eval" and r["step"] == steps for r in records)


def train_run(spec: RunSpec, data_dir: str | os.PathLike, root: str | os.PathLike = RUNS, *,
              fresh: bool = False, progress: bool = True) -> RunResult:
    """Train one run with jaxgpt.train.trainer in root/<key> (or reuse the finished one there) and read back its metrics."""
    wd = run_dir(spec, data_dir, root)
    config = training_config(spec, data_dir)
    config.progress = progress
    t0 = time.perf_counter()
    if fresh or not _finished(wd, config, spec.steps):
        if wd.exists() and (fresh or not _same_config(wd, config)):  # stale: start again
            shutil.rmtree(wd)
        (wd / "run.json").unlink(missing_ok=True)  # an unfinished run of this config resumes from its checkpoint
        try:
            summary = trainer.train(config, wd)
        except FloatingPointError:
            summary = {}  # diverged: metrics.jsonl names the step, the curve up to it is kept
        if summary.get("interrupted"):
            raise KeyboardInterrupt(f"run {spec.name} stopped by {summary['interrupted']}; run the study again to "
                                    f"resume it from {wd}")
        (wd / "run.json").write_text(json.dumps({"name": spec.name, "wall_s": time.perf_counter() - t0}))
    wall = json.loads((wd / "run.json").read_text())["wall_s"] if (wd / "run.json").is_file() else 0.0
    records = metrics.read_metrics(wd / "metrics.jsonl")
    train = [r for r in records if r.get("kind") == "train"]
    bad = [int(r["step"]) for r in records if r.get("event") == "non-finite"]
    cfg = GPTConfig.from_dict(json.loads((wd / "config.json").read_text()))
    return RunResult(
        name=spec.name, config=cfg, steps=[int(r["step"]) for r in train], loss=[float(r["loss"]) for r in train],
        grad_norm=[float(r["grad_norm"]) for r in train], lr=[float(r["lr"] or 0.0) for r in train],
        evals=[{"step": r["step"], "train_loss": r["train_loss"], "val_loss": r["val_loss"]}
               for r in records if r.get("kind") == "eval"],
        non_finite_step=min(bad) if bad else None, wall_s=wall, workdir=wd)


# ---------------------------------------------------------------------------------------------------------
# Measurements


def layer_grad_norms(cfg: GPTConfig, params: Any, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """L2 norm of the loss gradient per block h_0 ... h_{L-1} (and of the embedding) on one batch x, y [B, T].

    This is Xiong et al. (2020)'s measurement: at initialisation Post-LN's gradients grow towards the output
    layers, Pre-LN's do not.
    """
    loss_fn = steps.make_loss_fn(cfg)
    loss, grads = jax.jit(jax.value_and_grad(loss_fn), static_argnums=5)(
        params, None, jnp.asarray(x), jnp.asarray(y), jax.random.PRNGKey(0), True)
    blocks = [float(optax.tree.norm(grads[f"h_{i}"])) for i in range(cfg.n_layer)]
    return {"loss": float(loss), "blocks": blocks, "wte": float(optax.tree.norm(grads["wte"]))}


def loss_per_position(cfg: GPTConfig, params: Any, x: np.ndarray, y: np.ndarray, batch: int = 16) -> np.ndarray:
    """Mean next-token cross entropy at each position over windows x, y [N, T] -> [T] float64.

    T may exceed cfg.block_size for position schemes that have no table (sinusoidal, rope, none).
    """
    model = GPT(cfg)

    @jax.jit
    def ce(params: Any, xb: jax.Array, yb: jax.Array) -> jax.Array:
        logits = model.apply({"params": params}, xb)  # [b, T, V]
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(logp, yb[..., None], axis=-1)[..., 0]  # [b, T]

    rows = [np.asarray(ce(params, jnp.asarray(x[i:i + batch]), jnp.asarray(y[i:i + batch])), np.float64)
            for i in range(0, len(x), batch)]
    return np.concatenate(rows).mean(axis=0)


def smooth(values: Sequence[float], k: int) -> np.ndarray:
    """Trailing moving average over k points (shorter at the start); non-finite values stay non-finite."""
    v = np.asarray(values, np.float64)
    if k <= 1 or v.size == 0:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, v.size + 1)
    lo = np.maximum(0, idx - k)
    return (c[idx] - c[lo]) / (idx - lo)


# ---------------------------------------------------------------------------------------------------------
# Results on disk


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write JSON atomically (a temporary name, then a rename): an interrupted write never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike) -> Path:
    """Save a figure as PNG atomically and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    pyplot().close(fig)
    os.replace(tmp, path)
    return path


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (the studies print one per result)."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def study_args(description: str, full_help: str, argv: Sequence[str] | None = None,
               extra: Any = None) -> argparse.Namespace:
    """The flags every study takes: --full, --out, --workdir, --fresh, --quiet (plus `extra(parser)`)."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help=f"the bigger version for an accelerator: {full_help}")
    ap.add_argument("--out", default=str(FIGURES), help="folder for the JSON and PNG results (default docs/figures)")
    ap.add_argument("--workdir", default=None, help="folder for the training runs (default workdirs/experiments/runs)")
    ap.add_argument("--data-dir", default=None, help="prepared char dataset (default: tokenized from Tiny Shakespeare)")
    ap.add_argument("--fresh", action="store_true", help="train every run again instead of reusing finished ones")
    ap.add_argument("--quiet", action="store_true", help="no per-run progress bars")
    if extra is not None:
        extra(ap)
    return ap.parse_args(argv)
