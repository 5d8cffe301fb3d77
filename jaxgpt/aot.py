"""Compile the real train step (and a decode step) for a TPU topology without the TPU, and say whether it fits.

    python -m jaxgpt.aot --topology v5e:4x4 --config=configs/gpt2_124m.py --config.mesh.fsdp=16 \
        --config.model.remat=full --config.model.scan_layers=True [--batch_per_chip 8] [--max_batch]

XLA compiles for the topology on this host (libtpu: `pip install "jax[tpu]==<jax version>"`; the compile runs
on the CPU) and `memory_analysis()` gives the bytes one chip needs: arguments (params, optimizer state,
batch), temporaries (activations), outputs not aliased to arguments. The step is the function the trainer
jits, with its shardings (`jaxgpt.train.steps`), traced in the mesh context so the activations are pinned to the
batch split. FLOPs per step come from XLA's `cost_analysis` (its time estimate is not reported: it is not
usable for TPU programs compiled this way). Without --topology it compiles for the local devices (a real TPU
host). It exits 1 with one line naming what to change when the step does not fit; --max_batch searches the
largest per-chip batch that does (linear in the batch: two compiles predict it, more confirm it).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import time
from typing import Any

GIB = 2**30
# HBM per chip by device kind (substring match, most specific first): what a chip has.
HBM_BYTES = (("v5 lite", 16 * GIB), ("v5e", 16 * GIB), ("v6 lite", 32 * GIB), ("v6e", 32 * GIB),
             ("v5p", 95 * GIB), ("v5", 95 * GIB), ("v4", 32 * GIB), ("v3", 16 * GIB), ("v2", 8 * GIB))
# The share of it a program may use: the TPU runtime reserves 3-4% (its out-of-memory errors read "Used X of
# 15.48G hbm" on a 16 GiB chip and "of 30.75G" on a 32 GiB one). A topology compile does not enforce the limit.
USABLE = 0.96


@dataclasses.dataclass
class Report:
    """One compiled step's per-chip memory (bytes) and cost."""

    step: str  # "train" or "decode"
    chips: int
    batch_per_chip: int
    argument: int
    output: int
    alias: int
    temp: int
    code: int
    hbm: int | None
    flops: float | None  # XLA's count per step, all chips together (None for scanned layers: see _report)
    compile_s: float
    used: int | None = None  # set when XLA refused the program for lack of HBM: the bytes it said it needs
    model_flops: float | None = None  # training FLOPs per step from the model's shape (metrics.flops_per_token)

    @property
    def total(self) -> int:
        if self.used is not None:
            return self.used
        return self.argument + self.output - self.alias + self.temp + self.code

    @property
    def fits(self) -> bool | None:
        if self.used is not None:
            return False
        return None if self.hbm is None else self.total <= self.hbm

    def line(self) -> str:
        hbm = "?" if self.hbm is None else f"{self.hbm / GIB:.2f}"
        if self.used is not None:
            return (f"{self.step:6s} chips={self.chips} batch/chip={self.batch_per_chip} out of memory: XLA needs "
                    f"{self.used / GIB:.2f} GiB / HBM {hbm} GiB fits=False compile={self.compile_s:.1f}s")
        flops = "?" if self.flops is None else f"{self.flops:.3e}"
        if self.model_flops is not None:
            flops += f" model={self.model_flops:.3e}"
        return (f"{self.step:6s} chips={self.chips} batch/chip={self.batch_per_chip} args={self.argument / GIB:.2f} "
                f"temp={self.temp / GIB:.2f} out-alias={(self.output - self.alias) / GIB:.2f} "
                f"total={self.total / GIB:.2f} GiB / HBM {hbm} GiB fits={self.fits} FLOPs/step={flops} "
                f"compile={self.compile_s:.1f}s")


def topology_devices(name: str | None) -> list:
    """The devices of a TPU topology ("v5e:4x4") to compile for; None: the local devices."""
    import jax

    if not name:
        return list(jax.devices())
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
    except Exception as e:  # noqa: BLE001 - libtpu missing, held by another process, or an unknown name
        if "lockfile" in str(e):
            raise SystemExit(f"aot: libtpu is held by another process, so TPU topology {name!r} cannot be described; "
                             "to compile beside it, set ALLOW_MULTIPLE_LIBTPU_LOAD=1") from None
        raise SystemExit(f"aot: cannot describe TPU topology {name!r} ({type(e).__name__}: {str(e)[:200]}); "
                         'install libtpu (pip install "jax[tpu]==<jax version>") and use a name like v5e:2x2') from None


