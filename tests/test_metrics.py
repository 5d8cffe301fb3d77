"""jaxgpt.train.metrics: the JSON-lines log survives a killed writer; throughput counts training time only."""

from __future__ import annotations

import time

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
