"""The training loop's overhead: the real trainer against a bare loop over the same jitted step and batches.

trainer: `jaxgpt.train.trainer.train(config, workdir)` on nanoGPT's CPU recipe (configs/shakespeare_char_cpu.py:
         4 layers, 128 wide, B=12, T=64, log_interval=1) with everything it does around the step: metrics,
         TensorBoard, the workdir lock, hooks, the prefetch thread, the progress bar. Evaluation and
         checkpoints are moved past the window (they are not per-step work), and no sample is drawn.
bare:    the same jitted step (`jaxgpt.train.steps.make_train_step`, same optimizer, mesh and state) over the
         same batches (`jaxgpt.data.batches.TrainBatches`, built and placed in the loop), fetching each
         step's metrics one step late, the least a loop that checks its losses does.

Each run does --warmup steps (the step compiles in the first), then --steps timed steps. The window is read
from the step times of both loops' own records (the trainer's metrics.jsonl), so the trainer's set-up,
compilation and final evaluation fall outside it; CPU time is the process's, sampled every 50 ms by a thread
that runs beside both loops, and split by thread: XLA's compute threads, the main thread, the others (every
250 ms, from /proc/self/task/*/schedstat). The two alternate for --repeats rounds, so load from other
processes hits both; it prints the median and the range of each, the median and the range of the per-round
ratios (loop / bare), the loop's own CPU (outside XLA's threads) over the bare loop's, and the machine's load
average before and after. Losses of the two loops are compared bitwise.

    python benchmarks/loop_overhead.py                    # 300 steps, 3 rounds
    python benchmarks/loop_overhead.py --steps 500 --repeats 5 --json out.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "shakespeare_char_cpu.py"
DEFAULT_INPUT = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=20, help="steps before the window (the first compiles)")
    p.add_argument("--repeats", type=int, default=3, help="rounds of trainer + bare, alternated")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="training config file")
    p.add_argument("--input", default=str(DEFAULT_INPUT), help="text to prepare (config.data.input)")
    p.add_argument("--data-dir", default=None, help="prepared data folder (default: a temporary one)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="the trainer's progress bar (default: as the config says)")
    p.add_argument("--json", type=Path, default=None, help="also write the rounds and the summary here")
    return p.parse_args(argv)


GROUPS = ("xla", "main", "threads")  # XLA's compute threads; the loop's main thread; every other thread


class CpuClock:
    """Samples, every `every_s`, the wall time (time.time()), the process's CPU seconds, and every
    `threads_every` samples the CPU seconds of each group of threads (GROUPS, from /proc/self/task/*/schedstat,
    this sampler's own thread left out), so the CPU time at any wall instant inside the sampled span can be read
    off (linear between samples)."""

    def __init__(self, every_s: float = 0.05, threads_every: int = 5) -> None:
        self.every_s, self.threads_every = every_s, threads_every
        self.stop = threading.Event()
        self.main_tid = threading.main_thread().native_id
        self.samples: list[tuple[float, float]] = []
        self.groups: list[tuple[float, dict[str, float]]] = []
        self.thread = threading.Thread(target=self._run, daemon=True, name="cpu-clock")
        self._sample(with_threads=True)
        self.thread.start()

    def _group_cpu(self) -> dict[str, float]:
        own = self.thread.native_id if hasattr(self, "thread") else None  # the sampler's own thread
        out = dict.fromkeys(GROUPS, 0.0)
        for tid in os.listdir("/proc/self/task"):
            if own is not None and int(tid) == own:
                continue
            try:
                with open(f"/proc/self/task/{tid}/schedstat") as f:
                    ns = int(f.read().split()[0])
                with open(f"/proc/self/task/{tid}/comm") as f:
                    comm = f.read().strip()
            except (OSError, ValueError, IndexError):
                continue  # a thread that ended meanwhile
            group = "main" if int(tid) == self.main_tid else "xla" if comm.startswith("tf_") else "threads"
            out[group] += ns / 1e9
        return out

    def _sample(self, with_threads: bool = False) -> None:
        t = time.time()
        self.samples.append((t, time.process_time()))
        if with_threads:
            self.groups.append((t, self._group_cpu()))

    def _run(self) -> None:
        n = 0
        while not self.stop.wait(self.every_s):
            n += 1
            self._sample(with_threads=n % self.threads_every == 0)

    def close(self) -> None:
        if not self.stop.is_set():
            self.stop.set()
            self.thread.join()
            self._sample(with_threads=True)

    @staticmethod
    def _at(series: list, t: float, value: Callable[[Any], float]) -> float:
        for (t0, v0), (t1, v1) in itertools.pairwise(series):
            if t0 <= t <= t1:
                a, b = value(v0), value(v1)
                return a + (b - a) * (t - t0) / (t1 - t0) if t1 > t0 else a
        raise ValueError(f"time {t} is outside the sampled span")

    def cpu_at(self, t: float) -> float:
        return self._at(self.samples, t, lambda v: v)

    def group_at(self, t: float, group: str) -> float:
        return self._at(self.groups, t, lambda v: v[group])


def window(times: dict[int, float], first: int, last: int, clock: CpuClock) -> dict[str, float]:
    """Wall and CPU ms per step (the process's, and each group of threads') between the end of step
    `first - 1` and the end of step `last - 1`."""
    t0, t1 = times[first - 1], times[last - 1]
    n = last - first
    out = {"ms_step": 1e3 * (t1 - t0) / n, "cpu_ms_step": 1e3 * (clock.cpu_at(t1) - clock.cpu_at(t0)) / n}
    for g in GROUPS:
        out[f"{g}_cpu_ms_step"] = 1e3 * (clock.group_at(t1, g) - clock.group_at(t0, g)) / n
    return out


def recipe_config(args: argparse.Namespace, data_dir: Path, max_iters: int):
    from jaxgpt.train import config as train_config

    c = train_config.load_config_file(args.config)
    c.data.input = args.input
    c.data.dir = str(data_dir)
    c.max_iters = max_iters
    c.eval_interval = c.ckpt_interval = max_iters + 1  # evaluation and checkpoints: after the window only
    c.sample_tokens = 0
    if args.progress is not None:
        c.progress = args.progress
    return c


def run_trainer(args: argparse.Namespace, data_dir: Path) -> tuple[dict[str, float], dict[int, float]]:
    from jaxgpt.train import metrics, trainer

    n = args.warmup + args.steps
    c = recipe_config(args, data_dir, n)
    if c.log_interval != 1:
        raise SystemExit(f"the trainer's window is read from its per-step records: log_interval must be 1, "
                         f"not {c.log_interval}")
    wd = Path(tempfile.mkdtemp(prefix="loop_overhead_"))
    clock = CpuClock()
    try:
        trainer.train(c, wd)
    finally:
        clock.close()
    recs = {r["step"]: r for r in metrics.read_metrics(wd / "metrics.jsonl") if r["kind"] == "train"}
    shutil.rmtree(wd, ignore_errors=True)
    return window({s: r["time"] for s, r in recs.items()}, args.warmup, n, clock), \
        {s: r["loss"] for s, r in recs.items()}


class Bare:
    """The recipe's jitted step, state and batches, built once from the public pieces; `run()` trains from the
    initial state again."""

    def __init__(self, args: argparse.Namespace, data_dir: Path) -> None:
        import jax

        from jaxgpt import sharding as sh
        from jaxgpt.data import batches
        from jaxgpt.data.memmap import load_meta
        from jaxgpt.nn.model import init_params
        from jaxgpt.train import config as train_config
        from jaxgpt.train import steps
        from jaxgpt.train.run import model_config

        self.args = args
        c = recipe_config(args, data_dir, args.warmup + args.steps)
        p = train_config.parts(c)
        self.model_cfg = model_config(p.model, p.start.mixed_precision, load_meta(data_dir)["vocab_size"])
        B, A, seed = p.loop.batch_size, p.loop.grad_accum, p.loop.seed
        self.tx = steps.make_optimizer(p.optim)
        self.mesh, shardings_fn = steps.mesh_shardings_fn(p.mesh, B)
        self.params = jax.device_get(init_params(self.model_cfg, seed))
        self.shardings = shardings_fn(steps.init_state(self.params, self.tx), None)
        self.train_step = steps.make_train_step(self.model_cfg, self.tx, steps.identity_combine, self.shardings)
        self.data = batches.TrainBatches(data_dir, seed=seed, accum=A, batch=B, block=self.model_cfg.block_size,
                                         eval_iters=1, batch_sharding=self.shardings.batch,
                                         vocab_size=self.model_cfg.vocab_size)
        self.rng = jax.random.fold_in(jax.random.PRNGKey(seed), 1)
        self.activation_mesh = sh.activation_mesh

    def run(self) -> tuple[dict[str, float], dict[int, float]]:
        import jax

        from jaxgpt.train import steps

        n = self.args.warmup + self.args.steps
        state = jax.device_put(steps.init_state(self.params, self.tx), self.shardings.state)
        times, losses, prev = {}, {}, None
        clock = CpuClock()
        try:
            with self.activation_mesh(self.mesh):
                for step in range(n):
                    state, m = self.train_step(state, self.data.place(self.data.host(step)), self.rng, None)
                    if prev is not None:  # step - 1's metrics, fetched while this step runs
                        losses[step - 1] = float(jax.device_get(prev)["loss"])
                        times[step - 1] = time.time()
                    prev = m
                losses[n - 1] = float(jax.device_get(prev)["loss"])
                times[n - 1] = time.time()
        finally:
            clock.close()
        return window(times, self.args.warmup, n, clock), losses


def prepare(args: argparse.Namespace) -> tuple[Path, bool]:
    """The prepared data folder (a temporary one unless --data-dir) and whether to remove it afterwards."""
    from jaxgpt.data import preparation
    from jaxgpt.train import config as train_config

    if args.data_dir:
        d, temporary = Path(args.data_dir), False
    else:
        d, temporary = Path(tempfile.mkdtemp(prefix="loop_overhead_data_")), True
    if not (d / "meta.json").is_file():
        c = train_config.load_config_file(args.config)
        preparation.prepare(d, dataset=c.data.dataset, tokenizer=c.data.tokenizer, input_path=args.input or None,
                            bpe_path=c.data.bpe_path or None, val_fraction=float(c.data.val_fraction))
    return d, temporary


def summarize(rounds: list[dict]) -> dict:
    out = {}
    for side in ("trainer", "bare"):
        for k in ("ms_step", "cpu_ms_step", *(f"{g}_cpu_ms_step" for g in GROUPS)):
            v = [r[side][k] for r in rounds]
            out[f"{side}_{k}"] = {"median": statistics.median(v), "min": min(v), "max": max(v)}
    for k in ("ms_step", "cpu_ms_step"):
        per_round = [r["trainer"][k] / r["bare"][k] for r in rounds]
        out[f"ratio_{k}"] = {"of_medians": out[f"trainer_{k}"]["median"] / out[f"bare_{k}"]["median"],
                             "per_round_median": statistics.median(per_round),
                             "min": min(per_round), "max": max(per_round)}
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))  # configs/ as a package for the config file
    from jaxgpt.train import host_memory

    host_memory.retain_freed_memory()  # as train.py does, before XLA starts its threads
    load_before = os.getloadavg()
    data_dir, temporary = prepare(args)
    try:
        bare = Bare(args, data_dir)
        rounds = []
        for r in range(args.repeats):
            order = ("trainer", "bare") if r % 2 == 0 else ("bare", "trainer")
            got = {}
            for side in order:
                got[side] = run_trainer(args, data_dir) if side == "trainer" else bare.run()
            window_steps = range(args.warmup - 1, args.warmup + args.steps)
            same = all(got["trainer"][1][s] == got["bare"][1][s] for s in window_steps)
            rounds.append({"trainer": got["trainer"][0], "bare": got["bare"][0], "same_losses": same,
                           "order": list(order), "load1": os.getloadavg()[0]})
            t, b = got["trainer"][0], got["bare"][0]
            print(f"round {r + 1}/{args.repeats} ({' then '.join(order)}): trainer {t['ms_step']:.2f} ms/step "
                  f"({t['cpu_ms_step']:.2f} CPU), bare {b['ms_step']:.2f} ms/step ({b['cpu_ms_step']:.2f} CPU), "
                  f"ratio {t['ms_step'] / b['ms_step']:.3f}; losses bitwise equal: {same}; "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
    finally:
        if temporary:
            shutil.rmtree(data_dir, ignore_errors=True)
    load_after = os.getloadavg()
    s = summarize(rounds)
    fmt = lambda d: f"{d['median']:8.2f}  [{d['min']:.2f} .. {d['max']:.2f}]"
    steps_total = args.steps
    print(f"\nloop overhead: {Path(args.config).name}, {steps_total} steps after {args.warmup} warm-up, "
          f"{args.repeats} rounds (median [min .. max])")
    print(f"{'':10s} {'wall ms/step':>30s} {'CPU ms/step':>30s} {'wall s':>8s}")
    for side in ("trainer", "bare"):
        w, c = s[f"{side}_ms_step"], s[f"{side}_cpu_ms_step"]
        print(f"{side:10s} {fmt(w):>30s} {fmt(c):>30s} {w['median'] * steps_total / 1e3:8.2f}")
    rw, rc = s["ratio_ms_step"], s["ratio_cpu_ms_step"]
    print(f"{'ratio':10s} {rw['per_round_median']:8.3f}  [{rw['min']:.3f} .. {rw['max']:.3f}]{'':8s}"
          f"{rc['per_round_median']:8.3f}  [{rc['min']:.3f} .. {rc['max']:.3f}]   (loop / bare, per round)")
    print(f"ratio of the medians: wall {rw['of_medians']:.3f}, CPU {rc['of_medians']:.3f}")
    print("CPU ms/step by thread (median): " + "; ".join(
        f"{side} " + ", ".join(f"{g} {s[f'{side}_{g}_cpu_ms_step']['median']:.2f}" for g in GROUPS)
        for side in ("trainer", "bare")))
    host = {side: sum(s[f"{side}_{g}_cpu_ms_step"]["median"] for g in ("main", "threads")) for side in ("trainer", "bare")}
    print(f"the loop's own CPU (main + other threads, outside XLA's): trainer {host['trainer']:.2f}, bare "
          f"{host['bare']:.2f} ms/step: {host['trainer'] - host['bare']:+.2f} ms/step, "
          f"{(host['trainer'] - host['bare']) / s['bare_ms_step']['median']:+.1%} of a bare step's wall time")
    print(f"losses bitwise equal in every round: {all(r['same_losses'] for r in rounds)}")
    print(f"load average (1, 5, 15 min): before {', '.join(f'{x:.2f}' for x in load_before)}; "
          f"after {', '.join(f'{x:.2f}' for x in load_after)}; {os.cpu_count()} CPUs")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rounds": rounds,
                                         "summary": s, "load_before": load_before, "load_after": load_after},
                                        indent=1))


if __name__ == "__main__":
    main()
