"""jaxgpt.train.writers: TensorBoard events read back with tensorboard's own reader; W&B (offline) history read back from
its run file; config selection."""

from __future__ import annotations

import struct
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest

from jaxgpt.train import metrics, writers


def records(seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for step in range(0, 50, 10):
        out.append({"kind": "train", "step": step, "loss": float(rng.uniform(2, 5)), "lr": float(rng.uniform(0, 1e-3)),
                    "grad_norm": float(rng.uniform(0, 3)), "tokens_per_s": float(rng.uniform(1e3, 1e5)),
                    "mfu": float(rng.uniform(0, 0.5)), "time": time.time()})
        if step % 20 == 0:
            out.append({"kind": "eval", "step": step, "val_loss": float(rng.uniform(2, 5)),
                        "train_loss": float(rng.uniform(2, 5))})
    out.append({"kind": "event", "event": "resume", "step": 20, "time": time.time()})  # not a scalar
    return out


def expected_scalars(recs) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list] = {}
    for r in recs:
        if r["kind"] in ("train", "eval"):
            for k, v in r.items():
                if k not in ("kind", "step", "time"):
                    out.setdefault(f"{r['kind']}/{k}", []).append((r["step"], v))
    return out


def test_tensorboard_events_hold_the_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recs = records()
    w = writers.TensorBoardWriter(tmp_path / "tb")
    for r in recs:
        w.write(r)
    w.close()
    ea = EventAccumulator(str(tmp_path / "tb"))
    ea.Reload()
    want = expected_scalars(recs)
    assert sorted(ea.Tags()["scalars"]) == sorted(want) and "train/mfu" in want and "eval/val_loss" in want
    for tag, pairs in want.items():
        got = [(e.step, e.value) for e in ea.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in pairs]
        np.testing.assert_allclose([v for _, v in got], [v for _, v in pairs], rtol=1e-6)  # stored as float32


