"""Workdirs in a Google Cloud Storage bucket, against a real GCS emulator (fake-gcs-server, the `gcs` fixture):
train.py on gs:// writes every file of a run into the bucket and nothing locally, resumes bitwise from it and
samples from it; a two-process run there resumes on two processes and on one; the bucket lock (generation
preconditions, heartbeat, stale takeover, WorkdirLost); the metrics log, TensorBoard events, atomic writes,
partial checkpoint steps, exports and adapters there; a failed save names the bucket. References: the same run
in a local workdir, tensorboard's own event reader, the local lock's messages, the arrays that were saved."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import chex
import numpy as np
import pytest
from helpers import REPO, free_port, xla_env

from jaxgpt.io import atomic, paths
from jaxgpt.io import lock as wl
from jaxgpt.io.workdir import Workdir
from jaxgpt.train import metrics, writers

# the tiny config made smaller still: checkpoints and evaluations at 5, 10, 15, 20
TINIEST = {"model.n_layer": 1, "model.n_embd": 16, "model.block_size": 16, "eval_iters": 1, "lr_decay_iters": 20,
           "warmup_iters": 2, "ckpt_interval": 5, "eval_interval": 5, "log_interval": 1, "sample_tokens": 8}


def names(url: str) -> set[str]:
    p = paths.as_path(url)
    return {c.name for c in p.iterdir()} if p.is_dir() else set()


def per_step(metrics_path, kind: str = "train") -> dict[int, dict]:
    return {r["step"]: r for r in metrics.read_metrics(metrics_path) if r.get("kind") == kind}


# ---------------------------------------------------------------------------------------------------------
# train.py with --workdir=gs://...


@pytest.fixture(scope="module")
def run_env(tmp_path_factory, gcs) -> dict[str, str]:
    """The subprocesses' environment: the emulator (set by `gcs`), a local cache for the bucket runs' data and a
    compilation cache shared by the runs of this file."""
    d = tmp_path_factory.mktemp("gcs_runs")
    return xla_env(JAXGPT_CACHE_DIR=str(d / "cache"), JAX_COMPILATION_CACHE_DIR=str(d / "jax_cache"),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def train_py(workdir: str | Path, max_iters: int, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "train.py"), f"--config={REPO / 'configs' / 'tiny.py'}", f"--workdir={workdir}",
           f"--config.max_iters={max_iters}", *(f"--config.{k}={v}" for k, v in TINIEST.items())]
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


@pytest.mark.run
def test_train_py_on_a_bucket_writes_there_resumes_bit_for_bit_and_samples(gcs, run_env, tmp_path, monkeypatch, capsys):
    """10 steps into the bucket, then the same command with max_iters=20 resuming there, against 20 steps
    trained straight through in a local workdir (one test, so that pytest-xdist runs the trainings once)."""
    url, cwd, ref = gcs() + "/run", tmp_path / "cwd", tmp_path / "ref"
    cwd.mkdir()
    train_py(url, 10, run_env, cwd)
    assert names(url + "/checkpoints") == {"5", "10"}
    train_py(url, 20, run_env, cwd)
    train_py(ref, 20, run_env, tmp_path)
    assert list(cwd.iterdir()) == []  # no ./gs: folder, nothing else either
    monkeypatch.setenv(paths.CACHE_ENV, run_env["JAXGPT_CACHE_DIR"])
    check_bucket_files(url, run_env)
    check_same_run(url, ref)
    check_tensorboard(url, tmp_path / "tb")
    check_samples(url, ref, capsys, tmp_path / "text.py")


def check_bucket_files(url: str, run_env: dict[str, str]) -> None:
    assert {"config.json", "tokenizer.json", "train_config.json", "checkpoints", "metrics.jsonl.parts", "tensorboard",
            "loss.png", "sample.txt"} == names(url)  # the lock object is gone: released at the end
    assert names(url + "/checkpoints") >= {"10", "15", "20"}
    assert paths.as_path(url + "/loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(paths.as_path(url + "/sample.txt").read_text()) == 8
    data = Workdir(url).data  # the memory-mapped dataset: a local folder of this machine
    assert str(data).startswith(run_env["JAXGPT_CACHE_DIR"]) and (data / "meta.json").is_file()


def check_same_run(url: str, ref: Path) -> None:
    """The run resumed from the bucket equals the one trained straight through, bit for bit."""
    got, want = per_step(url + "/metrics.jsonl"), per_step(ref / "metrics.jsonl")
    assert sorted(got) == sorted(want) == list(range(20))
    diff = [s for s in want if got[s]["loss"] != want[s]["loss"]]
    assert not diff, f"losses differ at steps {diff}"
    assert [r["val_loss"] for r in per_step(url + "/metrics.jsonl", "eval").values()] == \
           [r["val_loss"] for r in per_step(ref / "metrics.jsonl", "eval").values()]
    assert [r["step"] for r in metrics.read_metrics(url + "/metrics.jsonl") if r.get("event") == "resume"] == [10]
    chex.assert_trees_all_equal(Workdir(url).load(20)[1], Workdir(ref).load(20)[1])


def check_tensorboard(url: str, local: Path) -> None:
    """The event files in the bucket, read by tensorboard's own reader, hold every logged loss."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    local.mkdir()
    for f in paths.as_path(url + "/tensorboard").iterdir():
        (local / f.name).write_bytes(f.read_bytes())
    ea = EventAccumulator(str(local))
    ea.Reload()
    want = per_step(url + "/metrics.jsonl")
    got = [(e.step, e.value) for e in ea.Scalars("train/loss")]
    assert [s for s, _ in got] == sorted(want)
    np.testing.assert_allclose([v for _, v in got], [want[s]["loss"] for s, _ in got], rtol=1e-6)  # float32


