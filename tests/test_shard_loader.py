"""jaxgpt.data.shard_loader: batches against windows enumerated one by one, determinism, per-process rows, two JAX
processes (gloo) giving the one-process global batch, the prefetcher, vocabulary and file errors."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import xla_env

from jaxgpt.data import shard_loader as loader
from jaxgpt.data import shards
from jaxgpt.data.memmap import batch_rng

REPO = Path(__file__).resolve().parents[1]
SIZES = (700, 41, 1200, 300, 513)  # shard 1 is too short for a window of 65: it is never drawn
B, T, SEED = 8, 64, 1234


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(7)
    shards.write_shard(d / "x_val_000000.bin", rng.integers(0, 50257, size=200))
    for i, n in enumerate(SIZES):
        shards.write_shard(d / f"x_train_{i + 1:06d}.bin", rng.integers(0, 50257, size=n))
    return d


def reference_batch(d: Path, step: int, split: str = "train", stream: int = 0):
    """Every window listed explicitly (shard, start), then the RNG's draws index that list."""
    files = sorted(d.glob(f"*_{split}_*.bin"))
    tokens = [np.fromfile(f, dtype="<u2", offset=1024) for f in files]
    windows = [(k, s) for k, t in enumerate(tokens) for s in range(len(t) - T)]
    picks = batch_rng(SEED, step, split, stream).integers(0, len(windows), size=B)
    rows = np.stack([tokens[k][s:s + T + 1] for k, s in (windows[i] for i in picks)]).astype(np.int32)
    return rows[:, :-1], rows[:, 1:]


def test_batches_are_windows_fixed_by_seed_and_step(shard_dir):
    L = loader.ShardLoader(shard_dir, "train", B, T, SEED)
    assert L.n_tokens == sum(SIZES)
    for step in (0, 5, 99):
        x, y = L.batch_at(step)
        assert x.shape == y.shape == (B, T) and x.dtype == np.int32
        rx, ry = reference_batch(shard_dir, step)
        np.testing.assert_array_equal(x, rx)
        np.testing.assert_array_equal(y, ry)
    again = loader.ShardLoader(shard_dir, "train", B, T, SEED)  # a resumed run: a new loader, same batches
    np.testing.assert_array_equal(again.batch_at(5)[0], L.batch_at(5)[0])
    assert not np.array_equal(L.batch_at(6)[0], L.batch_at(5)[0])
    assert not np.array_equal(loader.ShardLoader(shard_dir, "train", B, T, SEED + 1).batch_at(5)[0], L.batch_at(5)[0])
    ev = loader.ShardLoader(shard_dir, "val", B, T, SEED, stream=1)
    np.testing.assert_array_equal(ev.batch_at(3)[0], reference_batch(shard_dir, 3, "val", 1)[0])
    # draws are uniform over windows: over many steps every usable shard is hit in proportion to its windows
    counts = np.bincount(np.concatenate([L.windows(s)[0] for s in range(400)]), minlength=len(SIZES))
    expected = np.maximum(np.array(SIZES) - T, 0) / sum(max(n - T, 0) for n in SIZES) * 400 * B
    assert counts[1] == 0 and np.all(np.abs(counts - expected) < 5 * np.sqrt(expected + 1))


def test_rows_subset_reads_only_those_rows(shard_dir):
    full = loader.ShardLoader(shard_dir, "train", B, T, SEED).batch_at(7)
    part = loader.ShardLoader(shard_dir, "train", B, T, SEED, rows=[4, 5, 6, 7]).batch_at(7)
    np.testing.assert_array_equal(part[0], full[0][4:])
    np.testing.assert_array_equal(part[1], full[1][4:])
    with pytest.raises(ValueError, match="rows must lie in"):
        loader.ShardLoader(shard_dir, "train", B, T, SEED, rows=[8])


