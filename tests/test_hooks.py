"""jaxgpt.train.hooks: when a hook is due (steps listed by hand), the evaluator's mean losses against float64 NumPy
on fresh random batches, what the checkpointer saves and skips (orbax's save replaced by a recorder), the one-line
error of a failed save (errno, statvfs's free space, the mount point, the partial step removed), the profiler's
trace window and the signal handler."""

from __future__ import annotations

import errno
import os
import re
import signal
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.io import checkpoint
from jaxgpt.train import hooks
from jaxgpt.train.steps import TrainState


class Log:
    def __init__(self) -> None:
        self.records: list[dict] = []

    def write(self, record: dict) -> None:
        self.records.append(record)


def _state(seed: int, step: int = 4) -> TrainState:
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(rng.standard_normal((3, 2)), jnp.float32)}
    return TrainState(step=jnp.int32(step), params=params, opt_state={"mu": jnp.asarray(rng.standard_normal(2))})


# ---------------------------------------------------------------------------------------------------------
# Hook


@pytest.mark.parametrize("every,at_end,due", [
    (3, True, [0, 3, 6, 9, 10]),
    (3, False, [0, 3, 6, 9]),
    (5, True, [0, 5, 10]),
    (1, False, list(range(11))),
    (0, True, []),  # every 0: never, not even at the end
])
def test_a_hook_is_due_every_n_steps_and_after_the_last(every, at_end, due):
    hook = hooks.Hook(lambda step, state: None, every, at_end=at_end)
    assert [s for s in range(11) if hook.due(s, last=10)] == due


# ---------------------------------------------------------------------------------------------------------
# Evaluator


def test_the_evaluator_logs_and_prints_the_mean_loss_of_each_split():
    rng = np.random.default_rng(0)
    sets = {name: [(rng.standard_normal((2, 5)).astype(np.float32), rng.standard_normal((2, 5)).astype(np.float32))
                   for _ in range(3)] for name in ("train", "val")}
    seen = []

    def eval_step(params, x, y, frozen):  # a loss of the batch: mean((x * w - y)^2) + frozen
        seen.append(frozen)
        return jnp.mean((x * params["w"] - y) ** 2) + frozen

    printed, log = [], Log()
    ev = hooks.Evaluator(eval_step, sets, 0.25, log, print_fn=printed.append)
    state = TrainState(step=jnp.int32(7), params={"w": jnp.float32(1.5)}, opt_state=None)
    out = ev(7, state)
    want = {f"{name}_loss": np.mean([np.mean((x.astype(np.float64) * 1.5 - y) ** 2) + 0.25 for x, y in b])
            for name, b in sets.items()}
    assert sorted(out) == ["train_loss", "val_loss"]
    for k, v in want.items():
        assert out[k] == pytest.approx(v, rel=1e-6)
    assert seen == [0.25] * 6  # the frozen params reach every call
    assert ev.last == out and ev.last_step == 7
    (record,) = log.records
    assert record["kind"] == "eval" and record["step"] == 7 and record["train_loss"] == out["train_loss"]
    assert abs(record["time"] - time.time()) < 60
    assert printed == [f"step 7: train loss {want['train_loss']:.4f}, val loss {want['val_loss']:.4f}"]


# ---------------------------------------------------------------------------------------------------------
# Checkpointer (orbax's save replaced by a recorder)


class Manager:
    """The parts of an orbax CheckpointManager the checkpointer uses."""

    def __init__(self, directory: Path, fail_wait: BaseException | None = None) -> None:
        self.directory, self.fail_wait, self.waits = directory, fail_wait, 0

    def wait_until_finished(self) -> None:
        self.waits += 1
        if self.fail_wait is not None:
            raise self.fail_wait


class Eval:
    def __init__(self, last: dict, last_step: int | None) -> None:
        self.last, self.last_step = last, last_step


@pytest.fixture
def saves(monkeypatch):
    calls = []
    monkeypatch.setattr(checkpoint, "save_run_step", lambda mngr, step, **kw: calls.append((step, kw)))
    return calls