def check_samples(url: str, ref: Path, capsys, text_file: Path) -> None:
    """`python -m jaxgpt.sample` and `python -m jaxgpt.eval perplexity` with --init-from gs://... print what they
    print for the local run (its result also written into the bucket with --output)."""
    from jaxgpt import sample
    from jaxgpt.eval.__main__ import main as eval_main

    text_file.write_text("def main(argv):\n    return sorted(set(argv))\n" * 3)
    outs, results = [], []
    for init_from in (url, str(ref)):
        assert sample.main(["--init-from", init_from, "--prompt", "def ", "--max-new-tokens", "12", "--seed", "3"]) == 0
        outs.append(capsys.readouterr().out)
        assert eval_main(["perplexity", "--init-from", init_from, "--file", str(text_file),
                          "--output", url + "/ppl.json"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert outs[0] == outs[1] and outs[0].startswith("def ") and len(outs[0]) == len("def ") + 12 + 1
    assert results[0] == results[1] and results[0]["ppl"] > 1
    assert json.loads(paths.as_path(url + "/ppl.json").read_text()) == results[1]


# ---------------------------------------------------------------------------------------------------------
# Two processes (gloo collectives on localhost, one CPU device each) on one bucket workdir


def train_py_processes(workdir: str, n: int, data_dir: Path, env: dict[str, str], cwd: Path) -> None:
    """`train.py` as the n processes of one run (n=1: a plain single-process run), to max_iters=20."""
    port, procs = free_port(), []
    for i in range(n):
        dist = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(n),
                "JAX_PROCESS_ID": str(i)} if n > 1 else {}
        cmd = [sys.executable, str(REPO / "train.py"), f"--config={REPO / 'configs' / 'tiny.py'}",
               f"--workdir={workdir}", "--config.max_iters=20", f"--config.data.dir={data_dir}",
               *(f"--config.{k}={v}" for k, v in {**TINIEST, "sample_tokens": 0, "tensorboard": False}.items())]
        log = open(cwd / f"{workdir.rsplit('/', 1)[-1]}_{i}.log", "w")  # noqa: SIM115 - closed below
        procs.append((subprocess.Popen(cmd, cwd=cwd, env={**env, **dist}, stdout=log, stderr=subprocess.STDOUT), log))
    for p, log in procs:
        code = p.wait(timeout=600)
        log.close()
        assert code == 0, Path(log.name).read_text()[-3000:]


def copy_step(src: str, dst: str, step: int) -> None:
    """A workdir holding only `src`'s identity files and its checkpoint of `step` (as if saved at `step` last)."""
    for name in ("config.json", "tokenizer.json", "train_config.json"):
        paths.as_path(f"{dst}/{name}").write_bytes(paths.as_path(f"{src}/{name}").read_bytes())
    folder = paths.as_path(f"{src}/checkpoints/{step}")
    for f in paths.files_under(folder):
        (paths.as_path(f"{dst}/checkpoints/{step}") / str(f.relative_to(folder))).write_bytes(f.read_bytes())


@pytest.mark.run
def test_a_two_process_run_in_a_bucket_resumes_bitwise_on_two_processes_and_on_one_on_another_mesh(
        gcs, run_env, pydoc_char_dir, tmp_path):
    """Two processes train 20 steps into the bucket (orbax writes the checkpoints from both, process 0 the rest);
    its checkpoint of step 10 alone, resumed by two processes, gives its steps 10..19 bit for bit, and resumed by
    one process (one device: another mesh) gives them within float32 rounding."""
    straight, resumed, one = gcs() + "/straight", gcs() + "/resumed", gcs() + "/one"
    train_py_processes(straight, 2, pydoc_char_dir, run_env, tmp_path)
    assert {"10", "15", "20"} <= names(straight + "/checkpoints") and "metrics.jsonl.parts" in names(straight)
    for wd in (resumed, one):
        copy_step(straight, wd, 10)
    train_py_processes(resumed, 2, pydoc_char_dir, run_env, tmp_path)
    train_py_processes(one, 1, pydoc_char_dir, run_env, tmp_path)
    want = {s: r["loss"] for s, r in per_step(straight + "/metrics.jsonl").items() if s >= 10}
    assert sorted(want) == list(range(10, 20))
    assert {s: r["loss"] for s, r in per_step(resumed + "/metrics.jsonl").items()} == want
    chex.assert_trees_all_equal(Workdir(resumed).load(20)[1], Workdir(straight).load(20)[1])
    got = per_step(one + "/metrics.jsonl")
    assert sorted(got) == sorted(want)
    np.testing.assert_allclose([got[s]["loss"] for s in want], list(want.values()), rtol=1e-5)
    chex.assert_trees_all_close(Workdir(one).load(20)[1], Workdir(straight).load(20)[1], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# The bucket lock


def as_host(monkeypatch, host: str) -> None:
    """Locks taken from now on record `host` as their holder's host (a run on another machine)."""
    real = wl.me
    monkeypatch.setattr(wl, "me", lambda: {**real(), "host": host})


def test_a_second_run_on_a_bucket_workdir_is_refused_in_one_line_naming_the_holder(gcs):
    url = gcs()
    with wl.WorkdirLock(url) as held:
        assert isinstance(held, wl.BucketLock) and held.taken_over is None
        with pytest.raises(wl.WorkdirLocked) as e:
            wl.WorkdirLock(url).acquire()
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held.holder["started"]))
        msg = str(e.value)
        assert "\n" not in msg and f"{url} is in use by another training run (host {socket.gethostname()}, PID " \
               f"{os.getpid()}, started {started}); wait for it to end or stop it, or use another --workdir (if " \
               f"that run is gone, delete {url}/.lock)" == msg
        assert wl.holder_of(url)["token"] == held.holder["token"]
        held.check()  # still its own
    assert ".lock" not in names(url)  # released
    wl.WorkdirLock(url).acquire().release()  # and free again