def hbm_bytes(devices: list) -> int | None:
    """HBM one device may use: the runtime's limit on a real host; else USABLE of the chip's HBM by kind, split
    over the chip's cores when the topology lists each core as a device (v4)."""
    device = devices[0]
    try:
        limit = (device.memory_stats() or {}).get("bytes_limit")
        if limit:
            return int(limit)
    except Exception:  # noqa: BLE001 - compile-only topology devices have no stats
        pass
    kind = str(getattr(device, "device_kind", "")).lower()
    chip = next((b for k, b in HBM_BYTES if k in kind), None)
    cores = 1 + max(int(getattr(d, "core_on_chip", 0) or 0) for d in devices)
    return None if chip is None else int(chip * USABLE) // cores


def _report(step: str, compiled: Any, chips: int, bpc: int, hbm: int | None, seconds: float,
            scanned: bool) -> Report:
    """Bytes from memory_analysis; FLOPs from cost_analysis, which counts a loop's body once: for scanned
    layers that is one layer's share, so no count is reported (the model FLOPs are)."""
    m = compiled.memory_analysis()
    cost = None if scanned else compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    flops = float(cost["flops"]) * chips if cost and cost.get("flops", -1) > 0 else None  # per device -> all
    return Report(step, chips, bpc, int(m.argument_size_in_bytes), int(m.output_size_in_bytes),
                  int(m.alias_size_in_bytes), int(m.temp_size_in_bytes), int(m.generated_code_size_in_bytes), hbm,
                  flops, seconds)


# The two forms of XLA:TPU's out-of-memory error: the whole program's bytes, or (raised earlier) its temporaries'.
_OOM = (re.compile(r"Ran out of memory in memory space hbm\. Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm"),
        re.compile(r"Ran out of memory on HBM, the total memory required for HLO temporaries \(([\d.]+)([KMGT]?)\)"))


def _out_of_memory(e: Exception, step: str, chips: int, bpc: int, hbm: int | None, seconds: float) -> Report:
    """The report of a program XLA refused for lack of HBM ("Used 21.95G of 15.48G hbm", or "the total memory
    required for HLO temporaries (47.84G)": then the bytes are a lower bound); other errors re-raise."""
    m = next((m for m in (p.search(str(e)) for p in _OOM) if m), None)
    if m is None:
        raise e
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": GIB, "T": 2**40}
    used = int(float(m.group(1)) * scale[m.group(2)])
    return Report(step, chips, bpc, 0, 0, 0, 0, 0, hbm, None, seconds, used=used)


def train_program(train_cfg: Any, devices: list, batch_per_chip: int) -> Any:
    """The trainer's program (`jaxgpt.train.program.build_program`) for `devices` at `batch_per_chip` rows a
    chip (x grad_accum micro-batches), its state in the trainer's layout; lower its step inside
    `sharding.activation_mesh(program.mesh)` with `program.abstract_args()`."""
    from jaxgpt.train import config as train_config
    from jaxgpt.train.program import build_program
    from jaxgpt.train.run import model_config

    p = train_config.parts(train_cfg)
    model_cfg = model_config(p.model, p.start.mixed_precision)
    return build_program(model_cfg, p.optim, p.mesh, grad_accum=p.loop.grad_accum,
                         batch_rows=batch_per_chip * len(devices), devices=devices)


def compile_train(train_cfg: Any, devices: list, batch_per_chip: int) -> Report:
    """Compile the trainer's step for `devices` at `batch_per_chip` rows a chip (x grad_accum micro-batches)."""
    import jax

    from jaxgpt import sharding as sh
    from jaxgpt.train.metrics import flops_per_token

    program = train_program(train_cfg, devices, batch_per_chip)
    model_cfg = program.model_cfg
    t0 = time.perf_counter()
    hbm = hbm_bytes(devices)
    try:
        with sh.activation_mesh(program.mesh):
            compiled = program.train_step.lower(*program.abstract_args()).compile()
    except Exception as e:  # noqa: BLE001 - XLA:TPU refuses a program that cannot fit: report it, as not fitting
        r = _out_of_memory(e, "train", len(devices), batch_per_chip, hbm, time.perf_counter() - t0)
    else:
        r = _report("train", compiled, len(devices), batch_per_chip, hbm, time.perf_counter() - t0,
                    model_cfg.scan_layers)
    n_params = sum(x.size for x in jax.tree.leaves(program.state.params))
    tokens = int(train_cfg.grad_accum) * batch_per_chip * len(devices) * model_cfg.block_size
    attn_width = model_cfg.n_head * model_cfg.head_dim  # the scores' and values' width (n_embd for GPT-2)
    per_token = flops_per_token(model_cfg.n_layer, model_cfg.block_size, attn_width, n_params)
    return dataclasses.replace(r, model_flops=per_token * tokens)


