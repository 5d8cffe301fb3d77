"""Checkpoints on disk: plain orbax pytree save/restore (params, adapters, quantized params) and a
training run's orbax CheckpointManager, with `load_run` for sampling and fine-tuning."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxgpt.nn.config import GPTConfig

# ---------------------------------------------------------------------------------------------------------
# Plain orbax save / restore of a pytree (params, adapters, quantized params)


def save_pytree(path: str | os.PathLike, tree: Any, *, force: bool = False) -> Path:
    """Save a pytree with orbax (atomic: written to a temporary folder, then renamed)."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if path.exists() and not force:
        raise FileExistsError(f"{path} already exists; pick a new path or pass force=True to replace it")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, tree, force=force)
        ckptr.wait_until_finished()
    return path


def restore_pytree(path: str | os.PathLike, target: Any | None = None) -> Any:
    """Restore a pytree saved by `save_pytree`; `target` (arrays or ShapeDtypeStructs) fixes structure and dtypes."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist; check the path")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            if target is None:
                return ckptr.restore(path)
            abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), target)
            return ckptr.restore(path, abstract)
    except (FileNotFoundError, ValueError, KeyError, OSError) as e:
        raise ValueError(f"checkpoint {path} is corrupt or does not match the expected structure ({e})") from e


def pytree_bytes_on_disk(path: str | os.PathLike) -> int:
    """Total size in bytes of the files under a checkpoint folder."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# ---------------------------------------------------------------------------------------------------------
# Training runs: an orbax CheckpointManager in a workdir, and `load_run` for sampling / fine-tuning
#
# A workdir holds config.json (GPTConfig), tokenizer.json (tokenizer meta) and checkpoints/<step>/ with three
# items: params (trainable params), optimizer ({"step", "opt_state"}) and meta (JSON). orbax writes each step
# into a temporary folder and renames it when complete, so a killed save never replaces a complete step.

RUN_CKPT_DIR = "checkpoints"
RUN_ITEMS = ("params", "optimizer", "meta")
ORBAX_TMP_MARKER = ".orbax-checkpoint-tmp"


def run_checkpoint_manager(workdir: str | os.PathLike, keep: int = 3, keep_best: bool = True,
                           async_save: bool = False, read_only: bool = False):
    """orbax CheckpointManager over workdir/checkpoints keeping the last `keep` steps plus the best val_loss."""
    import orbax.checkpoint as ocp
    from orbax.checkpoint import checkpoint_managers as cm

    policies = [cm.LatestN(n=max(1, int(keep)))]
    if keep_best:
        # BestN sorts by the metric and keeps the tail: reverse=True puts the lowest val_loss last
        policies.append(cm.BestN(get_metric_fn=lambda m: m["val_loss"], reverse=True, n=1,
                                 keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=cm.AnyPreservationPolicy(policies), enable_async_checkpointing=async_save,
        # orbax writes a step's metrics to disk only when best_fn is set (deletion follows the policy above)
        best_fn=lambda m: m["val_loss"], best_mode="min",
        create=not read_only, read_only=read_only,
        cleanup_tmp_directories=not read_only)  # leftovers of a killed save are incomplete by definition
    return ocp.CheckpointManager(Path(workdir).absolute() / RUN_CKPT_DIR, item_names=RUN_ITEMS, options=options)


def run_best_step(mngr) -> int | None:
    """The kept step with the lowest val_loss (None when no checkpoint carries one)."""
    scored = []
    for s in mngr.all_steps():
        m = mngr.metrics(s)
        if m and "val_loss" in m:
            scored.append((float(m["val_loss"]), s))
    return min(scored)[1] if scored else None


def check_run_checkpoints(workdir: str | os.PathLike, steps: list[int]) -> None:
    """Refuse a checkpoint folder holding entries orbax does not list (a damaged step): never start over it."""
    d = Path(workdir) / RUN_CKPT_DIR
    if not d.is_dir():
        return
    known = {str(s) for s in steps}
    strange = sorted(p.name for p in d.iterdir()
                     if ORBAX_TMP_MARKER not in p.name and p.name not in known and not p.name.startswith("."))
    if strange:
        raise ValueError(f"{d} holds {strange}, which are not complete orbax checkpoints; move them aside "
                         "(or use a new --workdir) and run again")


def _run_abstract(tree: Any) -> Any:
    """ShapeDtypeStructs of a tree of arrays (or of ShapeDtypeStructs), keeping their shardings: orbax restores
    onto them, resharding a checkpoint saved on another mesh. Leaves without one go to this process's first
    device (the saved shardings may name devices this process does not have)."""
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)
                                                       or one), tree)


