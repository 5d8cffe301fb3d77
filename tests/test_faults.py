"""Faults a long run meets, each made for real: a disk that fills during a checkpoint save (a small tmpfs in a
private mount namespace, and the same failure injected at orbax's commit where mounting is not allowed), a
metrics write cut short, a dead process in a two-process run, and a run resumed on a mesh of another size.

Runs that need their own devices or namespace run this file as a script in a subprocess
(`python tests/test_faults.py WORKER ...`) and the test reads the JSON it prints.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import chex
import numpy as np
import pytest

from jaxgpt import checkpoint, metrics, trainer

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300  # generous: the subprocesses share the cores with whatever else runs
# the tiny config, short: checkpoints at 10, 20, 30; the save of step FAIL_AT meets the fault, KEPT stays
FULL_DISK = {"max_iters": 30, "lr_decay_iters": 30, "ckpt_interval": 10, "eval_interval": 10, "log_interval": 1,
             "sample_tokens": 0, "eval_iters": 1}
FAIL_AT, KEPT = 20, 10


def tiny(data_dir: str | Path, **more):
    spec = importlib.util.spec_from_file_location("tiny", REPO / "configs" / "tiny.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    c.update_from_flattened_dict({"data.dir": str(data_dir), **more})
    return c


def valid_json_lines(path: Path) -> bool:
    text = path.read_text()
    return text.endswith("\n") and all(isinstance(json.loads(ln), dict) for ln in text.splitlines())


def ckpt_names(wd: Path) -> list[str]:
    return sorted(p.name for p in (wd / "checkpoints").iterdir())


# ---------------------------------------------------------------------------------------------------------
# A full disk during a checkpoint save


def fill_disk(where: Path) -> int:
    """Write zeros under `where` until its filesystem is full; returns the bytes written."""
    n, block = 0, b"\0" * 65536
    with open(where / "filler", "wb", buffering=0) as f:
        try:
            while True:
                n += f.write(block)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    return n


def worker_full_disk(wd: Path, data_dir: str) -> dict:
    """Train until the save of step FAIL_AT, fill the disk just before it, then free the space and rerun."""
    from jaxgpt import hooks

    save = checkpoint.save_run_step

    def filling_save(mngr, step, **kw):
        if step == FAIL_AT:
            fill_disk(wd)
        return save(mngr, step, **kw)

    hooks.checkpoint.save_run_step = filling_save
    out: dict = {"error": None}
    try:
        trainer.train(tiny(data_dir, **FULL_DISK), wd)
    except OSError as e:
        out.update(error=str(e), errno=e.errno)
    hooks.checkpoint.save_run_step = save
    out.update(ckpts=ckpt_names(wd), metrics_valid=valid_json_lines(wd / "metrics.jsonl"),
               last_logged=max(r["step"] for r in metrics.read_metrics(wd / "metrics.jsonl") if r["kind"] == "train"),
               restorable=int(checkpoint.load_run(wd)[1]["wte"]["embedding"].shape[0]) > 0,
               lock_left=(wd / ".lock").exists())
    (wd / "filler").unlink()
    summary = trainer.train(tiny(data_dir, **FULL_DISK), wd)  # the same command again, with space
    out.update(resumed=[r["step"] for r in metrics.read_metrics(wd / "metrics.jsonl") if r.get("event") == "resume"],
               final_step=summary["step"], final_ckpts=ckpt_names(wd),
               final_metrics_valid=valid_json_lines(wd / "metrics.jsonl"))
    return out


def _can_mount_tmpfs(tmp: Path) -> bool:
    d = tmp / "probe"
    d.mkdir()
    try:
        return subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {d}"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def assert_full_disk_outcome(out: dict, wd: Path) -> None:
    assert out["errno"] == errno.ENOSPC, out
    msg = out["error"]
    assert "\n" not in msg and f"saving checkpoint step {FAIL_AT}" in msg and "the disk is full" in msg, msg
    assert f"the disk mounted at {wd} has 0.0 MiB free" in msg, msg
    assert f"step {KEPT} is kept and restorable" in msg and "run the same command to resume" in msg, msg
    assert out["ckpts"] == [str(KEPT)], out  # no partial step left taking space
    assert out["metrics_valid"] and out["last_logged"] == FAIL_AT - 1 and out["restorable"], out
    assert not out["lock_left"], out
    assert out["resumed"] == [KEPT] and out["final_step"] == 30 and out["final_metrics_valid"], out
    assert {str(FAIL_AT), "30"} <= set(out["final_ckpts"]), out


def test_a_full_disk_during_a_save_stops_with_a_clear_error_and_keeps_the_last_checkpoint(pydoc_char_dir, tmp_path):
    """A real full disk: an 8 MiB tmpfs (a private mount namespace), filled just before the save of FAIL_AT."""
    if shutil.which("unshare") is None or not _can_mount_tmpfs(tmp_path):
        pytest.skip("cannot mount a tmpfs here (unshare -rm not permitted); the injected variant below runs")
    wd = tmp_path / "small_disk"
    wd.mkdir()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}  # the rerun reuses the first run's compiles
    cmd = (f"mount -t tmpfs -o size=8m tmpfs {wd} && exec {sys.executable} {__file__} full_disk {wd} "
           f"{pydoc_char_dir}")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", cmd], capture_output=True, text=True, timeout=TIMEOUT_S,
                          env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert_full_disk_outcome(out, wd)


def test_a_save_failing_with_enospc_at_the_commit_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """The Checkpointer alone, where mounting is not allowed: ENOSPC raised by orbax's commit of step FAIL_AT
    (every file written, the rename refused) gives the same one-line error; step KEPT stays restorable."""
    from orbax.checkpoint._src.path import atomicity

    from jaxgpt import hooks, steps

    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def full(self, *a, **kw):
        if self.get_final().name == str(FAIL_AT):
            raise OSError(errno.ENOSPC, "No space left on device")
        return await finalize(self, *a, **kw)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", full)
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((4, 8)).astype(np.float32), "b": rng.standard_normal(8).astype(np.float32)}

    class NoEval:
        last, last_step = {}, None

    mngr = checkpoint.run_checkpoint_manager(tmp_path)
    ckpt = hooks.Checkpointer(mngr, {"seed": 0}, NoEval(), lambda: None, None)
    tx = steps.make_optimizer(tiny(tmp_path))
    state = steps.init_state(params, tx)
    ckpt(KEPT, state)
    with pytest.raises(OSError, match=rf"saving checkpoint step {FAIL_AT} .*the disk is full.*step {KEPT} is kept") as e:
        ckpt(FAIL_AT, state.replace(params={k: v + 1 for k, v in params.items()}))
    mngr.close()
    assert e.value.errno == errno.ENOSPC and "\n" not in str(e.value)
    assert ckpt_names(tmp_path) == [str(KEPT)]  # the partial step is gone
    mngr = checkpoint.run_checkpoint_manager(tmp_path, read_only=True)
    got = checkpoint.restore_run_step(mngr, KEPT, params=params)["params"]
    mngr.close()
    chex.assert_trees_all_equal(got, params)


def test_a_metrics_write_cut_short_leaves_only_whole_lines(tmp_path, monkeypatch):
    """A write that stops part way (the disk filled) is cut back to the last whole line and raised clearly;
    the next write after space is freed appends a whole line."""
    path = tmp_path / "metrics.jsonl"
    log = metrics.MetricsLog(path)
    log.write({"kind": "train", "step": 0, "loss": 1.5})
    real_write = os.write

    def short_then_full(fd, data):
        if len(data) > 8:
            return real_write(fd, bytes(data[: len(data) // 2]))  # a part, as a filling disk does
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(metrics.os, "write", short_then_full)
    with pytest.raises(OSError, match=r"cannot append to .*metrics.jsonl \(No space left on device\)"):
        log.write({"kind": "train", "step": 1, "loss": 1.25})
    assert path.read_text() == json.dumps({"kind": "train", "step": 0, "loss": 1.5}) + "\n"
    monkeypatch.setattr(metrics.os, "write", real_write)
    log.write({"kind": "train", "step": 1, "loss": 1.25})
    assert [r["step"] for r in metrics.read_metrics(path)] == [0, 1] and valid_json_lines(path)


if __name__ == "__main__":
    import jax  # noqa: F401

    job = sys.argv[1]
    if job == "full_disk":
        print(json.dumps(worker_full_disk(Path(sys.argv[2]), sys.argv[3])))
    else:
        raise SystemExit(f"unknown job {job}")
