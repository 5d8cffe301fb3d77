"""jaxgpt.aot: the compile-and-fit report. The TPU topology compile runs only where libtpu is importable
(`pip install "jax[tpu]==<jax version>"`, e.g. in a separate venv); the local-device path and the advice line
run everywhere."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxgpt import aot
from jaxgpt.train.config import base_config

REPO = Path(__file__).resolve().parents[1]
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed (jax[tpu])")


def _tpu_env() -> dict[str, str]:
    """os.environ for a subprocess that compiles for a TPU topology: no metadata server to ask, JAX free to pick
    the TPU plugin, and libtpu loadable beside other jax processes (the other pytest worker)."""
    env = {**os.environ, "TPU_SKIP_MDS_QUERY": "1", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    env.pop("JAX_PLATFORMS", None)
    return env


def _tiny_config():
    c = base_config()
    c.model.update(vocab_size=96, n_layer=2, n_head=2, n_embd=16, block_size=32, scan_layers=True, remat="full")
    c.batch_size = 4
    return c


@pytest.fixture
def little_optimisation():
    """XLA's "do little optimisation" mode while a test compiles (a few times faster): the test checks the
    report's fields, not how fast the compiled step runs."""
    import jax

    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


def test_local_devices_report(little_optimisation):
    import jax

    from jaxgpt.train.metrics import flops_per_token

    c = _tiny_config()
    r = aot.compile_train(c, jax.devices()[:1], batch_per_chip=4)
    assert (r.step, r.chips, r.batch_per_chip) == ("train", 1, 4)
    assert r.argument > 0 and r.temp > 0 and r.total >= r.argument
    assert r.flops is None  # XLA counts a scanned loop's body once: no count for scanned layers
    block = 2 * 16 + (16 * 48 + 48) + (16 * 16 + 16) + 2 * 16 + (16 * 64 + 64) + (64 * 16 + 16)  # ln, attn, ln, mlp
    n_params = 96 * 16 + 32 * 16 + 2 * block + 2 * 16  # wte (tied head), wpe, 2 blocks, ln_f
    assert r.model_flops == flops_per_token(2, 32, 16, n_params) * 4 * 32
    c.model.scan_layers = False
    unrolled = aot.compile_train(c, jax.devices()[:1], batch_per_chip=4)
    assert 0.8 < unrolled.flops / unrolled.model_flops < 2.5  # XLA's count: the matmuls, elementwise work, AdamW
    assert "batch/chip=4" in r.line() and "total=" in r.line()


def test_advice_names_what_to_change():
    c = _tiny_config()
    c.mesh.fsdp, c.model.remat = 1, "none"
    r = aot.Report("train", 16, 8, 10 * aot.GIB, 0, 0, 20 * aot.GIB, 0, 16 * aot.GIB, None, 1.0)
    assert r.fits is False
    msg = aot.advice(c, r)
    assert "30.00 GiB a chip > 16.00 GiB HBM" in msg and "--config.mesh.fsdp" in msg and "remat=full" in msg
    assert "\n" not in msg


