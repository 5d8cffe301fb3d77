"""jaxgpt.data.batches: the [A, B, T] batch of each training step and the fixed evaluation batches, for a memmap
corpus and for a folder of llm.c shards, against windows cut here from the same random tokens with NumPy (the
starts drawn by the documented RNG of each (seed, split, step, stream)); placing them on a device; prefetching."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

from jaxgpt.data import batches, shards
from jaxgpt.data.memmap import batch_rng

A, B, T, SEED, EVAL_ITERS = 3, 2, 16, 91, 2
VOCAB = 50257


@pytest.fixture(scope="module")
def memmap_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("memmap")
    rng = np.random.default_rng(0)
    rng.integers(0, 65, 5000, dtype=np.uint16).tofile(d / "train.bin")
    rng.integers(0, 65, 800, dtype=np.uint16).tofile(d / "val.bin")
    return d


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(1)
    shards.write_shard(d / "x_val_000000.bin", rng.integers(0, VOCAB, size=300))
    for i, n in enumerate((400, 250, 900)):
        shards.write_shard(d / f"x_train_{i + 1:06d}.bin", rng.integers(0, VOCAB, size=n))
    return d


def _memmap_windows(tokens: np.ndarray, rows: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Windows [s, s+T] at starts drawn uniformly from [0, len - T), cut one by one."""
    starts = rng.integers(0, len(tokens) - T, size=rows)
    w = np.stack([tokens[s:s + T + 1] for s in starts]).astype(np.int32)
    return w[:, :-1], w[:, 1:]


