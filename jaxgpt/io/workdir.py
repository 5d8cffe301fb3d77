"""A training run's directory: every file of a run named once (`Workdir`), and a model read back from a run or
from Hugging Face (`load_model`).

The root is a local path or a bucket URL (gs://bucket/run; also s3://, az://), and every file it names is an
`etils.epath.Path` (`jaxgpt.io.paths`): code reads and writes them with the same calls wherever they live, and a
local workdir holds exactly the files it always did.

  config.json        the model's GPTConfig (so a run restores without knowing its training config)
  tokenizer.json     tokenizer meta (`jaxgpt.data.tokenizer.from_meta`)
  train_config.json  the full training config
  lora_run.json      LoRA settings and base of a LoRA run (its checkpoints hold the adapters only)
  checkpoints/<step>/{params, optimizer, meta}   orbax CheckpointManager (last k + best by val loss)
  metrics.jsonl      one JSON object per log / eval / event line (appended; in a bucket, which cannot append,
                     metrics.jsonl.parts/ holds one object per flush of the log instead: `read_metrics` reads both)
  tensorboard/       TensorBoard event files
  loss.png           the loss curves (`python -m jaxgpt.plot`)
  sample.txt         the sample drawn at the end of a run
  lora/, hf/         a LoRA run's adapters and its merged Hugging Face export
  profile/           jax.profiler traces (config.profile_steps)
  data/              the prepared dataset when config.data.dir is empty (memory-mapped, so always on a local
                     disk: for a bucket workdir a folder of this machine, `paths.local_cache`)
  .lock, .lock.guard held by the run using the workdir (`jaxgpt.io.lock`; a bucket's lock is the .lock object
                     alone, guarded by generation preconditions)

Nothing else builds a path inside a workdir: code that reads or writes a run's file asks its `Workdir`.

In a bucket, every object is written whole in one request, so each file above is complete or absent, as the
atomic renames make it on a disk; orbax commits a checkpoint step once all of its objects are written.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import TYPE_CHECKING, Any

from jaxgpt.io import atomic, paths
from jaxgpt.nn.config import GPTConfig

if TYPE_CHECKING:
    from etils.epath import Path as EPath

Params = Any


@dataclasses.dataclass(frozen=True)
class Workdir:
    """The files of one training run under `root`."""

    root: EPath  # a local folder or a bucket URL (given as a str or os.PathLike)

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", paths.as_path(self.root))

    @property
    def in_bucket(self) -> bool:
        """True for a bucket URL (gs://...), False for a local folder."""
        return paths.is_url(self.root)

    def create(self) -> None:
        """Make the root folder (a bucket needs none: an object's name is its whole path; the bucket itself
        must exist, and the lock's first write says so when it does not)."""
        if not self.in_bucket:
            self.root.mkdir(parents=True, exist_ok=True)

    # the files, each named once
    @property
    def model_config(self) -> EPath:
        return self.root / "config.json"

    @property
    def tokenizer(self) -> EPath:
        return self.root / "tokenizer.json"

    @property
    def train_config(self) -> EPath:
        return self.root / "train_config.json"

    @property
    def lora_run(self) -> EPath:
        return self.root / "lora_run.json"

    @property
    def checkpoints(self) -> EPath:
        return self.root / "checkpoints"

    def checkpoint(self, step: int) -> EPath:
        return self.checkpoints / str(step)

    @property
    def metrics(self) -> EPath:
        return self.root / "metrics.jsonl"

    @property
    def metrics_parts(self) -> EPath:
        """metrics.jsonl's records in a bucket: one object per flush (`jaxgpt.train.metrics.MetricsLog`)."""
        return paths.parts_of(self.metrics)

    @property
    def tensorboard(self) -> EPath:
        return self.root / "tensorboard"

    @property
    def plot(self) -> EPath:
        return self.root / "loss.png"

    @property
    def sample(self) -> EPath:
        return self.root / "sample.txt"

    @property
    def adapters(self) -> EPath:
        return self.root / "lora"

    @property
    def hf_export(self) -> EPath:
        return self.root / "hf"

    @property
    def profile(self) -> EPath:
        return self.root / "profile"

    @property
    def data(self) -> EPath:
        """The prepared dataset, memory-mapped: under a bucket workdir, this machine's `paths.local_cache`."""
        if self.in_bucket:
            return paths.as_path(paths.local_cache(self.root) / "data")
        return self.root / "data"

    @property
    def lock(self) -> EPath:
        return self.root / ".lock"

    @property
    def lock_guard(self) -> EPath:
        return self.root / ".lock.guard"

    def __str__(self) -> str:
        return str(self.root)

    # the run's identity
    def is_lora_run(self) -> bool:
        return self.lora_run.is_file()

    def read_model_config(self) -> dict[str, Any] | None:
        """The saved GPTConfig fields, or None before the first write."""
        return json.loads(self.model_config.read_text()) if self.model_config.is_file() else None

    def read_lora_run(self) -> dict[str, Any] | None:
        return json.loads(self.lora_run.read_text()) if self.lora_run.is_file() else None

    def write_identity(self, model_cfg: GPTConfig, tok_meta: dict[str, Any], train_cfg_json: dict[str, Any],
                       lora_run: dict[str, Any] | None) -> None:
        """What makes the workdir resumable and loadable without its training config (each file atomic)."""
        atomic.write_json(self.model_config, model_cfg.to_dict())
        atomic.write_json(self.tokenizer, tok_meta)
        atomic.write_json(self.train_config, train_cfg_json)
        if lora_run is not None:
            atomic.write_json(self.lora_run, lora_run)

    # the run read back
    def load(self, which: str | int = "latest") -> tuple[GPTConfig, Params, dict[str, Any]]:
        """(model_cfg, params, tokenizer meta) of a checkpoint: which = "latest" | "best" | a step number."""
        import jax

        from jaxgpt.io import checkpoint
        from jaxgpt.nn.model import init_params

        for f in (self.model_config, self.tokenizer):
            if not f.is_file():
                raise FileNotFoundError(f"{f} does not exist; {self.root} is not a jaxgpt training workdir "
                                        "(train.py --workdir)")
        try:
            model_cfg = GPTConfig.from_dict(json.loads(self.model_config.read_text()))
            tok_meta = json.loads(self.tokenizer.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.root}: config.json or tokenizer.json is not valid JSON ({e}); the run is "
                             "damaged") from e
        if not self.checkpoints.is_dir():
            raise FileNotFoundError(f"{self.checkpoints} does not exist; train first or pick another run")
        mngr = checkpoint.run_checkpoint_manager(self.checkpoints, read_only=True)
        try:
            step = _pick_step(mngr, self, which)
            restored = checkpoint.restore_run_step(mngr, step, params=jax.eval_shape(lambda: init_params(model_cfg, 0)))
        finally:
            mngr.close()
        return model_cfg, jax.tree.map(jax.numpy.asarray, restored["params"]), tok_meta