def test_a_stale_bucket_lock_is_taken_over_and_its_old_holder_stops_at_its_next_check(gcs, monkeypatch):
    url = gcs()
    as_host(monkeypatch, "node-17")
    old = wl.WorkdirLock(url, heartbeat_s=3600, stale_after_s=0.5).acquire()  # stalls: no heartbeat
    monkeypatch.undo()
    with pytest.raises(wl.WorkdirLocked, match="host node-17"):
        wl.WorkdirLock(url, stale_after_s=0.5).acquire()
    time.sleep(0.6)
    new = wl.WorkdirLock(url, stale_after_s=0.5).acquire()
    assert re.fullmatch(r"took over the lock of host node-17, PID \d+, started .*: no heartbeat from host node-17 "
                        r"for \d+ s", new.taken_over), new.taken_over
    with pytest.raises(wl.WorkdirLost, match=rf"lost its lock by host {socket.gethostname()}, PID {os.getpid()}, "
                                             r".*the other run keeps the workdir") as e:
        old.check()
    assert "\n" not in str(e.value)
    old.release()  # never removes the lock taken over since
    assert wl.holder_of(url)["token"] == new.holder["token"]
    new.release()
    assert ".lock" not in names(url)


def test_a_bucket_lock_of_a_dead_process_on_this_host_is_taken_over_at_once(gcs):
    url = gcs()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    paths.as_path(url + "/.lock").write_text(json.dumps({**wl.me(), "pid": dead.pid}))
    with wl.WorkdirLock(url) as lock:  # the default STALE_AFTER_S: the PID alone says it is gone
        assert lock.taken_over.endswith(f": PID {dead.pid} is gone"), lock.taken_over


