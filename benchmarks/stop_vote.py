"""The cost per step of the coordinated stop's vote (`jaxgpt.train.hooks.StopVote`) in a two-process run.

nanoGPT's CPU recipe (configs/shakespeare_char_cpu.py: 4 layers x 128, B=12, T=64) trained by two processes on
this machine (gloo collectives over localhost, one CPU device each), with the vote on (an all-gather of one int
per device after every step, read a step later) and off (`StopVote.cast` replaced by a no-op: no collective),
in alternating rounds. Per run: the median milliseconds per step over the train records after the first
`SKIP` steps (the meter's tokens/s, which leaves out compiling). Prints a JSON line per run, then the medians
and the load average before and after. On a loaded machine the runs swing by more than the vote costs, so
`--bare` times the vote alone: two processes casting it back to back, `--casts` times, microseconds per cast.

    python benchmarks/stop_vote.py --input ../shared/data/tinyshakespeare.txt --steps 300 --rounds 3
    python benchmarks/stop_vote.py --bare --casts 2000
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SKIP = 20  # steps left out at the start (compiling, the first flushes)


def worker(vote: str, wd: Path, data_dir: Path, steps: int) -> None:
    """One process of a run: train the CPU recipe for `steps` steps, the vote on or off."""
    sys.path.insert(0, str(REPO))
    from jaxgpt import sharding as sh

    assert sh.maybe_initialize_distributed() is True
    from jaxgpt.train import config as train_config
    from jaxgpt.train import hooks, trainer

    if vote == "off":
        hooks.StopVote.cast = lambda self, local: None
    c = train_config.load_config_file(str(REPO / "configs" / "shakespeare_char_cpu.py"))
    c.update_from_flattened_dict({"data.dir": str(data_dir), "max_iters": steps,
                                  "eval_interval": 10**6, "eval_at_start": False, "ckpt_interval": 10**6,
                                  "sample_tokens": 0, "tensorboard": False, "progress": False})
    trainer.train(c, wd)


def bare_worker(casts: int) -> None:
    """One process casting the vote `casts` times after a warm-up; process 0 prints microseconds per cast."""
    import time

    sys.path.insert(0, str(REPO))
    from jaxgpt import sharding as sh

    assert sh.maybe_initialize_distributed() is True
    from jaxgpt.train import hooks

    vote = hooks.StopVote()
    for _ in range(50):
        vote.cast(None)
    t0 = time.perf_counter()
    for _ in range(casts):
        vote.cast(None)
    us = 1e6 * (time.perf_counter() - t0) / casts
    if sh.jax.process_index() == 0:
        print(json.dumps({"us_per_cast": round(us, 1), "casts": casts, "load": os.getloadavg()}), flush=True)


def bare(casts: int) -> None:
    port, procs = free_port(), []
    for i in range(2):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
               "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)}
        procs.append(subprocess.Popen([sys.executable, __file__, "--bare-worker", str(casts)], env=env, cwd=REPO))
    for p in procs:
        p.wait(timeout=3600)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def one_run(vote: str, root: Path, data_dir: Path, steps: int, n: int) -> float:
    """Two processes to `steps`; returns the median ms per step after SKIP (from process 0's metrics)."""
    wd, port = root / f"{vote}_{n}", free_port()
    procs = []
    for i in range(2):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
               "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)}
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", vote, str(wd), str(data_dir), str(steps)],
                                      env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=3600)
        if p.returncode:
            raise SystemExit(f"a {vote} run failed:\n{err[-3000:]}")
    records = [json.loads(ln) for ln in (wd / "metrics.jsonl").read_text().splitlines()]
    tokens_per_step = 12 * 64
    ms = [1e3 * tokens_per_step / r["tokens_per_s"] for r in records
          if r["kind"] == "train" and r["step"] >= SKIP and r.get("tokens_per_s")]
    return statistics.median(ms)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", default=str(REPO.parent / "shared" / "data" / "tinyshakespeare.txt"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bare", action="store_true", help="time the vote alone (no training)")
    ap.add_argument("--casts", type=int, default=2000)
    ap.add_argument("--worker", nargs=4, metavar=("VOTE", "WORKDIR", "DATA", "STEPS"), help=argparse.SUPPRESS)
    ap.add_argument("--bare-worker", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        vote, wd, data_dir, steps = args.worker
        return worker(vote, Path(wd), Path(data_dir), int(steps))
    if args.bare_worker:
        return bare_worker(args.bare_worker)
    if args.bare:
        return bare(args.casts)
    root = Path(tempfile.mkdtemp(prefix="stop_vote_"))
    data_dir = root / "shakespeare_char"
    subprocess.run([sys.executable, "-m", "jaxgpt.data", "--dataset", "shakespeare", "--tokenizer", "char",
                    "--input", args.input, "--out", str(data_dir)], check=True, cwd=REPO, capture_output=True)
    load_before = os.getloadavg()
    got: dict[str, list[float]] = {"on": [], "off": []}
    for n in range(args.rounds):
        for vote in ("off", "on") if n % 2 else ("on", "off"):
            got[vote].append(one_run(vote, root, data_dir, args.steps, n))
            print(json.dumps({"round": n, "vote": vote, "ms_per_step": round(got[vote][-1], 2),
                              "load": os.getloadavg()}), flush=True)
    on, off = statistics.median(got["on"]), statistics.median(got["off"])
    print(json.dumps({"ms_per_step_on": round(on, 2), "ms_per_step_off": round(off, 2),
                      "vote_ms": round(on - off, 2), "ratio": round(on / off, 4),
                      "rounds_on": [round(x, 2) for x in got["on"]], "rounds_off": [round(x, 2) for x in got["off"]],
                      "load_before": load_before, "load_after": os.getloadavg()}))


if __name__ == "__main__":
    main()