def restore_run_step(mngr, step: int, *, params: Any, optimizer: Any | None = None) -> dict[str, Any]:
    """Restore one step into the structure of `params` (and `optimizer`); a clear ValueError when it cannot.

    Returns {"params", "meta"} and "optimizer" when a target for it is given.
    """
    import orbax.checkpoint as ocp

    where = Path(mngr.directory) / str(step)
    items = {"params": ocp.args.StandardRestore(_run_abstract(params)), "meta": ocp.args.JsonRestore()}
    if optimizer is not None:
        items["optimizer"] = ocp.args.StandardRestore(_run_abstract(optimizer))
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(**items))
        got = jax.tree.map(lambda x: (tuple(np.shape(x)), str(x.dtype)), restored["params"])
    except Exception as e:  # noqa: BLE001 - orbax / tensorstore raise many types for the same problem
        first = (str(e).splitlines() or [""])[0][:300]
        raise ValueError(
            f"checkpoint {where} cannot be restored ({type(e).__name__}: {first}); it is corrupt or from an "
            "incompatible run: move that step folder aside to resume from an earlier one, or use a new --workdir"
        ) from e
    want = jax.tree.map(lambda x: (tuple(np.shape(x)), str(x.dtype)), params)
    if got != want:
        raise ValueError(f"checkpoint {where} holds params of another shape or dtype than this model; "
                         "use the run's own config or a new --workdir")
    return {k: restored[k] for k in items}


def save_run_step(mngr, step: int, *, params: Any, optimizer: Any, meta: dict[str, Any],
                  val_loss: float | None = None) -> None:
    """Save one step of a training run (params, optimizer state, JSON meta); `val_loss` ranks it for keep_best."""
    import orbax.checkpoint as ocp

    mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                            optimizer=ocp.args.StandardSave(optimizer),
                                            meta=ocp.args.JsonSave(meta)),
              metrics={"val_loss": val_loss} if val_loss is not None else None, force=True)


def load_run(workdir: str | os.PathLike, which: str | int = "latest") -> tuple[GPTConfig, Any, dict[str, Any]]:
    """(GPTConfig, params, tokenizer meta) of a jaxgpt training workdir; which = "latest" | "best" | a step.

    The tokenizer meta is what `jaxgpt.data.tokenizer.from_meta` takes.
    """
    from jaxgpt.nn.model import init_params

    wd = Path(workdir)
    cfg_file, tok_file = wd / "config.json", wd / "tokenizer.json"
    for f in (cfg_file, tok_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f} does not exist; {wd} is not a jaxgpt training workdir (train.py --workdir)")
    try:
        config = GPTConfig.from_dict(json.loads(cfg_file.read_text()))
        tok_meta = json.loads(tok_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{wd}: config.json or tokenizer.json is not valid JSON ({e}); the run is damaged") from e
    if not (wd / RUN_CKPT_DIR).is_dir():
        raise FileNotFoundError(f"{wd / RUN_CKPT_DIR} does not exist; train first or pick another run")
    mngr = run_checkpoint_manager(wd, read_only=True)
    try:
        steps = sorted(mngr.all_steps())
        check_run_checkpoints(wd, steps)
        if not steps:
            raise FileNotFoundError(f"{wd / RUN_CKPT_DIR} holds no complete checkpoint; train first or pick another run")
        if which == "latest":
            step = steps[-1]
        elif which == "best":
            best = run_best_step(mngr)
            step = steps[-1] if best is None else best
        else:
            step = int(which)
            if step not in steps:
                raise ValueError(f"step {step} is not among the checkpoints of {wd}: {steps}")
        target = jax.eval_shape(lambda: init_params(config, 0))
        restored = restore_run_step(mngr, step, params=target)
    finally:
        mngr.close()
    return config, jax.tree.map(jax.numpy.asarray, restored["params"]), tok_meta