def compile_decode(train_cfg: Any, devices: list, batch_per_chip: int) -> Report:
    """Compile one cached decode step (one new token a row, a cache of block_size) with fsdp-split weights."""
    import jax
    import jax.numpy as jnp

    from jaxgpt import sharding as sh
    from jaxgpt.decode.kv_cache import init_cache
    from jaxgpt.nn.model import GPT, init_params
    from jaxgpt.train import config as train_config
    from jaxgpt.train.run import model_config

    p = train_config.parts(train_cfg)
    model_cfg = model_config(p.model, p.start.mixed_precision)
    rows = batch_per_chip * len(devices)
    mesh = sh.make_mesh(p.mesh.data, p.mesh.fsdp, devices=devices)
    params = jax.eval_shape(lambda: init_params(model_cfg, 0))
    cache = jax.eval_shape(lambda: init_cache(model_cfg, rows, model_cfg.block_size, model_cfg.compute_dtype))
    cache_sharding = jax.tree.map(lambda _: sh.batch_sharding(mesh), cache)
    tokens = jax.ShapeDtypeStruct((rows, 1), jnp.int32, sharding=sh.batch_sharding(mesh))

    def decode(params: Any, tokens: jax.Array, cache: Any) -> tuple[jax.Array, Any]:
        logits, cache = GPT(model_cfg).apply({"params": params}, tokens, cache=cache)
        return jnp.argmax(logits[:, -1], axis=-1), cache

    p_sh = sh.param_shardings(params, mesh, p.mesh.min_shard_size)
    fn = jax.jit(decode, donate_argnums=(2,), out_shardings=(sh.batch_sharding(mesh), cache_sharding))
    t0 = time.perf_counter()
    hbm = hbm_bytes(devices)
    try:
        with sh.activation_mesh(mesh):
            compiled = fn.lower(sh.abstract_on(params, p_sh), tokens, sh.abstract_on(cache, cache_sharding)).compile()
    except Exception as e:  # noqa: BLE001 - see compile_train
        return _out_of_memory(e, "decode", len(devices), batch_per_chip, hbm, time.perf_counter() - t0)
    return _report("decode", compiled, len(devices), batch_per_chip, hbm, time.perf_counter() - t0,
                   model_cfg.scan_layers)


def max_batch(train_cfg: Any, devices: list, start: int = 1, limit: int = 4096,
              near: bool = False) -> tuple[int, list[Report]]:
    """The largest per-chip batch whose train step fits (0: none). Bytes grow about linearly with the batch: a
    line through two compiles gives the next batch to try, then the line through the largest batch that fits
    and the smallest that does not (a step XLA refuses still says the bytes it needs), until they are
    neighbours. The second compile is at twice `start` when it fits, else at one row (if that does not fit
    either: 0). `near`: `start` is a guess of the answer, so the second compile is its neighbour (start + 1 if
    it fits, else start - 1), and a right guess takes two compiles."""
    first = compile_train(train_cfg, devices, start)
    if first.hbm is None:
        raise SystemExit("aot: the chip's HBM is unknown; --max_batch needs it")
    if not first.fits and start == 1:
        return 0, [first]
    if near:
        second = start + 1 if first.fits else start - 1
    else:
        second = 2 * start if first.fits else 1
    reports = [first, compile_train(train_cfg, devices, second)]
    if not reports[1].fits and reports[1].batch_per_chip == 1:
        return 0, reports
    tried = {r.batch_per_chip: r for r in reports}
    lo = max([k for k, r in tried.items() if r.fits] + [0])
    hi = min([k for k, r in tried.items() if not r.fits] + [limit + 1])
    while hi - lo > 1:  # the line through the nearest fitting and failing compiles, else the two nearest to them
        by_batch = sorted(tried.values(), key=lambda r: r.batch_per_chip)
        if lo in tried and hi in tried:
            a, b = tried[lo], tried[hi]
        else:
            a, b = by_batch[-2:] if lo in tried else by_batch[:2]
        per_row = max((b.total - a.total) / (b.batch_per_chip - a.batch_per_chip), 1.0)
        guess = a.batch_per_chip + math.floor((a.hbm - a.total) / per_row)
        mid = min(max(guess, lo + 1), hi - 1)
        r = tried[mid] = compile_train(train_cfg, devices, mid)
        reports.append(r)
        lo, hi = (mid, hi) if r.fits else (lo, mid)
    return lo, reports