def test_the_checkpointer_saves_the_unrolled_state_with_the_evaluation_of_its_step(tmp_path, saves):
    order = []
    mngr = Manager(tmp_path)
    state = _state(1)
    unrolled = _state(2)  # what the layout converter returns: the saved state must be this one
    ck = hooks.Checkpointer(mngr, {"seed": 3}, Eval({"val_loss": 2.5, "train_loss": 2.4}, 4),
                            lambda: order.append("before_save"), last_saved=None, unrolled=lambda s: unrolled)
    ck(4, state)
    ((step, kw),) = saves
    assert step == 4 and order == ["before_save"] and mngr.waits == 1
    assert kw["params"] is unrolled.params and kw["optimizer"]["opt_state"] is unrolled.opt_state
    assert int(kw["optimizer"]["step"]) == 4
    assert kw["meta"] == {"step": 4, "seed": 3, "val_loss": 2.5, "train_loss": 2.4} and kw["val_loss"] == 2.5
    assert (ck.last_saved, ck.in_flight, ck.kept) == (4, 4, None)
    ck(4, state)  # already saved: nothing happens
    assert len(saves) == 1 and mngr.waits == 1
    ck.wait()  # the background save is done: step 4 is the kept one
    assert (ck.in_flight, ck.kept) == (None, 4)


def test_the_checkpointer_leaves_out_an_evaluation_of_another_step(tmp_path, saves):
    ck = hooks.Checkpointer(Manager(tmp_path), {}, Eval({"val_loss": 2.5}, 3), lambda: None, last_saved=2)
    ck(6, _state(3, 6))
    ((step, kw),) = saves
    assert step == 6 and kw["meta"] == {"step": 6} and kw["val_loss"] is None


def test_a_failed_save_stops_with_one_line_and_removes_the_partial_step(tmp_path, monkeypatch):
    partial = tmp_path / f"8{checkpoint.ORBAX_TMP_MARKER}-1234"
    (partial / "params").mkdir(parents=True)
    (tmp_path / "4").mkdir()

    def full(mngr, step, **kw):
        raise RuntimeError("tensorstore write failed") from OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_run_step", full)
    ck = hooks.Checkpointer(Manager(tmp_path), {}, Eval({}, None), lambda: None, last_saved=4)
    with pytest.raises(OSError) as e:
        ck(8, _state(4, 8))
    assert e.value.errno == errno.ENOSPC and "\n" not in str(e.value)
    assert "saving checkpoint step 8" in str(e.value) and "the disk is full" in str(e.value)
    assert "step 4 is kept and restorable" in str(e.value)
    assert not partial.exists() and (tmp_path / "4").is_dir()  # the partial step is gone, the kept one stays


def test_a_background_save_that_fails_is_raised_by_the_next_wait(tmp_path, saves):
    mngr = Manager(tmp_path)
    ck = hooks.Checkpointer(mngr, {}, Eval({}, None), lambda: None, last_saved=None)
    ck(2, _state(5, 2))
    mngr.fail_wait = OSError(errno.EIO, "lost mount")
    with pytest.raises(OSError, match="saving checkpoint step 2 .*there is no earlier checkpoint") as e:
        ck.wait()
    assert e.value.errno == errno.EIO


# ---------------------------------------------------------------------------------------------------------
# save_error


def test_save_error_names_the_disk_its_free_space_and_the_kept_step(tmp_path):
    d = tmp_path / "run" / "checkpoints"
    d.mkdir(parents=True)
    err = hooks.save_error(12, d, 10, OSError(errno.ENOSPC, "No space left on device"))
    msg = err.strerror  # str(err) is "[Errno 28] " + this
    assert err.errno == errno.ENOSPC and "\n" not in msg
    assert msg.startswith(f"saving checkpoint step 12 to {d} failed (the disk is full;")
    assert "step 10 is kept and restorable" in msg and msg.endswith("run the same command to resume")
    mount = Path(re.search(r"the disk mounted at (\S+) has", msg).group(1))
    # the mount point: the nearest ancestor that is one (os.path.ismount), no nearer one in between
    assert os.path.ismount(mount) and d.is_relative_to(mount)
    assert not any(os.path.ismount(p) for p in d.parents if p.is_relative_to(mount) and p != mount)
    free = float(re.search(r"has ([\d.]+) MiB free", msg).group(1))
    st = os.statvfs(d)
    assert free == pytest.approx(st.f_bavail * st.f_frsize / 2**20, abs=64)  # others write meanwhile