def read_wandb_history(run_file) -> list[dict]:
    """History records of a W&B run file: a LevelDB-style log (7-byte file header, 32 KiB blocks of records
    with a 7-byte header: crc32, length, type) of wandb `Record` protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw, pos, block, out, cur = run_file.read_bytes(), 7, 32768, [], b""
    assert raw[:4] == b":W&B"
    while pos + 7 <= len(raw):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if pos + 7 + n > len(raw):  # a record still being written
            break
        cur, pos = cur + raw[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # a full record, or the last piece of one
            r = pb.Record()
            r.ParseFromString(cur)
            if r.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): i.value_json for i in r.history.item}
                out.append({k: float(v) for k, v in items.items() if not k.startswith("_")})
            cur = b""
    return out


def test_wandb_offline_run_holds_the_history(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = ml_collections.ConfigDict({"wandb": {"project": "jaxgpt-test", "name": None}, "tensorboard": False,
                                        "lr": 1e-3})
    w = writers.from_config(config, tmp_path)
    assert [type(x).__name__ for x in w.writers] == ["WandbWriter"]
    recs = records(1)
    for r in recs:
        w.write(r)
    w.close()
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    want = [{"step": r["step"], **{f"{r['kind']}/{k}": v for k, v in r.items() if k not in ("kind", "step", "time")}}
            for r in recs if r["kind"] != "event"]
    deadline = time.monotonic() + 20  # wandb-core writes the file in its own process, a moment after finish()
    while len(got := read_wandb_history(run_file)) < len(want) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(got) == len(want)
    for g, e in zip(got, want):
        assert g.keys() == e.keys()
        np.testing.assert_allclose([g[k] for k in e], [e[k] for k in e], rtol=1e-12)
    assert (tmp_path / "wandb_run_id").read_text() in run_file.name  # a resumed run continues this id


def test_scalars_and_missing_wandb(monkeypatch):
    assert writers.scalars({"kind": "event", "step": 3, "x": 1.0}) == {}
    assert writers.scalars({"kind": "train", "step": 3, "loss": 2, "ok": True, "name": "a"}) == {"train/loss": 2.0}
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    with pytest.raises(ImportError, match="pip install wandb or unset config.wandb.project"):
        writers.WandbWriter("p", ".")


def test_from_config_tensorboard_by_default(tmp_path):
    w = writers.from_config(ml_collections.ConfigDict({"lr": 1.0}), tmp_path)
    assert [type(x).__name__ for x in w.writers] == ["TensorBoardWriter"]
    w.write({"kind": "train", "step": 1, "loss": 1.5})
    w.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_tensorboard_writer_leaves_torch_unimported(tmp_path):
    """tensorboardX would import PyTorch (seconds per run) only to accept torch tensors; the writer hides it
    during that import, and torch imports normally afterwards."""
    code = ("import sys; from jaxgpt.train import writers; w = writers.TensorBoardWriter(sys.argv[1]); "
            "w.write({'kind': 'train', 'step': 1, 'loss': 2.0}); w.close(); print('torch' in sys.modules); "
            "import importlib.util; print(importlib.util.find_spec('torch') is not None and "
            "__import__('torch').ones(2).sum().item() == 2.0)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "True"] and list(tmp_path.glob("events.out.tfevents.*"))


# ---------------------------------------------------------------------------------------------------------
# Batching


class ListWriter:
    batched = True  # like TensorBoardWriter and WandbWriter

    def __init__(self, fail: bool = False) -> None:
        self.batches: list[list[dict]] = []
        self.closed, self.fail = False, fail

    def write_many(self, records) -> None:
        self.batches.append(list(records))
        if self.fail:
            raise OSError(28, "No space left on device")

    def close(self) -> None:
        self.closed = True


class OneByOne:  # like MetricsLog: not batched
    def __init__(self) -> None:
        self.records: list[dict] = []

    def write(self, record) -> None:
        self.records.append(record)

    def close(self) -> None:
        pass


def test_batched_writers_get_records_in_order_every_n_records_and_the_rest_at_close_the_others_at_once():
    a, b = ListWriter(), OneByOne()
    w = writers.Writers([a, b], every=4, max_delay_s=1e9)
    recs = [{"kind": "train", "step": s, "loss": float(s)} for s in range(10)]
    for r in recs[:3]:
        w.write(r)
    assert a.batches == [] and b.records == recs[:3]  # kept for the batched writer only
    for r in recs[3:]:
        w.write(r)
    assert a.batches == [recs[0:4], recs[4:8]] and b.records == recs
    w.close()
    assert a.batches == [recs[0:4], recs[4:8], recs[8:]] and a.closed
    assert writers.TensorBoardWriter.batched and writers.WandbWriter.batched
    assert not getattr(metrics.MetricsLog, "batched", False)  # metrics.jsonl: every record at once


def test_writers_flush_at_once_and_after_max_delay():
    a = ListWriter()
    w = writers.Writers([a], every=1000, max_delay_s=0.05)
    w.write({"kind": "train", "step": 0})
    w.flush()
    assert a.batches == [[{"kind": "train", "step": 0}]]
    w.flush()  # nothing kept: no empty batch
    w.write({"kind": "train", "step": 1})
    time.sleep(0.06)
    w.write({"kind": "train", "step": 2})  # the oldest kept one waited past max_delay_s: both go
    assert a.batches[1:] == [[{"kind": "train", "step": 1}, {"kind": "train", "step": 2}]]
    one = ListWriter()
    w1 = writers.Writers([one], every=1)
    w1.write({"kind": "train", "step": 5})
    assert one.batches == [[{"kind": "train", "step": 5}]]


def test_a_failing_writer_raises_but_the_others_get_the_batch_and_every_writer_is_closed():
    bad, good, now = ListWriter(fail=True), ListWriter(), OneByOne()
    w = writers.Writers([bad, good, now], every=2, max_delay_s=1e9)
    w.write({"kind": "train", "step": 0})
    with pytest.raises(OSError, match="No space left"):
        w.write({"kind": "train", "step": 1})
    assert good.batches == [[{"kind": "train", "step": 0}, {"kind": "train", "step": 1}]] and len(now.records) == 2
    w.write({"kind": "train", "step": 2})
    with pytest.raises(OSError, match="No space left"):
        w.close()
    assert bad.closed and good.closed and good.batches[-1] == [{"kind": "train", "step": 2}]


def test_tensorboard_writes_one_event_per_record_at_the_records_time(tmp_path):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    w = writers.TensorBoardWriter(tmp_path / "tb")
    recs = records(3)
    w.write_many(recs)
    w.close()
    w.close()  # twice: no error
    (path,) = (tmp_path / "tb").glob("events.out.tfevents.*")
    events = list(EventFileLoader(str(path)).Load())
    assert events[0].file_version == "brain.Event:2"
    scalar_recs = [r for r in recs if r["kind"] != "event"]
    assert len(events) == 1 + len(scalar_recs)
    for e, r in zip(events[1:], scalar_recs):
        assert e.step == r["step"] and len(e.summary.value) == len(writers.scalars(r))
        if "time" in r:
            assert e.wall_time == r["time"]
