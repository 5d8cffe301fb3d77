"""jaxgpt.data.memmap: batches are the windows [s, s+T) and [s+1, s+T+1) at starts drawn by the same RNG, fixed by
(seed, step, split, stream); missing, empty, odd-sized and too-short token files get clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from jaxgpt.data import memmap


def test_batches_are_windows_fixed_by_seed_split_and_step(shakespeare_char):
    train = memmap.load_split(shakespeare_char, "train", 64)
    x, y = memmap.get_batch(train, 12, 64, memmap.batch_rng(1337, 5))
    assert x.shape == y.shape == (12, 64) and x.dtype == np.int32
    # reference: the same RNG draws the window starts; x and y are the slices [s, s+T) and [s+1, s+T+1)
    starts = memmap.batch_rng(1337, 5).integers(0, len(train) - 64, size=12)
    for row, s in enumerate(starts):
        np.testing.assert_array_equal(x[row], train[s:s + 64])
        np.testing.assert_array_equal(y[row], train[s + 1:s + 65])
    x2, y2 = memmap.get_batch(train, 12, 64, memmap.batch_rng(1337, 5))
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    for other in (memmap.batch_rng(1337, 6), memmap.batch_rng(1338, 5), memmap.batch_rng(1337, 5, "val"),
                  memmap.batch_rng(1337, 5, stream=1)):
        assert not np.array_equal(memmap.get_batch(train, 12, 64, other)[0], x)


def test_missing_empty_and_short_data_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare the data"):
        memmap.load_split(tmp_path, "train", 8)
    with pytest.raises(FileNotFoundError, match="prepare the data"):
        memmap.load_meta(tmp_path)
    (tmp_path / "train.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="fewer than block_size"):
        memmap.load_split(tmp_path, "train", 8)
    np.arange(8, dtype=np.uint16).tofile(tmp_path / "train.bin")  # 8 tokens < block_size + 1 = 9
    with pytest.raises(ValueError, match="fewer than block_size"):
        memmap.load_split(tmp_path, "train", 8)
    assert len(memmap.load_split(tmp_path, "train", 7)) == 8  # exactly block_size + 1 is enough
    (tmp_path / "train.bin").write_bytes(b"abc")
    with pytest.raises(ValueError, match="has 3 bytes, not a whole number of uint16 tokens"):
        memmap.load_split(tmp_path, "train", 1)
    with pytest.raises(ValueError, match="fewer than block_size"):
        memmap.get_batch(np.arange(4, dtype=np.uint16), 2, 4, memmap.batch_rng(0, 0))
    with pytest.raises(ValueError, match="unknown split"):
        memmap.batch_rng(0, 0, "test")
