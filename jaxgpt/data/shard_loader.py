"""Batches from a directory of llm.c token shards: memory-mapped, a pure function of (seed, step), per process.

A batch is `batch_size` random windows of `block_size + 1` tokens, drawn uniformly over every window that lies
inside one shard, from an RNG seeded by (seed, split, step, stream) as `jaxgpt.data.memmap.batch_rng` does. Every
process draws the same window starts for the whole global batch (a few integers) but reads only the rows of
its own devices (`local_rows`); `global_batch` assembles them with `jax.make_array_from_process_local_data`.
The batch of a step depends on nothing else, so one process and several give the same global batch and a
resumed run sees the batches an uninterrupted one would. `Prefetcher` builds steps n+1 ... while step n runs.
"""

from __future__ import annotations

import collections
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from jaxgpt.data import shards, streaming
from jaxgpt.data.memmap import batch_rng


def is_shard_dir(data_dir: str | Path) -> bool:
    """Whether a directory holds llm.c training shards (`*_train_*.bin`)."""
    return bool(shards.list_shards(data_dir, "train"))


class ShardLoader:
    """Random windows from the shards of one split; `batch_at(step)` -> (x, y) int32 [len(rows), T].

    rows: the global batch rows this process reads (default all of them, in order; see `local_rows`).
    vocab_size: when given, every batch is checked to hold ids < vocab_size (a cheap max over the batch).
    """

    def __init__(self, data_dir: str | Path, split: str, batch_size: int, block_size: int, seed: int,
                 stream: int = 0, rows: Sequence[int] | None = None, vocab_size: int | None = None) -> None:
        streaming.check_finished(data_dir)
        self.paths = shards.list_shards(data_dir, split)
        if not self.paths:
            raise FileNotFoundError(f"{data_dir} holds no *_{split}_*.bin shards; prepare them first "
                                    "(python -m jaxgpt.data --dataset files|hf --out DIR)")
        self.split, self.B, self.T, self.seed, self.stream = split, batch_size, block_size, seed, stream
        self.maps = [shards.open_shard(p) for p in self.paths]
        starts = np.array([max(len(m) - block_size, 0) for m in self.maps], dtype=np.int64)  # windows per shard
        if not starts.sum():
            raise ValueError(f"no {split} shard in {data_dir} holds block_size + 1 = {block_size + 1} tokens; "
                             "use a smaller block_size or larger shards")
        self.cum = np.cumsum(starts)  # [S]: window w lies in shard searchsorted(cum, w, "right")
        self.rows = np.arange(batch_size) if rows is None else np.asarray(rows, dtype=np.int64)
        if self.rows.size and (self.rows.min() < 0 or self.rows.max() >= batch_size):
            raise ValueError(f"rows must lie in [0, {batch_size}); got {self.rows.min()} .. {self.rows.max()}")
        self.vocab_size = vocab_size

    @property
    def n_tokens(self) -> int:
        return int(sum(len(m) for m in self.maps))

    def windows(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, start) of every row of the global batch of `step`: [B] each."""
        w = batch_rng(self.seed, step, self.split, self.stream).integers(0, self.cum[-1], size=self.B)  # [B]
        shard = np.searchsorted(self.cum, w, side="right")
        return shard, w - np.concatenate([[0], self.cum[:-1]])[shard]

    def batch_at(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Inputs x and next-token targets y of this process's rows: int32 [len(rows), T] each."""
        shard, start = self.windows(step)
        out = np.empty((self.rows.size, self.T + 1), dtype=np.int32)  # [R, T+1]
        for i, r in enumerate(self.rows):
            out[i] = self.maps[shard[r]][start[r]:start[r] + self.T + 1]
        if self.vocab_size is not None and out.size and out.max() >= self.vocab_size:
            i = int(np.argmax(out.max(axis=1) >= self.vocab_size))
            r = self.rows[i]
            raise ValueError(f"shard {self.paths[shard[r]]} holds token id {out[i].max()} near offset {start[r]}, "
                             f">= the model's vocab_size {self.vocab_size}; use a model vocabulary that covers "
                             "the tokenizer (GPT-2: 50257) or prepare the data with the model's tokenizer")
        return out[:, :-1], out[:, 1:]

    def check_vocab(self, vocab_size: int, chunk: int = 1 << 24) -> None:
        """Scan every shard (in chunks, bounded memory) for a token id >= vocab_size; one line names the file."""
        for path, m in zip(self.paths, self.maps):
            for lo in range(0, len(m), chunk):
                top = int(m[lo:lo + chunk].max())
                if top >= vocab_size:
                    pos = lo + int(np.argmax(m[lo:lo + chunk] >= vocab_size))
                    raise ValueError(f"shard {path} holds token id {top} at offset {pos}, >= the model's vocab_size "
                                     f"{vocab_size}; use a model vocabulary that covers the tokenizer (GPT-2: "
                                     "50257) or prepare the data with the model's tokenizer")
        self.vocab_size = vocab_size


