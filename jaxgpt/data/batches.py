"""What the training loop feeds its steps: the [A, B, T] batch of each step on the step's devices, built a few
steps ahead in a background thread, and the fixed evaluation batches.

Two kinds of prepared data: a small corpus (`train.bin` / `val.bin` memmaps, `jaxgpt.data`), where every
process draws the whole global batch, or a directory of llm.c shards (`jaxgpt.data.shard_loader`), where each process
reads only the rows of its own devices. Either way the batch of a step is a pure function of (seed, step).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from jaxgpt import sharding as sh
from jaxgpt.data import memmap, shard_loader


PREFETCH_DEPTH = 8  # host batches built ahead; 8 x 3.9 MB (x and y, int32) for configs/gpt2_124m.py (40 x 12 x 1024)


def place_fn(shardings: Any) -> Callable[[Any, Any], Any]:
    """How host values go onto devices: device_put with one process (shardings may be pytree prefixes);
    with several, each process keeps its own pieces of a value every process holds whole."""
    if shardings is None:
        return lambda tree, _=None: jax.device_put(tree)
    return jax.device_put if jax.process_count() == 1 else sh.shard_params


class TrainBatches:
    """`host(step)` -> this process's (x, y) rows; `place(host)` -> global [A, B, T] arrays; `eval_sets`."""

    def __init__(self, data_dir: str | Path, *, seed: int, accum: int, batch: int, block: int, eval_iters: int,
                 batch_sharding: Any = None, vocab_size: int | None = None) -> None:
        self.A, self.B, self.T, self.seed = accum, batch, block, seed
        self.sharding = batch_sharding
        self.shards = shard_loader.is_shard_dir(data_dir)
        if self.shards:
            rows = None
            if batch_sharding is not None:
                rows = shard_loader.local_rows(batch_sharding, (accum, batch, block), batch_dim=1)
            self.train = shard_loader.ShardLoader(data_dir, "train", accum * batch, block, seed, rows=rows,
                                                vocab_size=vocab_size)
            evals = {"train": shard_loader.ShardLoader(data_dir, "train", batch, block, seed, stream=1),
                     "val": shard_loader.ShardLoader(data_dir, "val", batch, block, seed, stream=1)}
            self.eval_sets = {k: [ld.batch_at(i) for i in range(eval_iters)] for k, ld in evals.items()}
        else:
            self.train = memmap.load_split(data_dir, "train", block)
            val = memmap.load_split(data_dir, "val", block)
            # fixed evaluation batches (their own RNG stream), so successive evaluations are comparable
            self.eval_sets = {name: [memmap.get_batch(d, batch, block, memmap.batch_rng(seed, k, name, stream=1))
                                     for k in range(eval_iters)] for name, d in (("train", self.train), ("val", val))}

    def host(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The host arrays of `step`'s batch that this process provides."""
        if self.shards:
            return self.train.batch_at(step)
        A, B, T = self.A, self.B, self.T
        x, y = memmap.get_batch(self.train, A * B, T, memmap.batch_rng(self.seed, step, "train"))
        return x.reshape(A, B, T), y.reshape(A, B, T)  # [A, B, T] each

    def place(self, host: tuple[np.ndarray, np.ndarray]) -> tuple[jax.Array, jax.Array]:
        if self.shards and self.sharding is not None:
            return shard_loader.global_batch(self.sharding, (self.A, self.B, self.T), host, batch_dim=1)
        if self.shards:
            host = tuple(a.reshape(self.A, self.B, self.T) for a in host)
        return place_fn(self.sharding)(host, (self.sharding,) * 2)

    def prefetch(self, start: int) -> shard_loader.Prefetcher:
        """(step, host batch) for start, start + 1, ... built ahead in a background thread: up to PREFETCH_DEPTH
        batches wait, and the thread refills them half at a time (one wake-up every PREFETCH_DEPTH // 2 steps)."""
        return shard_loader.Prefetcher(self.host, start, depth=PREFETCH_DEPTH)