def test_a_live_holder_on_this_host_is_never_taken_over_however_old_its_lock(gcs):
    url = gcs()
    with wl.WorkdirLock(url, heartbeat_s=3600, stale_after_s=0.1):
        time.sleep(0.2)
        with pytest.raises(wl.WorkdirLocked, match=f"PID {os.getpid()}"):
            wl.WorkdirLock(url, stale_after_s=0.1).acquire()


def test_two_takers_of_one_generation_cannot_both_win(gcs):
    from google.api_core.exceptions import PreconditionFailed

    url = gcs()
    a, b = wl.WorkdirLock(url), wl.WorkdirLock(url)
    generation = a._write(wl.me(), 0)  # created only if absent
    with pytest.raises(PreconditionFailed):
        b._write(wl.me(), 0)
    assert a._write(wl.me(), generation) > generation  # the first taker of that generation wins
    with pytest.raises(PreconditionFailed):
        b._write(wl.me(), generation)  # the second finds it replaced


@pytest.mark.parametrize("stale", [False, True], ids=["fresh", "stale"])
def test_racing_starters_on_a_bucket_get_exactly_one_holder(gcs, monkeypatch, stale):
    url = gcs()
    if stale:  # a lock of a silent host: every starter tries to take it over at once
        as_host(monkeypatch, "node-17")
        wl.WorkdirLock(url, heartbeat_s=3600).acquire()._stop.set()
        monkeypatch.undo()
        time.sleep(0.3)
    barrier, outcome = threading.Barrier(4), []

    def start() -> None:
        lock = wl.WorkdirLock(url, heartbeat_s=3600, stale_after_s=0.2)
        barrier.wait()
        try:
            outcome.append(lock.acquire())
        except wl.WorkdirLocked as e:
            outcome.append(e)

    threads = [threading.Thread(target=start) for _ in range(4)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    holders = [x for x in outcome if isinstance(x, wl.BucketLock)]
    assert len(outcome) == 4 and len(holders) == 1, outcome
    assert wl.holder_of(url)["token"] == holders[0].holder["token"]
    assert all("is in use by another training run" in str(x) for x in outcome if x is not holders[0])
    holders[0].release()


def test_the_heartbeat_rewrites_the_lock_and_finds_it_replaced(gcs):
    url = gcs()
    lock = wl.WorkdirLock(url, heartbeat_s=0.05).acquire()
    first = lock.generation
    deadline = time.time() + 20
    while lock.generation == first and time.time() < deadline:
        time.sleep(0.02)
    assert lock.generation != first and not lock.lost  # beating
    paths.as_path(url + "/.lock").write_text(json.dumps({**wl.me(), "host": "node-3", "pid": 99}))
    while not lock.lost and time.time() < deadline:
        time.sleep(0.02)
    assert lock.lost
    with pytest.raises(wl.WorkdirLost, match=r"by host node-3, PID 99"):
        lock.check()
    lock.release()
    assert wl.holder_of(url)["host"] == "node-3"


def test_a_write_of_the_lock_whose_answer_was_lost_still_counts_as_this_runs(gcs, monkeypatch):
    """The client retries a write whose answer was lost; the retry meets the write itself (412). Acquiring and
    the heartbeat then read the object, find this run's token and go on."""
    from google.api_core.exceptions import PreconditionFailed

    url = gcs()
    lock = wl.WorkdirLock(url, heartbeat_s=0.05)
    real, calls = lock._write, []

    def landed_then_412(holder, generation):
        calls.append(real(holder, generation))
        raise PreconditionFailed("conditionNotMet (the retry of a write that landed)")

    monkeypatch.setattr(lock, "_write", landed_then_412)
    lock.acquire()
    assert lock.generation == calls[0] and lock.taken_over is None
    deadline = time.time() + 20
    while len(calls) < 3 and time.time() < deadline:
        time.sleep(0.02)
    assert len(calls) >= 3 and not lock.lost  # it kept beating
    lock.check()
    lock.release()
    assert ".lock" not in names(url)


def test_a_foreign_object_and_a_missing_bucket_are_refused_with_the_fix(gcs):
    url = gcs()
    paths.as_path(url + "/.lock").write_text("{not json")
    with pytest.raises(wl.WorkdirLocked, match=r"is not a jaxgpt lock file; if no run uses .* delete it"):
        wl.WorkdirLock(url).acquire()
    with pytest.raises(FileNotFoundError, match=r"the bucket no-such-bucket does not exist .*gcloud storage buckets "
                                                r"create gs://no-such-bucket"):
        wl.WorkdirLock("gs://no-such-bucket/run").acquire()


# ---------------------------------------------------------------------------------------------------------
# The files of a run in a bucket


def random_records(rng: np.random.Generator, steps: range) -> list[dict]:
    return [{"kind": "train", "step": s, "loss": float(rng.uniform(1, 5)), "time": time.time()} for s in steps]


def test_the_metrics_log_in_a_bucket_writes_one_object_per_batch_and_reads_back_like_a_local_one(gcs, tmp_path):
    rng = np.random.default_rng(0)
    url = gcs()
    first, resumed = random_records(rng, range(6)), random_records(rng, range(4, 9))  # resumed from step 4
    for path in (url + "/metrics.jsonl", tmp_path / "metrics.jsonl"):
        log = metrics.MetricsLog(path)
        log.write_many(first[:3])
        log.write_many(first[3:])
        log = metrics.MetricsLog(path)  # a new run numbers its parts on
        log.write_many([{"kind": "event", "event": "resume", "step": 4}, *resumed])
    assert metrics.MetricsLog(url + "/metrics.jsonl").batched and not hasattr(metrics.MetricsLog(tmp_path / "m"),
                                                                              "batched")
    assert names(url) == {"metrics.jsonl.parts"}
    assert names(url + "/metrics.jsonl.parts") == {"00000000.jsonl", "00000001.jsonl", "00000002.jsonl"}
    got, want = metrics.read_metrics(url + "/metrics.jsonl"), metrics.read_metrics(tmp_path / "metrics.jsonl")
    assert got == want and [r["loss"] for r in got if r["kind"] == "train"] == \
           [r["loss"] for r in first[:4] + resumed]  # later records of a step win
    # a workdir copied into the bucket: its metrics.jsonl is read first, then the parts
    copied = "".join(json.dumps({"kind": "train", "step": s, "loss": 0.5}) + "\n" for s in (2, 99))
    paths.as_path(url + "/metrics.jsonl").write_text(copied)
    got = per_step(url + "/metrics.jsonl")
    assert got[2]["loss"] == first[2]["loss"] and got[99]["loss"] == 0.5


def test_tensorboard_writes_a_bucket_logdir_as_numbered_event_files_tensorboard_reads(gcs, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rng = np.random.default_rng(1)
    url = gcs() + "/tensorboard"
    recs = random_records(rng, range(0, 40, 4))
    w = writers.Writers([writers.TensorBoardWriter(url)], every=3)
    for r in recs:
        w.write(r)
    w.close()
    files = sorted(names(url))
    assert len(files) == 1 + 4 and all(re.fullmatch(r"events\.out\.tfevents\.\d{10}\..+\.\d{8}", f) for f in files)
    for f in files:
        (tmp_path / f).write_bytes(paths.as_path(f"{url}/{f}").read_bytes())
    ea = EventAccumulator(str(tmp_path))
    ea.Reload()
    got = [(e.step, e.value) for e in ea.Scalars("train/loss")]
    assert [s for s, _ in got] == [r["step"] for r in recs]
    np.testing.assert_allclose([v for _, v in got], [r["loss"] for r in recs], rtol=1e-6)  # stored as float32


def test_atomic_writes_in_a_bucket_replace_each_object_whole(gcs):
    url = gcs()
    assert atomic.write_json(url + "/a.json", {"x": 1}) == paths.as_path(url + "/a.json")
    with atomic.file(url + "/b.bin") as tmp:
        assert isinstance(tmp, Path)  # a local file, uploaded in one write
        tmp.write_bytes(b"\x00\x01")
    assert json.loads(paths.as_path(url + "/a.json").read_text()) == {"x": 1}
    assert paths.as_path(url + "/b.bin").read_bytes() == b"\x00\x01"
    with pytest.raises(RuntimeError), atomic.file(url + "/b.bin") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert paths.as_path(url + "/b.bin").read_bytes() == b"\x00\x01"  # the old object is untouched
    for files in ({"w.bin": b"1", "meta.json": b"{}", "sub/x": b"x"}, {"w.bin": b"2", "meta.json": b"[]"}):
        with atomic.directory(url + "/dir", force=True) as tmp:
            for name, data in files.items():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                (tmp / name).write_bytes(data)
    folder = paths.as_path(url + "/dir")
    got = {str(p.relative_to(folder)): p.read_bytes() for p in paths.files_under(folder)}
    assert got == {"w.bin": b"2", "meta.json": b"[]"}  # the old folder's other files are gone
    with pytest.raises(FileExistsError, match="already exists; pick a new path or pass force=True"), \
            atomic.directory(url + "/dir"):
        pass


def test_a_failed_save_into_a_bucket_names_the_bucket_and_the_error_not_a_disk(gcs):
    from jaxgpt.train.hooks import save_error

    ckpt = paths.as_path(gcs() + "/checkpoints")
    err = save_error(3, ckpt, 2, PermissionError(13, "403 Forbidden: storage.objects.create denied"))
    msg = str(err)
    assert "\n" not in msg and f"saving checkpoint step 3 to {ckpt} failed (PermissionError: " in msg
    assert f"bucket {paths.bucket_and_key(ckpt)[0]}" in msg and "step 2 is kept and restorable" in msg
    assert "MiB free" not in msg and "disk mounted" not in msg


def test_a_step_saved_part_way_into_a_bucket_is_ignored_by_readers_and_removed_by_the_next_run(gcs):
    """In a bucket orbax writes a step in place and commits it last: a step folder without its commit file (a save
    in progress, or a killed one) is neither listed nor refused, and the next training run's manager removes it."""
    import jax

    from jaxgpt.io import checkpoint
    from jaxgpt.nn.config import GPTConfig
    from jaxgpt.nn.model import init_params

    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8)
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(x.dtype),
                          jax.eval_shape(lambda: init_params(cfg, 3)))
    url = gcs()
    wd = Workdir(url)
    mngr = checkpoint.run_checkpoint_manager(wd.checkpoints)
    checkpoint.save_run_step(mngr, 5, params=params, optimizer={"step": np.int32(5)}, meta={"step": 5})
    mngr.close()
    assert (wd.checkpoint(5) / checkpoint.ORBAX_COMMIT_FILE).exists()
    atomic.write_json(wd.model_config, cfg.to_dict())
    atomic.write_json(wd.tokenizer, {"kind": "char", "chars": "abcdefghijk", "vocab_size": 11})
    (wd.checkpoint(6) / "params" / "partial").write_bytes(b"half a save")  # no commit file
    _, got, _ = wd.load()
    chex.assert_trees_all_equal(got, params)
    assert wd.checkpoint(6).is_dir()  # a reader leaves it alone
    mngr = checkpoint.run_checkpoint_manager(wd.checkpoints)  # as the next training run opens it
    assert sorted(mngr.all_steps()) == [5]
    checkpoint.check_run_checkpoints(wd.checkpoints, [5])
    mngr.close()
    assert names(str(wd.checkpoints)) == {"5"}
    (wd.checkpoints / "7x").write_text("a stranger")  # anything else is still refused
    with pytest.raises(ValueError, match=r"holds \['7x'\], which are not complete orbax checkpoints"):
        checkpoint.check_run_checkpoints(wd.checkpoints, [5])