@needs_libtpu
def test_tpu_topology_compile(tmp_path):
    out = tmp_path / "aot.json"
    env = _tpu_env()
    cmd = [sys.executable, "-m", "jaxgpt.aot", "--topology", "v5e:2x2", f"--config={REPO}/configs/tiny.py",
           "--config.model.vocab_size=96", "--config.mesh.data=1", "--config.mesh.fsdp=4",
           "--config.model.scan_layers=True", "--batch_per_chip=2", f"--json={out}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    train, decode = got["reports"]
    assert (train["step"], decode["step"]) == ("train", "decode")
    for r in (train, decode):
        assert r["chips"] == 4 and r["hbm"] == int(16 * aot.GIB * aot.USABLE) and r["fits"] is True
        assert r["argument"] > 0 and r["total"] == r["argument"] + r["output"] - r["alias"] + r["temp"] + r["code"]
    assert train["model_flops"] > 0 and train["flops"] is None is decode["flops"]  # scanned: see _report
    assert "train  chips=4 batch/chip=2" in proc.stdout


_TPU_BYTES = """
import json, sys
from jaxgpt import aot
from jaxgpt.train.config import base_config
devices = aot.topology_devices("v5e:2x2")
out = {}
for remat, data, fsdp in (("none", 4, 1), ("none", 1, 4), ("full", 1, 4)):
    c = base_config()
    c.model.update(vocab_size=512, n_layer=4, n_head=4, n_embd=128, block_size=256, scan_layers=True, remat=remat)
    c.mesh.data, c.mesh.fsdp, c.grad_accum = data, fsdp, 1
    r = aot.compile_train(c, devices, batch_per_chip=8)
    out[f"{remat} {data}x{fsdp}"] = {"argument": r.argument, "temp": r.temp}
json.dump(out, open(sys.argv[1], "w"))
"""


@needs_libtpu
def test_tpu_bytes_follow_the_mesh_and_remat(tmp_path):
    """On XLA:TPU's own memory plan (v5e:2x2, 8 rows a chip): FSDP splits the train state four ways and keeps the
    activations split over the batch (temporaries no larger than data parallelism's; with the rows split over
    "data" only and no pins, here they are twice as large), and full remat drops most of the activations kept for
    the backward pass."""
    out = tmp_path / "bytes.json"
    env = _tpu_env()
    proc = subprocess.run([sys.executable, "-c", _TPU_BYTES, str(out)], env=env, capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    b = json.loads(out.read_text())
    dp, fsdp, full = b["none 4x1"], b["none 1x4"], b["full 1x4"]
    assert fsdp["argument"] < dp["argument"] / 3  # float32 params + AdamW moments, split 4 ways (the batch is not)
    assert fsdp["temp"] < 1.25 * dp["temp"]
    assert full["temp"] < 0.5 * fsdp["temp"]


def test_out_of_memory_error_becomes_a_report():
    e = RuntimeError("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. "
                     "Used 21.95G of 15.48G hbm. Exceeded hbm capacity by 6.47G.")
    r = aot._out_of_memory(e, "train", 4, 64, 16 * aot.GIB, 3.0)
    assert r.used == int(21.95 * aot.GIB) and r.total == r.used and r.fits is False
    assert "out of memory: XLA needs 21.95 GiB" in r.line()
    e = RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
                     "(47.84G) exceeds available HBM (31.25G).")  # the form raised before the program is laid out
    r = aot._out_of_memory(e, "train", 8, 40, 31 * aot.GIB, 2.0)
    assert r.used == int(47.84 * aot.GIB) and r.fits is False and r.batch_per_chip == 40
    with pytest.raises(ValueError, match="other"):
        aot._out_of_memory(ValueError("some other failure"), "train", 4, 64, 16 * aot.GIB, 3.0)


def _linear_compile(monkeypatch) -> list[int]:
    """aot.compile_train faked: 2 GiB fixed + 0.3 GiB a row, refused by XLA (as on a TPU) past 15.5 GiB, so 45
    rows fit and 46 do not. Returns the list the batches compiled are appended to."""
    calls = []

    def fake(config, devices, bpc):
        calls.append(bpc)
        need = int((2 + 0.3 * bpc) * aot.GIB)
        if need > 15.5 * aot.GIB:
            return aot.Report("train", 4, bpc, 0, 0, 0, 0, 0, 16 * aot.GIB, None, 0.0, used=need)
        return aot.Report("train", 4, bpc, 2 * aot.GIB, 0, 0, need - 2 * aot.GIB, 0, 16 * aot.GIB, None, 0.0)

    monkeypatch.setattr(aot, "compile_train", fake)
    return calls


@pytest.mark.parametrize("start", [1, 8, 64])
def test_max_batch_finds_the_largest_fitting_batch(monkeypatch, start):
    """The answer is 45 from any start, the one above it compiled too."""
    calls = _linear_compile(monkeypatch)
    best, reports = aot.max_batch(None, [], start=start)
    assert best == 45 and len(calls) == len(set(calls)) <= 5
    assert any(r.batch_per_chip == 46 and r.fits is False for r in reports)


def test_max_batch_when_the_bytes_a_row_grow_with_the_batch(monkeypatch):
    """GPT-2 XL's compiles on v5e-16 (3.07 GiB at 2 rows, 3.93 at 4, +0.585 a row further out): the line
    through the first two overshoots, and the search closes in from both sides, not a row at a time."""
    calls = []

    def fake(config, devices, bpc):
        calls.append(bpc)
        need = int((3.07 + 0.43 * (bpc - 2) + 0.006 * (bpc - 2) ** 2) * aot.GIB)
        if need > 15.36 * aot.GIB:
            return aot.Report("train", 16, bpc, 0, 0, 0, 0, 0, int(15.36 * aot.GIB), None, 0.0, used=need)
        return aot.Report("train", 16, bpc, 0, 0, 0, need, 0, int(15.36 * aot.GIB), None, 0.0)

    monkeypatch.setattr(aot, "compile_train", fake)
    best, _ = aot.max_batch(None, [], start=2)
    assert best == 23 and len(calls) <= 6, calls  # a row at a time from 30 down took 10


def test_max_batch_when_the_first_line_falls_short(monkeypatch):
    """Bytes a row that shrink with the batch: the first line's answer fits, and the search goes on upwards."""
    def need(bpc):
        return (2 + 0.5 * bpc - 0.004 * bpc ** 2) * aot.GIB

    def fake(config, devices, bpc):
        if need(bpc) > 15.36 * aot.GIB:
            return aot.Report("train", 16, bpc, 0, 0, 0, 0, 0, int(15.36 * aot.GIB), None, 0.0, used=int(need(bpc)))
        return aot.Report("train", 16, bpc, 0, 0, 0, int(need(bpc)), 0, int(15.36 * aot.GIB), None, 0.0)

    monkeypatch.setattr(aot, "compile_train", fake)
    best, reports = aot.max_batch(None, [], start=4)
    want = min(b for b in range(1, 60) if need(b) > 15.36 * aot.GIB) - 1  # need() rises up to 62 rows
    assert best == want and reports[2].fits and len(reports) <= 8


@pytest.mark.parametrize("start,most", [(45, 2), (46, 2), (44, 3), (40, 4), (52, 4), (1, 5), (200, 5)])
def test_max_batch_near_a_guess(monkeypatch, start, most):
    """near=True: a right guess (45, or 46 just above it) takes two compiles, a close one a few more, and a guess
    far off on either side still ends at 45 with the failing neighbour compiled."""
    calls = _linear_compile(monkeypatch)
    best, reports = aot.max_batch(None, [], start=start, near=True)
    assert best == 45 and len(calls) == len(set(calls)) <= most, calls
    assert {45, 46} <= set(calls)


def test_max_batch_near_when_nothing_fits(monkeypatch):
    calls = []

    def fake(config, devices, bpc):
        calls.append(bpc)
        return aot.Report("train", 4, bpc, 0, 0, 0, 0, 0, 16 * aot.GIB, None, 0.0, used=int((20 + bpc) * aot.GIB))

    monkeypatch.setattr(aot, "compile_train", fake)
    assert aot.max_batch(None, [], start=6, near=True)[0] == 0 and calls == [6, 5, 1]


@pytest.mark.parametrize("start", [1, 4])
def test_max_batch_stops_when_one_row_does_not_fit(monkeypatch, start):
    """20 GiB before the first row on a 16 GiB chip: 0, after the start and one row (no bisection)."""
    calls = []

    def fake(config, devices, bpc):
        calls.append(bpc)
        return aot.Report("train", 4, bpc, 0, 0, 0, 0, 0, 16 * aot.GIB, None, 0.0, used=int((20 + bpc) * aot.GIB))

    monkeypatch.setattr(aot, "compile_train", fake)
    best, reports = aot.max_batch(None, [], start=start)
    assert best == 0 and calls == sorted({start, 1}, reverse=True)
    assert [r.batch_per_chip for r in reports] == calls


def test_hbm_of_topology_devices():
    """Compile-only devices have no memory stats: the chip's HBM by kind, less the runtime's reserve, split over
    the cores of a chip when each core is a device (v4's topology lists 2 a chip)."""
    from types import SimpleNamespace

    def dev(kind, core=0):
        return SimpleNamespace(device_kind=kind, core_on_chip=core, memory_stats=lambda: None)

    assert aot.hbm_bytes([dev("TPU v5 lite")] * 4) == int(16 * aot.GIB * 0.96)
    assert aot.hbm_bytes([dev("TPU v4", c) for c in (0, 1, 0, 1)]) == int(32 * aot.GIB * 0.96) // 2
    assert aot.hbm_bytes([dev("TPU v5"), dev("TPU v5")]) == int(95 * aot.GIB * 0.96)
    assert aot.hbm_bytes([dev("TPU v6 lite")]) == int(32 * aot.GIB * 0.96)
    assert aot.hbm_bytes([dev("cpu")]) is None
    real = SimpleNamespace(device_kind="TPU v5 lite", core_on_chip=0, memory_stats=lambda: {"bytes_limit": 12345})
    assert aot.hbm_bytes([real]) == 12345  # a real host: the runtime's own limit


def test_dashed_flag_names_are_read_as_underscored():
    argv = ["aot", "--max-batch", "--batch-per-chip=4", "--config.model.n_layer=2", "--config=configs/tiny.py",
            "--topology", "v5e:2x2", "--no-decode", "-x"]
    assert aot.underscored(argv) == ["aot", "--max_batch", "--batch_per_chip=4", "--config.model.n_layer=2",
                                     "--config=configs/tiny.py", "--topology", "v5e:2x2", "--nodecode", "-x"]


@pytest.mark.parametrize("error,expected", [
    ('ABORTED: Internal error when accessing libtpu multi-process lockfile. Run "$ sudo rm /tmp/libtpu_lockfile".',
     "set ALLOW_MULTIPLE_LIBTPU_LOAD=1"),
    ("No TPU platform found", 'install libtpu (pip install "jax[tpu]==<jax version>")'),
])
def test_topology_errors_name_the_fix(monkeypatch, error, expected):
    from jax.experimental import topologies

    def fail(**kwargs):
        raise RuntimeError(error)

    monkeypatch.setattr(topologies, "get_topology_desc", fail)
    with pytest.raises(SystemExit, match="v5e:2x2") as e:
        aot.topology_devices("v5e:2x2")
    assert expected in str(e.value) and "\n" not in str(e.value)
