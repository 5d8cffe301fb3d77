"""Tests for jaxgpt.io.lock: one run per workdir; a live holder is named and refused, a gone one (dead PID,
reused PID, rebooted machine, silent host) is taken over; racing starters get exactly one winner; readers never
touch the lock; `train` and train.py refuse a held workdir before writing anything."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_faults import tiny

from jaxgpt.io import lock as wl
from jaxgpt.io.workdir import Workdir

REPO = Path(__file__).resolve().parents[1]


def write_lock(wd: Path, **holder) -> Path:
    wd.mkdir(parents=True, exist_ok=True)
    me = wl.me()
    path = Workdir(wd).lock
    path.write_text(json.dumps({**me, **holder}))
    return path


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_live_holder_is_refused_in_one_line_naming_it(tmp_path):
    with wl.WorkdirLock(tmp_path) as held:
        assert held.taken_over is None
        with pytest.raises(wl.WorkdirLocked) as e:
            wl.WorkdirLock(tmp_path).acquire()
        msg = str(e.value)
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held.holder["started"]))
        assert "\n" not in msg
        assert f"is in use by another training run (host {socket.gethostname()}, PID {os.getpid()}, " \
               f"started {started})" in msg and "use another --workdir" in msg
        assert wl.holder_of(tmp_path)["token"] == held.holder["token"]
    assert not Workdir(tmp_path).lock.exists()  # released
    wl.WorkdirLock(tmp_path).acquire().release()  # and free again


@pytest.mark.parametrize("holder,reason", [
    (lambda: {"pid": dead_pid()}, r"PID \d+ is gone"),
    (lambda: {"start": "1"}, rf"PID {os.getpid()} now belongs to another process"),  # this PID, another start
    (lambda: {"boot_id": "another-boot"}, "the machine rebooted since"),
], ids=["pid-gone", "pid-reused", "rebooted"])  # fixed ids: pytest-xdist workers must collect the same names
def test_a_stale_lock_on_this_host_is_taken_over(tmp_path, holder, reason):
    if wl.process_start(os.getpid()) is None or wl._boot_id() is None:
        pytest.skip("no /proc: process start times are unknown here")
    write_lock(tmp_path, **holder())
    with wl.WorkdirLock(tmp_path) as lock:
        assert lock.taken_over is not None
        assert re.search(reason, lock.taken_over), lock.taken_over
        assert wl.holder_of(tmp_path)["token"] == lock.holder["token"]


def test_another_hosts_lock_is_refused_until_its_heartbeat_is_stale(tmp_path):
    path = write_lock(tmp_path, host="node-17", pid=4242)
    with pytest.raises(wl.WorkdirLocked, match=r"host node-17, PID 4242"):
        wl.WorkdirLock(tmp_path).acquire()
    old = time.time() - wl.STALE_AFTER_S - 5
    os.utime(path, (old, old))
    with wl.WorkdirLock(tmp_path) as lock:
        assert "no heartbeat from host node-17" in lock.taken_over


def test_the_holder_refreshes_its_heartbeat(tmp_path):
    with wl.WorkdirLock(tmp_path, heartbeat_s=0.05) as lock:
        old = time.time() - 1000
        os.utime(lock.path, (old, old))
        deadline = time.time() + 10
        while lock.path.stat().st_mtime < time.time() - 100 and time.time() < deadline:
            time.sleep(0.02)
        assert lock.path.stat().st_mtime > time.time() - 100


def test_release_never_removes_a_lock_taken_over_since(tmp_path):
    lock = wl.WorkdirLock(tmp_path).acquire()
    other = write_lock(tmp_path, host="node-3", pid=99)  # another run took it over meanwhile
    lock.release()
    assert other.exists() and json.loads(other.read_text())["host"] == "node-3"


def test_check_raises_once_another_run_took_the_lock_over(tmp_path):
    """A run that stalled past STALE_AFTER_S and wakes to another holder learns it at its next write."""
    lock = wl.WorkdirLock(tmp_path).acquire()
    lock.check()  # still ours
    write_lock(tmp_path, host="node-3", pid=99)
    with pytest.raises(wl.WorkdirLost, match=r"lost its lock by host node-3, PID 99, .*the other run keeps") as e:
        lock.check()
    assert "\n" not in str(e.value) and isinstance(e.value, wl.WorkdirLocked)
    Workdir(tmp_path).lock.unlink()
    with pytest.raises(wl.WorkdirLost, match="the lock file is gone"):
        lock.check()
    lock.release()


@pytest.mark.run
def test_a_run_whose_lock_is_taken_over_stops_before_its_next_write(tmp_path, pydoc_char_dir):
    """The lock changes hands at step 7 (as when this run stalls and another takes over): the run stops with
    WorkdirLost before the checkpoint of step 10, keeps the one of step 5, and leaves the new holder's lock."""
    import jax
    import optax

    from jaxgpt.train import steps, trainer
    from jaxgpt.train.config import OptimConfig

    wd = tmp_path / "wd"
    c = tiny(pydoc_char_dir, **{"model.n_layer": 1, "model.n_embd": 16, "model.block_size": 16, "eval_iters": 1,
                               "sample_tokens": 0, "max_iters": 20, "lr_decay_iters": 20, "ckpt_interval": 5,
                               "eval_interval": 100, "log_interval": 100})

    def steal(count):
        if int(count) == 7:
            write_lock(wd, host="node-3", pid=99)

    def update(updates, count, params=None):
        jax.debug.callback(steal, count, ordered=True)
        return updates, count + 1

    tx = optax.chain(steps.make_optimizer(OptimConfig.of(c)), optax.GradientTransformation(lambda p: jax.numpy.zeros((), "int32"),
                                                                           update))
    with pytest.raises(wl.WorkdirLost, match="node-3"):
        trainer.train(c, wd, tx=tx)
    assert sorted(int(p.name) for p in (wd / "checkpoints").iterdir()) == [5]
    assert wl.holder_of(wd)["host"] == "node-3"