def _shard_windows(d: Path, split: str, rows: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Every window of every shard listed as (shard, start); the RNG's draws index that list."""
    tokens = [np.fromfile(f, dtype="<u2", offset=1024) for f in sorted(d.glob(f"*_{split}_*.bin"))]
    windows = [(k, s) for k, t in enumerate(tokens) for s in range(len(t) - T)]
    picks = rng.integers(0, len(windows), size=rows)
    w = np.stack([tokens[k][s:s + T + 1] for k, s in (windows[i] for i in picks)]).astype(np.int32)
    return w[:, :-1], w[:, 1:]


def _batches(d: Path) -> batches.TrainBatches:
    return batches.TrainBatches(d, seed=SEED, accum=A, batch=B, block=T, eval_iters=EVAL_ITERS)


# ---------------------------------------------------------------------------------------------------------
# A memmap corpus (train.bin / val.bin)


def test_memmap_step_batch_is_a_times_b_windows_in_row_order(memmap_dir):
    tb = _batches(memmap_dir)
    assert not tb.shards
    tokens = np.fromfile(memmap_dir / "train.bin", dtype=np.uint16)
    for step in (0, 1, 37):
        x, y = tb.host(step)
        assert x.shape == y.shape == (A, B, T) and x.dtype == np.int32
        wx, wy = _memmap_windows(tokens, A * B, batch_rng(SEED, step, "train"))
        np.testing.assert_array_equal(x, wx.reshape(A, B, T))  # micro-batch a holds rows a*B ... a*B + B - 1
        np.testing.assert_array_equal(y, wy.reshape(A, B, T))


def test_memmap_batches_depend_on_the_seed_and_step_only(memmap_dir):
    tb, again = _batches(memmap_dir), _batches(memmap_dir)  # a resumed run builds a new one
    np.testing.assert_array_equal(tb.host(5)[0], again.host(5)[0])
    assert not np.array_equal(tb.host(5)[0], tb.host(6)[0])
    other = batches.TrainBatches(memmap_dir, seed=SEED + 1, accum=A, batch=B, block=T, eval_iters=EVAL_ITERS)
    assert not np.array_equal(tb.host(5)[0], other.host(5)[0])


def test_memmap_eval_sets_are_fixed_windows_of_each_split_on_their_own_stream(memmap_dir):
    tb = _batches(memmap_dir)
    assert sorted(tb.eval_sets) == ["train", "val"]
    for split in ("train", "val"):
        tokens = np.fromfile(memmap_dir / f"{split}.bin", dtype=np.uint16)
        assert len(tb.eval_sets[split]) == EVAL_ITERS
        for k, (x, y) in enumerate(tb.eval_sets[split]):
            wx, wy = _memmap_windows(tokens, B, batch_rng(SEED, k, split, stream=1))
            np.testing.assert_array_equal(x, wx)
            np.testing.assert_array_equal(y, wy)
    assert not np.array_equal(tb.eval_sets["train"][0][0], tb.host(0)[0][0])  # not the training stream


# ---------------------------------------------------------------------------------------------------------
# A folder of llm.c shards


def test_shard_step_batch_is_a_times_b_windows_placed_as_a_b_t(shard_dir):
    tb = _batches(shard_dir)
    assert tb.shards
    for step in (0, 3):
        host = tb.host(step)
        wx, wy = _shard_windows(shard_dir, "train", A * B, batch_rng(SEED, step, "train"))
        np.testing.assert_array_equal(host[0], wx)  # the loader's rows, [A * B, T]
        x, y = tb.place(host)
        assert isinstance(x, jax.Array) and x.shape == y.shape == (A, B, T)
        np.testing.assert_array_equal(np.asarray(x), wx.reshape(A, B, T))
        np.testing.assert_array_equal(np.asarray(y), wy.reshape(A, B, T))


def test_shard_eval_sets_are_fixed_windows_of_each_split_on_their_own_stream(shard_dir):
    tb = _batches(shard_dir)
    for split in ("train", "val"):
        assert len(tb.eval_sets[split]) == EVAL_ITERS
        for k, (x, y) in enumerate(tb.eval_sets[split]):
            wx, wy = _shard_windows(shard_dir, split, B, batch_rng(SEED, k, split, stream=1))
            np.testing.assert_array_equal(x, wx)
            np.testing.assert_array_equal(y, wy)


def test_shard_ids_past_the_vocabulary_are_refused(shard_dir):
    tb = batches.TrainBatches(shard_dir, seed=SEED, accum=A, batch=B, block=T, eval_iters=1, vocab_size=1000)
    with pytest.raises(ValueError, match="1000"):
        tb.host(0)


# ---------------------------------------------------------------------------------------------------------
# Placing and prefetching


def test_place_puts_the_memmap_batch_on_the_device_unchanged(memmap_dir):
    tb = _batches(memmap_dir)
    host = tb.host(2)
    x, y = tb.place(host)
    assert isinstance(x, jax.Array) and isinstance(y, jax.Array)
    np.testing.assert_array_equal(np.asarray(x), host[0])
    np.testing.assert_array_equal(np.asarray(y), host[1])


def test_place_fn_puts_a_tree_on_the_given_sharding():
    rng = np.random.default_rng(2)
    tree = {"a": rng.standard_normal((4, 3)).astype(np.float32), "b": rng.integers(0, 9, 5)}
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    for placed in (batches.place_fn(None)(tree), batches.place_fn(one)(tree, one)):
        assert all(isinstance(v, jax.Array) for v in placed.values())
        np.testing.assert_array_equal(np.asarray(placed["a"]), tree["a"])
        np.testing.assert_array_equal(np.asarray(placed["b"]), tree["b"])
    assert batches.place_fn(one)(tree, one)["a"].sharding == one


def test_prefetch_yields_each_step_and_its_batch_in_order_from_the_start(memmap_dir):
    tb = _batches(memmap_dir)
    with tb.prefetch(7) as it:
        got = [next(it) for _ in range(4)]
    assert [step for step, _ in got] == [7, 8, 9, 10]
    for step, (x, y) in got:
        np.testing.assert_array_equal(x, tb.host(step)[0])
        np.testing.assert_array_equal(y, tb.host(step)[1])
