"""Faults: a run SIGKILLed at a random step resumes bitwise identical to an uninterrupted run; a kill during an
orbax save leaves the previous checkpoint restorable; SIGTERM saves and exits; corrupt or foreign checkpoints
are errors, never a fresh start; the last-k + best preservation policy."""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax.numpy as jnp
import pytest

from jaxgpt.io import checkpoint
from jaxgpt.io.workdir import Workdir
from jaxgpt.train import metrics, trainer

pytestmark = pytest.mark.run

REPO = Path(__file__).resolve().parents[1]
TRAIN_PY = REPO / "train.py"
# dropout and gradient accumulation on, so the resumed run must also restore its dropout keys and micro-batches
OVERRIDES = {"max_iters": 60, "lr_decay_iters": 60, "ckpt_interval": 20, "eval_interval": 20, "log_interval": 1,
             "grad_accum": 2, "sample_tokens": 0, "model.dropout": 0.1}


def config(data_dir: Path, **more):
    spec = importlib.util.spec_from_file_location("tiny", REPO / "configs" / "tiny.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    c.data.dir = str(data_dir)
    for k, v in {**OVERRIDES, **more}.items():
        node, _, leaf = k.rpartition(".")
        (c[node] if node else c)[leaf] = v
    return c


def flags(data_dir: Path, wd: Path, **more) -> list[str]:
    return ["--config=" + str(REPO / "configs" / "tiny.py"), f"--workdir={wd}", f"--config.data.dir={data_dir}",
            *(f"--config.{k}={v}" for k, v in {**OVERRIDES, **more}.items())]


def per_step(wd: Path, kind: str = "train") -> dict[int, dict]:
    return {r["step"]: r for r in metrics.read_metrics(wd / "metrics.jsonl") if r["kind"] == kind}


def last_logged_step(wd: Path) -> int:
    steps = per_step(wd)
    return max(steps) if steps else -1


def wait_for_step(proc: subprocess.Popen, wd: Path, step: int, timeout: float = 900.0) -> int:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if (wd / "metrics.jsonl").is_file() and (s := last_logged_step(wd)) >= step:
            return s
        if proc.poll() is not None:
            pytest.fail(f"training exited with {proc.returncode} before step {step}:\n{proc.log.read_text()[-3000:]}")
        time.sleep(0.005)
    proc.kill()
    pytest.fail(f"training did not reach step {step} in {timeout} s")


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """Child processes share a persistent compilation cache: the train step compiles once for this file."""
    cache = tmp_path_factory.mktemp("jax_cache")
    return {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def launch(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """A child process writing its stdout and stderr to `log` (a pipe could fill up and block it)."""
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
    proc.log = log
    return proc


def run_train(env: dict[str, str], data_dir: Path, wd: Path, **more) -> None:
    """`python train.py ...` to the end (a rerun of the same command resumes)."""
    proc = subprocess.run([sys.executable, str(TRAIN_PY), *flags(data_dir, wd, **more)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def resumed_from(wd: Path) -> list[int]:
    return [r["step"] for r in metrics.read_metrics(wd / "metrics.jsonl") if r.get("event") == "resume"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, pydoc_char_dir, env):
    """The uninterrupted run."""
    wd = tmp_path_factory.mktemp("ref") / "wd"
    run_train(env, pydoc_char_dir, wd)
    return wd


def assert_same_run(wd: Path, ref: Path) -> None:
    got, want = per_step(wd), per_step(ref)
    assert sorted(got) == sorted(want) == list(range(OVERRIDES["max_iters"]))
    diff = [s for s in want if got[s]["loss"] != want[s]["loss"]]
    assert not diff, f"losses differ at steps {diff[:10]}: {[(got[s]['loss'], want[s]['loss']) for s in diff[:3]]}"
    assert [r["val_loss"] for r in per_step(wd, "eval").values()] == \
           [r["val_loss"] for r in per_step(ref, "eval").values()]
    chex.assert_trees_all_equal(Workdir(wd).load()[1], Workdir(ref).load()[1])


def test_sigkill_at_a_random_step_then_resume_is_bitwise_identical(reference, pydoc_char_dir, env, tmp_path):
    wd = tmp_path / "wd"
    kill_at = random.Random().randint(OVERRIDES["ckpt_interval"] + 1, 40)  # after the first checkpoint
    proc = launch([str(TRAIN_PY), *flags(pydoc_char_dir, wd)], tmp_path / "log.txt", env)
    wait_for_step(proc, wd, kill_at)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    killed_at = last_logged_step(wd)
    assert proc.returncode == -signal.SIGKILL and killed_at < OVERRIDES["max_iters"] - 1, f"kill at {kill_at}"
    saved = max(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
    assert 20 <= saved <= killed_at + 1

    run_train(env, pydoc_char_dir, wd)  # the same command again
    assert resumed_from(wd) == [saved], f"killed after step {killed_at}"
    lines = (wd / "metrics.jsonl").read_text().splitlines()
    resumed = [ln for ln in lines[next(i for i, ln in enumerate(lines) if '"resume"' in ln):] if '"train"' in ln]
    assert len(resumed) == OVERRIDES["max_iters"] - saved  # every step after the checkpoint was recomputed
    assert_same_run(wd, reference)


def test_kill_during_a_save_keeps_the_previous_checkpoint(reference, pydoc_char_dir, env, tmp_path):
    """SIGKILL inside orbax's save of step 40, after every file is written but before the commit rename."""
    wd = tmp_path / "wd"
    script = tmp_path / "kill_in_save.py"
    script.write_text(
        "import os, runpy, signal, sys\n"
        "from orbax.checkpoint._src.path import atomicity\n"
        "orig = atomicity.AtomicRenameTemporaryPath.finalize\n"
        "async def finalize(self):\n"
        "    if self.get_final().name == '40':\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return await orig(self)\n"
        "atomicity.AtomicRenameTemporaryPath.finalize = finalize\n"
        f"sys.argv = {['train.py', *flags(pydoc_char_dir, wd)]!r}\n"
        f"runpy.run_path({str(TRAIN_PY)!r}, run_name='__main__')\n")
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=900,
                          env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ckpts = wd / "checkpoints"
    partial = ckpts / "40.orbax-checkpoint-tmp"
    assert partial.is_dir() and (partial / "params").is_dir()  # the data of step 40 is on disk, uncommitted
    assert sorted(p.name for p in ckpts.iterdir()) == ["20", "40.orbax-checkpoint-tmp"]
    cfg, params, _ = Workdir(wd).load()
    chex.assert_trees_all_equal(params, Workdir(wd).load(20)[1])

    run_train(env, pydoc_char_dir, wd)
    assert resumed_from(wd) == [20]
    assert not partial.exists()
    assert_same_run(wd, reference)


def test_sigterm_saves_a_checkpoint_and_exits(pydoc_char_dir, env, tmp_path):
    wd = tmp_path / "wd"
    proc = launch([str(TRAIN_PY), *flags(pydoc_char_dir, wd, max_iters=10**6, lr_decay_iters=10**6, ckpt_interval=10**5,
                                          eval_interval=10**5)], tmp_path / "log.txt", env)
    wait_for_step(proc, wd, 5)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    log = proc.log.read_text()
    assert proc.returncode == 0, log[-3000:]  # saved as planned: not an error
    stop = [r for r in metrics.read_metrics(wd / "metrics.jsonl") if r.get("event") == "stopped by SIGTERM"]
    assert len(stop) == 1 and stop[0]["step"] > 5
    assert [p.name for p in (wd / "checkpoints").iterdir()] == [str(stop[0]["step"])]
    assert "SIGTERM: saved a checkpoint" in log
    Workdir(wd).load()


def test_corrupt_checkpoint_is_an_error_not_a_fresh_start(reference, pydoc_char_dir, tmp_path):
    wd = tmp_path / "wd"
    shutil.copytree(reference, wd)
    last = wd / "checkpoints" / str(OVERRIDES["max_iters"])
    for f in (last / "params").rglob("*"):
        if f.is_file():
            f.write_bytes(b"not a checkpoint")
    before = sorted(p.relative_to(wd) for p in wd.rglob("*"))
    with pytest.raises(ValueError, match=r"checkpoints/60 cannot be restored .*move that step folder aside"):
        trainer.train(config(pydoc_char_dir), wd)
    with pytest.raises(ValueError, match="cannot be restored"):
        Workdir(wd).load()
    assert sorted(p.relative_to(wd) for p in wd.rglob("*")) == before  # nothing deleted or rewritten

    shutil.rmtree(last)
    (wd / "checkpoints" / "junk").mkdir()
    with pytest.raises(ValueError, match=r"holds \['junk'\], which are not complete orbax checkpoints"):
        trainer.train(config(pydoc_char_dir), wd)


def test_a_workdir_of_another_model_is_refused(reference, pydoc_char_dir, tmp_path):
    wd = tmp_path / "wd"
    shutil.copytree(reference, wd)
    with pytest.raises(ValueError, match=r"holds a run of another model .*'n_layer': \(2, 3\)"):
        trainer.train(config(pydoc_char_dir, **{"model.n_layer": 3}), wd)


def test_keeps_the_last_k_and_the_best_by_val_loss(tmp_path):
    import orbax.checkpoint as ocp

    mngr = checkpoint.run_checkpoint_manager(Workdir(tmp_path).checkpoints, keep=2)
    for step, val in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 4.0), (5, None)]:
        mngr.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave({"w": jnp.full((2,), float(step))}),
            optimizer=ocp.args.StandardSave({"step": jnp.int32(step)}), meta=ocp.args.JsonSave({"step": step})),
            metrics={"val_loss": val} if val is not None else None, force=True)
    mngr.wait_until_finished()
    assert sorted(mngr.all_steps()) == [2, 4, 5]
    mngr.close()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4", "5"]
    mngr = checkpoint.run_checkpoint_manager(Workdir(tmp_path).checkpoints, keep=2)  # a new process: metrics come from disk
    assert checkpoint.run_best_step(mngr) == 2 and mngr.metrics(4) == {"val_loss": 4.0}
    mngr.save(6, args=ocp.args.Composite(
        params=ocp.args.StandardSave({"w": jnp.full((2,), 6.0)}), optimizer=ocp.args.StandardSave({"step": 6}),
        meta=ocp.args.JsonSave({"step": 6})), force=True)
    mngr.wait_until_finished()
    assert sorted(mngr.all_steps()) == [2, 5, 6]  # the best survives a restart
    mngr.close()
