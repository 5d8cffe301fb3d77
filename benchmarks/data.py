"""Data pipeline speed: shard preparation against tiktoken's one-core ceiling, its peak memory at two corpus sizes,
and loader batch assembly (direct, background-thread prefetch, grain).

  python benchmarks/data.py --bpe-path ../shared/data/gpt2.tiktoken                 # 50 MB / 200 MB corpora
  python benchmarks/data.py --bpe-path ... --rss-sizes-mb 200 2000                  # the 10x memory check

Corpora are JSON lines of documents drawn from the words of a text (tinyshakespeare when --words-from is given,
else CPython's pydoc topics), so BPE sees English. Every figure is measured in this process or its children.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from jaxgpt import data
from jaxgpt.data import shard_loader as loader
from jaxgpt.data import shards
from jaxgpt.data import streaming as corpus
from jaxgpt.data.tokenizer import gpt2_tokenizer


def write_corpus(path: Path, size_mb: int, words_text: str, seed: int = 0) -> int:
    """JSON lines of ~3 KB documents of random words, `size_mb` MB in all; returns the number of documents."""
    words = np.array(words_text.split())
    rng = np.random.default_rng(seed)
    n, written = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size_mb * 2**20:
            doc = " ".join(rng.choice(words, size=int(rng.integers(200, 800))))
            line = json.dumps({"text": doc}) + "\n"
            f.write(line)
            written += len(line)
            n += 1
    return n


def ceiling(tok, path: Path) -> tuple[int, float]:
    """Single-threaded `encode_ordinary` over the documents already in memory: (tokens, seconds)."""
    docs = [json.loads(line)["text"] for line in open(path, encoding="utf-8")]
    t0 = time.perf_counter()
    n = sum(len(tok.encode_ordinary(d)) + 1 for d in docs)
    return n, time.perf_counter() - t0


def prepare(tok, path: Path, out: Path, workers: int, shard_tokens: int) -> tuple[int, float]:
    t0 = time.perf_counter()
    m = corpus.prepare_shards(out, lambda: corpus.iter_files([path]), tok, source={"bench": str(path)},
                              shard_tokens=shard_tokens, workers=workers, overwrite=True)
    return sum(s["tokens"] for s in m["shards"]), time.perf_counter() - t0


def peak_rss_mb(cmd: list[str]) -> tuple[float, float]:
    """Run cmd; poll the summed RSS of it and its children every 20 ms: (peak MB, seconds)."""
    import psutil

    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    proc, peak = psutil.Process(p.pid), 0
    while p.poll() is None:
        try:
            rss = sum(q.memory_info().rss for q in [proc, *proc.children(recursive=True)])
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.02)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed with code {p.returncode}")
    return peak / 2**20, time.perf_counter() - t0


def loader_speed(d: Path, steps: int, batch: int, block: int) -> dict[str, float]:
    """Tokens/s of batch assembly: direct calls, the Prefetcher thread, and grain when it is installed."""
    L = loader.ShardLoader(d, "train", batch, block, seed=0)
    out = {}
    t0 = time.perf_counter()
    for s in range(steps):
        L.batch_at(s)
    out["direct"] = steps * batch * block / (time.perf_counter() - t0)
    with loader.Prefetcher(L.batch_at, 0, depth=4) as pf:
        t0 = time.perf_counter()
        for _, _ in zip(range(steps), pf):
            pass
        out["prefetcher (thread)"] = steps * batch * block / (time.perf_counter() - t0)
    try:
        import grain
    except ImportError:
        return out
    ds = grain.MapDataset.range(steps).map(L.batch_at).to_iter_dataset(
        grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
    t0 = time.perf_counter()
    for _ in ds:
        pass
    out["grain (2 threads)"] = steps * batch * block / (time.perf_counter() - t0)
    return out


def wait_fraction(d: Path, step_ms: float, steps: int, batch: int, block: int) -> float:
    """Share of a simulated step loop spent waiting on the Prefetcher; a step sleeps step_ms (it releases the
    GIL, as a JAX step does while the host waits for its result)."""
    L = loader.ShardLoader(d, "train", batch, block, seed=0)
    waited, t_all = 0.0, time.perf_counter()
    with loader.Prefetcher(L.batch_at, 0) as pf:
        for _ in range(steps):
            t0 = time.perf_counter()
            next(pf)
            waited += time.perf_counter() - t0
            time.sleep(step_ms / 1e3)
    return waited / (time.perf_counter() - t_all)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bpe-path", default=None)
    p.add_argument("--words-from", default=None, help="text whose words make the corpus (default: pydoc topics)")
    p.add_argument("--speed-size-mb", type=int, default=50)
    p.add_argument("--rss-sizes-mb", type=int, nargs=2, default=(50, 200))
    p.add_argument("--shard-tokens", type=int, default=10**7)
    p.add_argument("--loader-shards", type=int, default=12)
    p.add_argument("--loader-shard-tokens", type=int, default=10**7)
    p.add_argument("--loader-steps", type=int, default=2000)
    a = p.parse_args()
    tok = gpt2_tokenizer(a.bpe_path)
    words = Path(a.words_from).read_text(encoding="utf-8") if a.words_from else data.builtin_corpus()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run_tokenization(tok, tmp, words, a)
        run_rss(tmp, words, a)
        run_loader(tmp, a)


def run_tokenization(tok, tmp: Path, words: str, a) -> None:
    src = tmp / "speed.jsonl"
    write_corpus(src, a.speed_size_mb, words)
    n, dt = ceiling(tok, src)
    base = n / dt
    print(f"\n## Preparation of a {a.speed_size_mb} MB JSON-lines corpus ({n:,} tokens), {os.cpu_count()} cores")
    print("| run | tokens/s | vs ceiling |\n|---|---:|---:|")
    print(f"| tiktoken encode_ordinary, 1 thread, in memory (ceiling) | {base:,.0f} | 1.00x |")
    for workers in (0, 1, 2):
        m, dt = prepare(tok, src, tmp / "out", workers, a.shard_tokens)
        assert m == n, (m, n)
        name = "in process (workers=0)" if workers == 0 else f"{workers} worker process{'es' * (workers > 1)}"
        print(f"| prepare_shards, {name} | {m / dt:,.0f} | {m / dt / base:.2f}x |")


def run_rss(tmp: Path, words: str, a) -> None:
    print(f"\n## Peak RSS of `python -m jaxgpt.data --dataset files` (2 workers, shards of {a.shard_tokens:,} tokens)")
    print("| corpus | peak RSS (process + workers) | seconds | vs smallest |\n|---|---:|---:|---:|")
    first = None
    for size in a.rss_sizes_mb:
        src = tmp / f"rss{size}.jsonl"
        write_corpus(src, size, words, seed=size)
        cmd = [sys.executable, "-m", "jaxgpt.data", "--dataset", "files", "--input", str(src), "--out",
               str(tmp / f"rss{size}"), "--workers", "2", "--shard-tokens", str(a.shard_tokens)]
        if a.bpe_path:
            cmd += ["--bpe-path", a.bpe_path]
        mb, dt = peak_rss_mb(cmd)
        first = first or mb
        print(f"| {size} MB | {mb:,.0f} MB | {dt:.1f} | {mb / first:.2f}x |")
        src.unlink()


def run_loader(tmp: Path, a) -> None:
    d = tmp / "loader"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(a.loader_shards):
        shards.write_shard(d / shards.shard_name("bench", "train", i + 1),
                           rng.integers(0, 50257, size=a.loader_shard_tokens, dtype=np.uint16))
    speeds = loader_speed(d, a.loader_steps, 16, 1024)
    print(f"\n## Loader: batch 16 x 1024 from {a.loader_shards} shards of {a.loader_shard_tokens:,} tokens")
    print("| path | tokens/s | vs direct |\n|---|---:|---:|")
    for k, v in speeds.items():
        print(f"| {k} | {v:,.0f} | {v / speeds['direct']:.2f}x |")
    for step_ms in (10.0, 100.0):
        frac = wait_fraction(d, step_ms, 200, 16, 1024)
        print(f"| wait for data, simulated {step_ms:.0f} ms steps | {100 * frac:.3f}% of the time | |")


if __name__ == "__main__":
    main()