def advice(train_cfg: Any, r: Report) -> str:
    need, have = r.total / GIB, (r.hbm or 0) / GIB
    fsdp, remat = int(train_cfg.mesh.fsdp), train_cfg.model.remat
    tips = [f"lower the batch ({r.batch_per_chip} a chip; try --max_batch)"]
    if fsdp < r.chips:
        tips.append(f"raise --config.mesh.fsdp (now {fsdp}, up to {r.chips}) with --config.mesh.data=-1")
    if remat != "full":
        tips.append(f"set --config.model.remat=full (now {remat})")
    return f"aot: the {r.step} step does not fit: {need:.2f} GiB a chip > {have:.2f} GiB HBM; " + ", or ".join(tips)


def main(argv: list[str]) -> None:
    from absl import flags

    train_cfg = flags.FLAGS["config"].value
    devices = topology_devices(flags.FLAGS["topology"].value)
    n = len(devices)
    bpc = flags.FLAGS["batch_per_chip"].value
    if bpc is None:
        if int(train_cfg.batch_size) % n:
            raise SystemExit(f"aot: config.batch_size={train_cfg.batch_size} does not split over {n} chips; "
                             "pass --batch_per_chip N")
        bpc = int(train_cfg.batch_size) // n
    from jaxgpt.train.run import model_config

    model_cfg = model_config(train_cfg.model.to_dict(), train_cfg.mixed_precision)
    print(f"aot: {n} x {devices[0].device_kind}, mesh data={train_cfg.mesh.data} fsdp={train_cfg.mesh.fsdp}, "
          f"n_layer={model_cfg.n_layer} n_embd={model_cfg.n_embd} T={model_cfg.block_size} dtype={model_cfg.dtype} "
          f"remat={model_cfg.remat} scan_layers={model_cfg.scan_layers} grad_accum={train_cfg.grad_accum} "
          f"mlp={model_cfg.mlp} kv_heads={model_cfg.kv_heads}/{model_cfg.n_head}", flush=True)
    reports = []
    if flags.FLAGS["max_batch"].value:
        best, tried = max_batch(train_cfg, devices, start=max(1, bpc), near=flags.FLAGS["near"].value)
        reports += tried
        for r in tried:
            print(r.line(), flush=True)
        print(f"aot: largest batch per chip that fits: {best}", flush=True)
    else:
        reports.append(compile_train(train_cfg, devices, bpc))
        print(reports[-1].line(), flush=True)
    if flags.FLAGS["decode"].value:
        reports.append(compile_decode(train_cfg, devices, bpc))
        print(reports[-1].line(), flush=True)
    out = flags.FLAGS["json"].value
    if out:
        from jaxgpt.io import atomic

        rows = [{**dataclasses.asdict(r), "total": r.total, "fits": r.fits} for r in reports]
        atomic.write_json(out, {"topology": flags.FLAGS["topology"].value, "model": model_cfg.to_dict(),
                                "mesh": train_cfg.mesh.to_dict(), "reports": rows})
    bad = next((r for r in reports if r.fits is False and not flags.FLAGS["max_batch"].value), None)
    if bad is not None:
        print(advice(train_cfg, bad), file=sys.stderr)
        raise SystemExit(1)


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config_flags.DEFINE_config_file("config", os.path.join(root, "configs", "gpt2_124m.py"),
                                    "training config; override fields with --config.<field>=<value>")
    flags.DEFINE_string("topology", None, "TPU topology to compile for, e.g. v5e:4x4 (default: local devices)")
    flags.DEFINE_integer("batch_per_chip", None, "sequences a chip (default: config.batch_size / chips)")
    flags.DEFINE_bool("max_batch", False, "search the largest per-chip batch that fits")
    flags.DEFINE_bool("near", False, "--max_batch: --batch_per_chip is a guess of the answer (check its neighbours "
                      "first: two compiles when it is right)")
    flags.DEFINE_bool("decode", True, "also compile a one-token decode step with a block_size cache")
    flags.DEFINE_string("json", None, "write the reports to this JSON file")


def underscored(argv: list[str]) -> list[str]:
    """`--max-batch` read as `--max_batch` and `--no-decode` as `--nodecode` (absl knows only its own spellings);
    --config.* left as typed."""
    def one(a: str) -> str:
        if not a.startswith("--") or a.startswith("--config"):
            return a
        name, eq, value = a[2:].partition("=")
        name = "no" + name[3:] if name.startswith("no-") else name
        return "--" + name.replace("-", "_") + eq + value
    return [one(a) for a in argv]


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main, argv=underscored(sys.argv))
