"""jaxgpt.train.metrics: the JSON-lines log survives a killed writer; throughput counts training time only."""

from __future__ import annotations

import errno
import json
import os
import time

import pytest

from jaxgpt.train import metrics


def test_a_truncated_last_line_is_skipped_and_ended(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"kind": "train", "step": 0, "loss": 1.0}\n{"kind": "train", "st')  # killed mid-line
    log = metrics.MetricsLog(p)
    log.write({"kind": "train", "step": 1, "loss": 0.5})
    log.write({"kind": "train", "step": 0, "loss": 0.9})  # a resumed run rewrites step 0: the last one wins
    assert [(r["step"], r["loss"]) for r in metrics.read_metrics(p)] == [(0, 0.9), (1, 0.5)]


def test_throughput_excludes_time_before_a_restart():
    """Steps dispatched before a restart (an evaluation) do not count, and a flush right after another one
    does not divide a whole step's tokens by a few microseconds."""
    m = metrics.Throughput(tokens_per_step=1000, flops_per_token=6.0, peak_flops=None)
    for _ in range(3):
        m.dispatched_one()
    time.sleep(0.05)
    tps, mfu = m.finished_some(2)
    assert 2 * 1000 / 5 < tps <= 2 * 1000 / 0.05 and mfu is None  # >= 0.05 s have passed (and not 5 s)
    tps2, _ = m.finished_some(1)  # back to back: the rate stays the rate over the whole interval
    assert 3 * 1000 / 5 < tps2 <= 3 * 1000 / 0.05
    m.restart()
    assert m.finished_some(1) == (None, None)  # nothing dispatched since the restart
    m.dispatched_one()
    time.sleep(0.02)
    assert 1000 / 5 < m.finished_some(1)[0] <= 1000 / 0.02


def test_flops_per_token_is_6n_plus_attention():
    assert metrics.flops_per_token(12, 1024, 768, 85_000_000) == 6 * 85_000_000 + 12 * 12 * 1024 * 768


def test_data_wait_is_the_share_of_time_spent_waiting_for_batches():
    m = metrics.Throughput(tokens_per_step=1000, flops_per_token=6.0, peak_flops=None)
    m.waited_for_data(0.01)
    time.sleep(0.04)
    assert 0 < m.data_wait() <= 0.01 / 0.04
    m.restart()
    assert m.data_wait() == 0.0


# ---------------------------------------------------------------------------------------------------------
# Batched writes: StepMetrics -> writers.Writers -> MetricsLog (at once) and a batched writer (TensorBoard's way)


def _step_metrics(log, log_interval: int = 1) -> metrics.StepMetrics:
    meter = metrics.Throughput(tokens_per_step=10, flops_per_token=6.0, peak_flops=None)
    return metrics.StepMetrics(log, meter, log_interval, None,
                               lambda step, loss, g: FloatingPointError(f"loss is {loss} at step {step}"))


def _device_metrics(loss: float) -> dict:
    import numpy as np

    return {"loss": np.float32(loss), "grad_norm": np.float32(1.5), "finite": np.bool_(np.isfinite(loss))}


class Batched:
    """A writer that `Writers` hands records in batches, as it does TensorBoard's and W&B's."""

    batched = True

    def __init__(self) -> None:
        self.records: list[dict] = []

    def write_many(self, records) -> None:
        self.records.extend(records)

    def close(self) -> None:
        pass


def _log(tmp_path):
    from jaxgpt.train import writers

    path, tb = tmp_path / "metrics.jsonl", Batched()
    return path, tb, writers.Writers([metrics.MetricsLog(path), tb], every=1000, max_delay_s=1e9)


def _kinds_steps(records) -> list[tuple[str, int]]:
    return [(r["kind"], r["step"]) for r in records]


def test_metrics_jsonl_gets_each_record_at_once_and_the_batched_writers_all_of_them_in_order_after_a_close(tmp_path):
    path, tb, log = _log(tmp_path)
    sm = _step_metrics(log)
    log.write({"kind": "event", "event": "resume", "step": 0, "time": 0.0})
    for step in range(10):
        sm.add(step, _device_metrics(3.0 - 0.125 * step))
        sm.flush(keep=1)  # the loop's log hook at log_interval=1
    log.write({"kind": "eval", "step": 9, "val_loss": 2.0, "time": 0.0})
    want = [("event", 0), *[("train", s) for s in range(9)], ("eval", 9)]  # step 9 is still pending (keep=1)
    lines = [json.loads(ln) for ln in path.read_text().splitlines()]
    assert _kinds_steps(lines) == want  # a killed run keeps every record it logged
    assert tb.records == []  # kept in memory: no TensorBoard write per step
    log.close()  # the loop's `finally`
    assert _kinds_steps(tb.records) == want and tb.records == lines
    assert [r["loss"] for r in lines[1:-1]] == [3.0 - 0.125 * s for s in range(9)]


def test_a_full_flush_hands_the_kept_records_out_before_an_evaluation_or_checkpoint(tmp_path):
    path, tb, log = _log(tmp_path)
    sm = _step_metrics(log)
    for step in range(5):
        sm.add(step, _device_metrics(2.0))
        sm.flush(keep=1)
    assert tb.records == []
    sm.flush()  # keep=0: what the loop calls before it evaluates or saves
    assert _kinds_steps(tb.records) == [("train", s) for s in range(5)]
    assert [json.loads(ln)["step"] for ln in path.read_text().splitlines()] == [0, 1, 2, 3, 4]
    sm.flush()  # nothing pending, nothing kept: no write, no error
    assert len(tb.records) == 5 and len(path.read_text().splitlines()) == 5


def test_a_non_finite_step_hands_out_the_steps_before_it_and_its_event_before_raising(tmp_path):
    """The crash path: the run stops at the non-finite step with the records of every step before it and the
    event in every writer, in order, even when nobody closes the log afterwards."""
    path, tb, log = _log(tmp_path)
    sm = _step_metrics(log)
    for step, loss in enumerate([2.0, 1.5, float("nan"), 1.0]):
        sm.add(step, _device_metrics(loss))
    with pytest.raises(FloatingPointError, match="at step 2"):
        sm.flush(keep=1)
    lines = [json.loads(ln) for ln in path.read_text().splitlines()]
    assert _kinds_steps(lines) == _kinds_steps(tb.records) == [("train", 0), ("train", 1), ("event", 2)]
    assert lines[-1]["event"] == "non-finite" and lines[-1]["loss"] == "nan"


def test_write_many_appends_whole_lines_or_cuts_back_to_them(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    log = metrics.MetricsLog(path)
    log.write_many([{"kind": "train", "step": s, "loss": 1.0 / (s + 1)} for s in range(3)])
    real_write = os.write

    def half_then_full(fd, data):
        if len(data) > 40:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(metrics.os, "write", half_then_full)
    with pytest.raises(OSError, match="No space left on device"):
        log.write_many([{"kind": "train", "step": s, "loss": 0.5} for s in range(3, 6)])
    monkeypatch.setattr(metrics.os, "write", real_write)
    assert [r["step"] for r in metrics.read_metrics(path)] == [0, 1, 2] and path.read_text().endswith("\n")
    log.write_many([])
    assert [r["step"] for r in metrics.read_metrics(path)] == [0, 1, 2]


def test_learning_rates_looked_up_in_blocks_equal_one_lookup_per_step_bitwise():
    """The logged lr comes from one jitted schedule call per LR_BLOCK steps (not one a step); the schedule is
    elementwise, so every step's value is bitwise the one a call for that step alone gives."""
    import jax
    import numpy as np

    from jaxgpt.train import steps
    from jaxgpt.train.config import OptimConfig

    optim = OptimConfig(learning_rate=1e-3, decay_lr=True, warmup_iters=100, lr_decay_iters=2000, min_lr=1e-4,
                        weight_decay=0.1, beta1=0.9, beta2=0.99, eps=1e-8, grad_clip=1.0)
    schedule = jax.jit(steps.lr_schedule(optim))
    calls = []

    def lr_fn(s):
        calls.append(len(s))
        return schedule(s)

    sm = metrics.StepMetrics(metrics.NoLog(), metrics.Throughput(1, 1.0, None), 1, lr_fn, lambda *a: None)
    got = np.asarray(sm.lrs(list(range(2100))), np.float32)
    one = np.asarray([np.asarray(schedule(np.asarray([s], np.int32)))[0] for s in range(2100)], np.float32)
    np.testing.assert_array_equal(got.view(np.uint32), one.view(np.uint32))
    assert calls == [sm.LR_BLOCK] * -(-2100 // sm.LR_BLOCK)
    assert sm.lrs([5, 6]) and len(calls) == 9 + 1  # an early block again: recomputed (only a few are kept)