def test_save_error_of_another_failure_keeps_its_type_and_first_line():
    e = ValueError("bad value\nsecond line " + "x" * 300)
    err = hooks.save_error(3, Path("/nonexistent/checkpoints"), None, e)
    msg = str(err)
    assert err.errno == errno.EIO and "\n" not in msg
    assert "(ValueError: bad value;" in msg and "second line" not in msg
    assert "free space unknown" in msg and "there is no earlier checkpoint" in msg
    long = hooks.save_error(3, Path("/nonexistent"), None, RuntimeError("y" * 500))
    assert "y" * 200 in str(long) and "y" * 201 not in str(long)  # the reason is cut at 200 characters
    assert hooks.save_error(3, Path("/nonexistent"), None, OSError(errno.EACCES, "denied")).errno == errno.EACCES


# ---------------------------------------------------------------------------------------------------------
# Profiler and SignalStop


def test_the_profiler_traces_steps_first_to_last_then_logs_once(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(jax.profiler, "start_trace", lambda d: calls.append(("start", d)))
    monkeypatch.setattr(jax.profiler, "stop_trace", lambda: calls.append(("stop",)))
    log = Log()
    prof = hooks.Profiler((2, 4), tmp_path / "profile", log)
    for step in range(8):  # the loop: before_step(step), the step, then the hooks with step + 1 steps done
        prof.before_step(step)
        prof(step + 1, _state(6, step + 1))
    assert calls == [("start", str(tmp_path / "profile")), ("stop",)]
    (record,) = log.records
    assert record["event"] == "profile" and record["step"] == 5 and record["dir"] == str(tmp_path / "profile")
    prof.stop()  # already stopped: nothing more
    assert len(calls) == 2


def test_signal_stop_records_the_first_signal_and_leaves_on_the_second():
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers can only be installed from the main thread")
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with hooks.SignalStop() as stop:
        assert signal.getsignal(signal.SIGTERM) is stop and signal.getsignal(signal.SIGINT) is stop
        assert stop.signal is None
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # the handler runs in the main thread at the next bytecode
        assert stop.signal == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    assert {s: signal.getsignal(s) for s in before} == before  # the handlers are restored


def test_a_second_signal_while_the_stop_is_saved_is_reported_and_the_save_goes_on():
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers can only be installed from the main thread")
    printed = []
    with hooks.SignalStop(printed.append) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert stop.agreed() == "SIGINT"  # one process: no vote, the signal itself
        with stop.saving():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # no KeyboardInterrupt here
            saved = True
        assert saved and stop.signal == "SIGINT"
        assert printed == ["SIGTERM again: the checkpoint is being written; the run exits as soon as it is complete"]
        with pytest.raises(KeyboardInterrupt):  # after the save, a further signal leaves at once again
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)


def test_the_stop_vote_names_the_first_process_that_got_a_signal():
    vote = hooks.StopVote.__new__(hooks.StopVote)  # its reading alone: the all-gather needs several processes
    vote.owner, vote.n_processes = [0, 0, 1, 1, 2, 2], 3  # [D] the process of each device: 3 processes of 2
    assert vote.read(np.zeros(6, np.int32)) is None
    term, intr = int(signal.SIGTERM), int(signal.SIGINT)
    assert vote.read(np.array([0, 0, term, term, 0, 0], np.int32)) == "SIGTERM (process 1 of 3)"
    assert vote.read(np.array([0, 0, 0, 0, intr, intr], np.int32)) == "SIGINT (process 2 of 3)"
    assert vote.read(np.array([term, term, 0, 0, intr, intr], np.int32)) == "SIGTERM (process 0 of 3)"


def test_the_stop_vote_answers_one_cast_late_so_every_process_reads_it_after_the_same_step():
    vote = hooks.StopVote()  # the all-gather over this process's devices (a pod's vote spans every host's)
    assert vote.cast(None) is None  # nothing cast before
    assert vote.cast("SIGTERM") is None  # the previous cast: no signal
    assert vote.cast(None) == f"SIGTERM (process 0 of {jax.process_count()})"  # read one cast later
    assert vote.cast(None) is None


def test_signal_stop_outside_the_main_thread_installs_nothing():
    before = signal.getsignal(signal.SIGTERM)
    seen = []

    def run():
        with hooks.SignalStop() as stop:
            seen.append((stop.old, signal.getsignal(signal.SIGTERM)))

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert seen == [({}, before)]