def _pick_step(mngr: Any, wd: Workdir, which: str | int) -> int:
    from jaxgpt.io import checkpoint

    steps = sorted(mngr.all_steps())
    checkpoint.check_run_checkpoints(wd.checkpoints, steps)
    if not steps:
        raise FileNotFoundError(f"{wd.checkpoints} holds no complete checkpoint; train first or pick another run")
    if which == "latest":
        return steps[-1]
    if which == "best":
        best = checkpoint.run_best_step(mngr)
        return steps[-1] if best is None else best
    if int(which) not in steps:
        raise ValueError(f"step {int(which)} is not among the checkpoints of {wd.root}: {steps}")
    return int(which)


# ---------------------------------------------------------------------------------------------------------
# A model for sampling and evaluation: a training workdir or a Hugging Face GPT-2


def is_hf_dir(path: EPath) -> bool:
    """config.json beside model.safetensors or a sharded checkpoint's model.safetensors.index.json."""
    weights = (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    return (path / "config.json").is_file() and weights


def load_model(init_from: str | os.PathLike, bpe_file: str | None = None) -> tuple[GPTConfig, Params, Any]:
    """(model_cfg, params, tokenizer) from a Hugging Face directory (GPT-2, or Llama / Qwen2 / Qwen3 with its
    tokenizer.json), a Hub name of either (downloaded), or a jaxgpt training workdir."""
    from jaxgpt.data.tokenizer import from_meta, gpt2_tokenizer, hf_tokenizer
    from jaxgpt.io import hf, hf_families

    path = paths.as_path(init_from)
    wd = Workdir(path)
    if wd.is_lora_run() and not is_hf_dir(path):
        raise ValueError(f"{path} is a LoRA run (its checkpoints hold adapters only); pass its merged export "
                         f"--init-from {wd.hf_export}, or the base with --adapters {wd.adapters}")
    if path.is_dir() and not is_hf_dir(path):
        model_cfg, params, meta = wd.load()
        return model_cfg, params, from_meta(meta, bpe_file)
    folder = hf.model_dir(init_from)  # a Hub name is downloaded here, once
    model_cfg, params = hf.load_hf(folder)
    return model_cfg, params, hf_tokenizer(folder) if hf_families.is_family_dir(folder) else gpt2_tokenizer(bpe_file)


def transform_params(params: Params, adapters: str | None, quantize: str) -> Params:
    """Base params -> merged with LoRA adapters (if any) -> quantized (if asked: "none", "int8", "int4")."""
    if adapters:
        from jaxgpt import lora

        ad, lcfg = lora.load_adapters(adapters, params)
        params = lora.merge(params, ad, lcfg)
    if quantize != "none":
        from jaxgpt.quantize import QuantConfig
        from jaxgpt.quantize import quantize as quantize_params

        # the embeddings too: the tied head reads all of wte every token, the largest matrix at GPT-2 sizes
        qcfg = (QuantConfig(bits=8, embeddings=True, lm_head=True) if quantize == "int8" else
                QuantConfig(bits=4, granularity="group", group_size=128, embeddings=True, lm_head=True))
        params = quantize_params(params, qcfg)
    return params