def test_a_foreign_lock_file_is_refused_with_the_fix(tmp_path):
    Workdir(tmp_path).lock.write_text("{not json")
    with pytest.raises(wl.WorkdirLocked, match=r"is not a jaxgpt lock file; if no run uses .* delete it"):
        wl.WorkdirLock(tmp_path).acquire()


RACE = r"""
import sys, time
from jaxgpt.io import lock as wl
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
try:
    lock = wl.WorkdirLock(sys.argv[1]).acquire()
except wl.WorkdirLocked:
    print("refused"); sys.exit(0)
print("holder", flush=True)
if sys.argv[3] == "kill":
    import os, signal
    os.kill(os.getpid(), signal.SIGKILL)
time.sleep(1.5)
lock.release()
"""


def test_racing_starters_get_exactly_one_holder(tmp_path):
    go = time.time() + 1.5  # after every interpreter has started
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(tmp_path), str(go), "hold"], stdout=subprocess.PIPE,
                              text=True, cwd=REPO) for _ in range(4)]
    outs = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outs == ["holder", "refused", "refused", "refused"], outs
    assert not Workdir(tmp_path).lock.exists()


def test_the_lock_of_a_sigkilled_run_is_taken_over(tmp_path):
    p = subprocess.run([sys.executable, "-c", RACE, str(tmp_path), "0", "kill"], capture_output=True, text=True,
                       cwd=REPO, timeout=60)
    assert p.returncode == -signal.SIGKILL and p.stdout.strip() == "holder"
    killed = wl.holder_of(tmp_path)["pid"]  # the lock file the killed process left behind
    assert killed != os.getpid()
    with wl.WorkdirLock(tmp_path) as lock:
        assert f"PID {killed} is gone" in lock.taken_over


def test_readers_ignore_the_lock_and_leave_a_running_save_alone(tmp_path):
    """Workdir.load (what jaxgpt.sample, eval and exports read through) works on a held workdir and
    changes nothing in it: neither the lock nor a save in progress."""
    import chex
    import jax
    import numpy as np

    from jaxgpt.io import checkpoint
    from jaxgpt.io.workdir import Workdir
    from jaxgpt.nn.config import GPTConfig
    from jaxgpt.nn.model import init_params

    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8)
    rng = np.random.default_rng(3)  # random values in the model's structure (no init to compile)
    params = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(x.dtype),
                          jax.eval_shape(lambda: init_params(cfg, 3)))
    mngr = checkpoint.run_checkpoint_manager(Workdir(tmp_path).checkpoints)
    checkpoint.save_run_step(mngr, 5, params=params, optimizer={"step": np.int32(5)}, meta={"step": 5})
    mngr.close()
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    (tmp_path / "tokenizer.json").write_text(json.dumps({"kind": "char", "chars": "abcdefghijk", "vocab_size": 11}))
    with wl.WorkdirLock(tmp_path) as lock:
        in_flight = tmp_path / "checkpoints" / f"6{checkpoint.ORBAX_TMP_MARKER}"
        (in_flight / "params").mkdir(parents=True)
        before = (lock.path.read_text(), lock.path.stat().st_mtime_ns)
        _, got, _ = Workdir(tmp_path).load()
        chex.assert_trees_all_equal(got, params)
        assert (lock.path.read_text(), lock.path.stat().st_mtime_ns) == before
        assert in_flight.is_dir()


def tiny_flags(wd: Path, data_dir: Path) -> list[str]:
    return [f"--config={REPO / 'configs' / 'tiny.py'}", f"--workdir={wd}", f"--config.data.dir={data_dir}"]


@pytest.mark.run
def test_train_and_train_py_refuse_a_held_workdir_before_writing(tmp_path, pydoc_char_dir):
    """The case that used to crash both runs: a second train.py on a workdir in use."""
    from jaxgpt.train import trainer

    wd = tmp_path / "wd"
    with wl.WorkdirLock(wd):
        with pytest.raises(wl.WorkdirLocked, match=rf"PID {os.getpid()}"):
            trainer.train(tiny(pydoc_char_dir), wd)
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        p = subprocess.run([sys.executable, str(REPO / "train.py"), *tiny_flags(wd, pydoc_char_dir)], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 1, p.stderr[-2000:]
        last = p.stderr.strip().splitlines()[-1]
        assert last.startswith("train.py: ") and f"PID {os.getpid()}" in last and "Traceback" not in p.stderr, \
            p.stderr[-2000:]
        assert sorted(f.name for f in wd.iterdir()) == [Workdir(wd).lock.name, Workdir(wd).lock_guard.name]  # nothing written


def test_a_bucket_workdir_gets_the_bucket_lock_and_missing_credentials_are_named(tmp_path, monkeypatch):
    pytest.importorskip("gcsfs")
    assert type(wl.WorkdirLock(tmp_path)) is wl.WorkdirLock  # a local folder keeps the flock lock
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-such-key.json"))
    with pytest.raises(RuntimeError, match=r"gs://bkt/run/\.lock: no Google Cloud credentials to reach the bucket "
                                           r"\(DefaultCredentialsError\); run `gcloud auth application-default login`"):
        wl.WorkdirLock("gs://bkt/run")