def test_local_rows_and_global_batch_one_process(shard_dir):
    import jax

    from jaxgpt import sharding as sh

    mesh = sh.make_mesh()
    s0, s1 = sh.batch_sharding(mesh), sh.batch_sharding(mesh, batch_dim=1)
    np.testing.assert_array_equal(loader.local_rows(s0, (B, T)), np.arange(B))
    np.testing.assert_array_equal(loader.local_rows(s1, (2, 4, T), 1), np.arange(8))
    x, y = loader.ShardLoader(shard_dir, "train", B, T, SEED).batch_at(2)
    gx, gy = loader.global_batch(s1, (2, 4, T), (x, y), batch_dim=1)
    assert isinstance(gx, jax.Array) and gx.shape == (2, 4, T)
    np.testing.assert_array_equal(np.asarray(gy), y.reshape(2, 4, T))


WORKER = textwrap.dedent("""
    import json, sys
    import numpy as np
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
    from jax.experimental import multihost_utils
    from jaxgpt import sharding as sh
    from jaxgpt.data import shard_loader as loader
    mesh = sh.make_mesh()
    out = {"process": jax.process_index(), "devices": jax.device_count()}
    for name, shape, dim in (("flat", (8, 64), 0), ("accum", (2, 4, 64), 1)):
        s = sh.batch_sharding(mesh, dim)
        rows = loader.local_rows(s, shape, dim)
        L = loader.ShardLoader(sys.argv[3], "train", 8, 64, 1234, rows=rows)
        gx, gy = loader.global_batch(s, shape, L.batch_at(11), batch_dim=dim)
        x = multihost_utils.process_allgather(gx, tiled=True)
        out[name] = {"rows": rows.tolist(), "x": np.asarray(x).tolist()}
    print("RESULT" + json.dumps(out))
""")


def test_two_processes_build_the_one_process_global_batch(shard_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = xla_env(2, PYTHONPATH=str(REPO))
    (tmp_path / "w.py").write_text(WORKER)
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "w.py"), f"127.0.0.1:{port}", str(i), str(shard_dir)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr[-3000:]
        outs.append(json.loads(stdout.split("RESULT", 1)[1]))
    ref = loader.ShardLoader(shard_dir, "train", B, T, SEED).batch_at(11)[0]  # [8, 64]
    for i, o in enumerate(outs):
        assert (o["process"], o["devices"]) == (i, 4)
        assert o["flat"]["rows"] == list(range(4 * i, 4 * i + 4))  # each process reads only its own rows
        assert o["accum"]["rows"] == [2 * i, 2 * i + 1, 4 + 2 * i, 5 + 2 * i]
        np.testing.assert_array_equal(o["flat"]["x"], ref)
        np.testing.assert_array_equal(o["accum"]["x"], ref.reshape(2, 4, T))


def test_prefetcher_runs_ahead_in_order_and_raises(shard_dir):
    L = loader.ShardLoader(shard_dir, "train", B, T, SEED)
    calls = []

    def fn(step):
        calls.append(step)
        return L.batch_at(step)

    with loader.Prefetcher(fn, start=10, depth=2) as pf:
        for want, (step, (x, _)) in zip(range(10, 14), pf):
            assert step == want
            np.testing.assert_array_equal(x, L.batch_at(step)[0])
        time.sleep(0.2)
        assert max(calls) <= 13 + 3  # bounded: at most depth ready plus one being built
    assert calls[:4] == [10, 11, 12, 13]

    def fails(step):
        if step == 2:
            raise ValueError("bad step 2")
        return step

    pf = loader.Prefetcher(fails)
    assert [next(pf)[1], next(pf)[1]] == [0, 1]
    with pytest.raises(ValueError, match="bad step 2"):
        next(pf)