# ---------------------------------------------------------------------------------------------------------
# Several processes


def local_rows(sharding: Any, global_shape: Sequence[int], batch_dim: int = 0) -> np.ndarray:
    """Flat global rows this process holds, in the order `make_array_from_process_local_data` expects.

    global_shape: [B, T] (batch_dim 0) or [A, B, T] (batch_dim 1, gradient-accumulation micro-batches first):
    a row is `a * B + b`. Returns [A * B_local] indices into the flat [A * B] batch.
    """
    index_map = sharding.addressable_devices_indices_map(tuple(global_shape))
    b = sorted({i for idx in index_map.values() for i in range(*idx[batch_dim].indices(global_shape[batch_dim]))})
    outer = int(np.prod(global_shape[:batch_dim], dtype=np.int64))
    return (np.arange(outer)[:, None] * global_shape[batch_dim] + np.asarray(b)[None, :]).reshape(-1)


def global_batch(sharding: Any, global_shape: Sequence[int], local: Sequence[np.ndarray],
                 batch_dim: int = 0) -> tuple[Any, ...]:
    """One global jax.Array of `global_shape` per host array of this process's rows ([len(local_rows), T])."""
    import jax

    outer = int(np.prod(global_shape[:batch_dim], dtype=np.int64))
    n_rows = local_rows(sharding, global_shape, batch_dim).size
    local_shape = (*global_shape[:batch_dim], n_rows // outer, *global_shape[batch_dim + 1:])
    return tuple(jax.make_array_from_process_local_data(sharding, np.asarray(x).reshape(local_shape),
                                                        tuple(global_shape)) for x in local)


# ---------------------------------------------------------------------------------------------------------
# Prefetching


class Prefetcher:
    """Iterate `(step, fn(step))` for step = start, start + 1, ... with fn run ahead in a background thread.

    At most `depth` results wait, so steps n+1 ... are prepared while the caller runs step n. The thread works
    in bursts: it fills up to `depth`, then sleeps until the caller has taken them down to `refill_at`
    (default depth // 2), so it wakes once every depth - refill_at steps rather than at every step, out of the
    way of the threads that run the steps. An exception in fn is raised by the `next` that reaches its step.
    Use as a context manager or call close().
    """

    def __init__(self, fn: Callable[[int], Any], start: int = 0, depth: int = 2, refill_at: int | None = None) -> None:
        self.fn, self.depth = fn, max(1, int(depth))
        self.refill_at = min(self.depth - 1, max(0, self.depth // 2 if refill_at is None else int(refill_at)))
        self.ready: collections.deque[tuple[int, Any, BaseException | None]] = collections.deque()
        self.cv = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._fill, args=(start,), daemon=True, name="prefetch")
        self.thread.start()

    def _fill(self, step: int) -> None:
        while True:
            with self.cv:
                if len(self.ready) >= self.depth:  # full: sleep until the caller drains it to refill_at
                    while not self.closed and len(self.ready) > self.refill_at:
                        self.cv.wait()
                if self.closed:
                    return
            try:
                item = (step, self.fn(step), None)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                item = (step, None, e)
            with self.cv:
                self.ready.append(item)
                self.cv.notify_all()  # a caller waiting on an empty queue
            if item[2] is not None:
                return
            step += 1

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        return self

    def __next__(self) -> tuple[int, Any]:
        with self.cv:
            while not self.ready:
                if self.closed:
                    raise StopIteration
                self.cv.wait()
            step, value, err = self.ready.popleft()
            if len(self.ready) == self.refill_at:
                self.cv.notify_all()  # the producer sleeps until now
        if err is not None:
            self.close()
            raise err
        return step, value

    def close(self) -> None:
        with self.cv:
            self.closed = True
            self.cv.notify_all()
        self.thread.join(timeout=10)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
