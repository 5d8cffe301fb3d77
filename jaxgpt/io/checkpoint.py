"""Checkpoints on disk or in a bucket: plain orbax pytree save/restore (params, adapters, quantized params) and a
training run's orbax CheckpointManager (read back by `jaxgpt.io.workdir.Workdir.load`). Paths are
`jaxgpt.io.paths.as_path` paths, so gs:// URLs work wherever a local folder does."""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from jaxgpt.io import paths

# ---------------------------------------------------------------------------------------------------------
# Plain orbax save / restore of a pytree (params, adapters, quantized params)


def save_pytree(path: str | os.PathLike, tree: Any, *, force: bool = False) -> Any:
    """Save a pytree with orbax (atomic: written to a temporary folder, then renamed)."""
    import orbax.checkpoint as ocp

    path = paths.absolute(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} already exists; pick a new path or pass force=True to replace it")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, tree, force=force)
        ckptr.wait_until_finished()
    return path


def restore_pytree(path: str | os.PathLike, target: Any | None = None) -> Any:
    """Restore a pytree saved by `save_pytree`; `target` (arrays or ShapeDtypeStructs) fixes structure and dtypes."""
    import orbax.checkpoint as ocp

    path = paths.absolute(path)
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
    return sum(f.stat().length for f in paths.files_under(paths.as_path(path)))


# ---------------------------------------------------------------------------------------------------------
# Training runs: an orbax CheckpointManager over a workdir's checkpoints/ (`jaxgpt.io.workdir.Workdir` names it)
#
# Each checkpoints/<step>/ holds three items: params (trainable params), optimizer ({"step", "opt_state"}) and
# meta (JSON). orbax writes each step
# into a temporary folder and renames it when complete, so a killed save never replaces a complete step; in a
# bucket, which has no rename, it writes the step in place and commits it with ORBAX_COMMIT_FILE, written last.

RUN_ITEMS = ("params", "optimizer", "meta")
ORBAX_TMP_MARKER = ".orbax-checkpoint-tmp"
ORBAX_COMMIT_FILE = "commit_success.txt"  # marks a committed step in a bucket


def run_checkpoint_manager(directory: str | os.PathLike, keep: int = 3, keep_best: bool = True,
                           async_save: bool = False, read_only: bool = False):
    """orbax CheckpointManager over a run's checkpoints folder (`Workdir.checkpoints`) keeping the last `keep`
    steps plus the best val_loss."""
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
    return ocp.CheckpointManager(paths.absolute(directory), item_names=RUN_ITEMS, options=options)


def run_best_step(mngr) -> int | None:
    """The kept step with the lowest val_loss (None when no checkpoint carries one)."""
    scored = []
    for s in mngr.all_steps():
        m = mngr.metrics(s)
        if m and "val_loss" in m:
            scored.append((float(m["val_loss"]), s))
    return min(scored)[1] if scored else None


def check_run_checkpoints(directory: str | os.PathLike, steps: list[int]) -> None:
    """Refuse a checkpoint folder holding entries orbax does not list (a damaged step): never start over it."""
    d = paths.as_path(directory)
    if not d.is_dir():
        return
    known = {str(s) for s in steps}
    strange = sorted(p.name for p in d.iterdir()
                     if ORBAX_TMP_MARKER not in p.name and p.name not in known and not p.name.startswith(".")
                     and not _uncommitted_in_bucket(p))
    if strange:
        raise ValueError(f"{d} holds {strange}, which are not complete orbax checkpoints; move them aside "
                         "(or use a new --workdir) and run again")


def _uncommitted_in_bucket(step_dir: Any) -> bool:
    """In a bucket orbax writes a step in place and commits it by writing ORBAX_COMMIT_FILE last (there is no
    rename): a step folder without it is a save in progress, or a killed one that the next training run's
    manager removes."""
    return paths.is_url(step_dir) and step_dir.name.isdigit() and not (step_dir / ORBAX_COMMIT_FILE).exists()


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

    where = paths.as_path(mngr.directory) / str(step)
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