def test_a_hugging_face_export_and_lora_adapters_saved_into_a_bucket_read_back_exactly(gcs, tmp_path):
    import jax
    from helpers import random_params

    from jaxgpt import lora
    from jaxgpt.io.hf import export_hf_gpt2, load_hf_gpt2
    from jaxgpt.nn.config import GPTConfig

    cfg = GPTConfig(vocab_size=37, block_size=16, n_layer=2, n_head=2, n_embd=16)
    params = random_params(cfg, seed=5, norm_scales="uniform")
    url = gcs()
    assert str(export_hf_gpt2(cfg, params, url + "/hf")) == url + "/hf"
    assert names(url + "/hf") == {"config.json", "model.safetensors"}
    got_cfg, got = load_hf_gpt2(url + "/hf")  # read from the bucket, as --init-from gs://.../hf does
    assert got_cfg == cfg
    chex.assert_trees_all_equal(got, params)
    lcfg = lora.LoraConfig(rank=2, alpha=3.0, targets=("attn/c_attn", "mlp/c_fc"))
    rng = np.random.default_rng(6)
    adapters = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(x.dtype), lora.init_lora(0, params, lcfg))
    lora.save_adapters(url + "/lora", adapters, lcfg)
    local = tmp_path / "lora"
    local.mkdir()
    for f in paths.as_path(url + "/lora").iterdir():
        (local / f.name).write_bytes(f.read_bytes())
    for where in (local, url + "/lora"):  # a local copy, and straight from the bucket (--adapters gs://...)
        got_adapters, got_lcfg = lora.load_adapters(where, params)
        assert got_lcfg == lcfg
        chex.assert_trees_all_equal(got_adapters, adapters)
    lora.save_peft(url + "/peft", adapters, lcfg)
    got_adapters, got_lcfg = lora.load_peft(url + "/peft", params)
    chex.assert_trees_all_equal(got_adapters, adapters)
    with pytest.raises(FileNotFoundError, match=f"{url}/nothing/lora.json does not exist"):
        lora.load_adapters(url + "/nothing", params)
    with pytest.raises(FileExistsError, match="already exists"):
        lora.save_adapters(url + "/lora", adapters, lcfg)