def test_the_prefetcher_refills_in_bursts_waking_once_per_half_queue():
    """depth 8: the thread fills 8, then sleeps until the caller has taken 4, and builds those 4 in one burst;
    so it wakes at most once every 4 steps (later under load: bigger bursts, fewer wake-ups), never builds
    more than depth ahead, and the caller gets every step in order."""
    taken, calls = [0], []

    def fn(step):
        calls.append((step, taken[0]))
        return step * 10

    with loader.Prefetcher(fn, start=0, depth=8) as pf:
        time.sleep(0.1)
        assert len(calls) == 8  # filled, then asleep
        for want in range(40):
            step, value = next(pf)
            taken[0] += 1
            assert (step, value) == (want, want * 10)
            time.sleep(0.002)
    assert all(step < seen + 8 + 1 for step, seen in calls)  # at most depth ready, plus the one being built
    later = [seen for step, seen in calls if step >= 8]
    bursts = len(set(later))  # the calls of one burst see the same count taken (a burst takes microseconds)
    assert bursts <= len(later) / 2, calls  # 1/4 when nothing delays the thread; one wake-up a step would be 1


def test_vocab_and_file_errors(tmp_path, shard_dir):
    d = tmp_path / "v"
    d.mkdir()
    shards.write_shard(d / "v_train_000001.bin", np.r_[np.arange(100), 60000, np.arange(100)])
    L = loader.ShardLoader(d, "train", 4, 16, 0, vocab_size=50257)
    with pytest.raises(ValueError, match="v_train_000001.bin holds token id 60000 at offset 100, >= the model's"):
        L.check_vocab(50257)
    L.check_vocab(65536)
    bad = [s for s in range(50) if ((L.windows(s)[1] <= 100) & (L.windows(s)[1] + 16 >= 100)).any()]
    L.vocab_size = 50257
    with pytest.raises(ValueError, match="holds token id 60000 near offset .*vocab_size 50257"):
        L.batch_at(bad[0])
    with pytest.raises(FileNotFoundError, match="no \\*_train_\\*.bin shards"):
        loader.ShardLoader(tmp_path, "train", 4, 16, 0)
    with pytest.raises(ValueError, match="block_size \\+ 1 = 1201"):
        loader.ShardLoader(shard_dir, "train", 4, 1200, 0)
    (d / "v_train_000002.bin").write_bytes(b"\0" * 2000)
    with pytest.raises(ValueError, match="v_train_000002.bin has magic 0"):
        loader.ShardLoader(d, "train", 4, 16, 0)
    assert loader.is_shard_dir(d) and not loader.is_shard_dir(tmp_path)


def test_a_folder_whose_preparation_is_not_finished_is_refused_in_one_line(tmp_path, shard_dir):
    """A manifest with `complete: false` (an interrupted `python -m jaxgpt.data`) stops the loader and the run's data
    step, even when only the val shard is written; a complete manifest, or none (llm.c's shards), loads."""
    from jaxgpt.train.config import DataConfig
    from jaxgpt.train.run import ensure_data

    d = tmp_path / "partial"
    shutil.copytree(shard_dir, d)
    manifest = {"format": "llm.c uint16 v1", "shards": [], "complete": False, "resume": {"piece": 7, "offset": 3}}
    (d / "manifest.json").write_text(json.dumps(manifest))
    line = f"preparation of {d} is not finished: rerun the same `python -m jaxgpt.data` command"
    with pytest.raises(ValueError, match=f"^{re.escape(line)}$"):
        loader.ShardLoader(d, "train", B, T, SEED)
    data_cfg = DataConfig(dataset="pydoc", tokenizer="char", input="", bpe_path="", dir=str(d), val_fraction=0.1)
    for p in d.glob("*_train_*.bin"):  # stopped before the first training shard: not mistaken for an empty folder
        p.unlink()
    with pytest.raises(ValueError, match=f"^{re.escape(line)}$"):
        ensure_data(data_cfg, None)
    assert sorted(p.name for p in d.iterdir()) == ["manifest.json", "x_val_000000.bin"]  # nothing prepared into it
    (d / "manifest.json").write_text(json.dumps({**manifest, "complete": True}))
    assert loader.ShardLoader(d, "val", B, T, SEED).n_tokens == 200
