"""benchmarks/tpu_fit.py without compiling: the grid, how runners share it, and the table of finished rows."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

GIB = 2**30


@pytest.fixture(scope="module")
def tpu_fit():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "tpu_fit.py"
    spec = importlib.util.spec_from_file_location("tpu_fit", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_grid_has_every_row_once_fsdp_full_first(tpu_fit):
    rows = tpu_fit.rows()
    assert len(rows) == len(set(rows)) == 4 * 5 * 3 * 2
    assert all(r[2:] == ("full", "fsdp") for r in rows[:20])


def test_runners_share_the_rows_and_skip_finished_ones(tpu_fit, tmp_path, monkeypatch):
    done = tpu_fit.row_name(*tpu_fit.rows()[3])
    (tmp_path / f"{done}.json").write_text("{}")
    ran: dict[str, list[str]] = {}

    def fake_run(cmd, **kwargs):
        ran.setdefault(shard, []).append(Path(cmd[-1].split("=", 1)[1]).stem)
        assert kwargs["env"]["ALLOW_MULTIPLE_LIBTPU_LOAD"] == "1"
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(tpu_fit.subprocess, "run", fake_run)
    for shard in ("0/2", "1/2"):
        tpu_fit.run(tmp_path, [], shard)
    names = {tpu_fit.row_name(*r) for r in tpu_fit.rows()}
    assert not set(ran["0/2"]) & set(ran["1/2"])
    assert set(ran["0/2"]) | set(ran["1/2"]) == names - {done}
    ran.clear()
    shard = "0/1"
    tpu_fit.run(tmp_path, ["124M", "v5p-8", "fsdp_full"], shard)
    assert ran["0/1"] == ["124M_v5p-8_fsdp_full"]


def _report(bpc: int, total_gib: float, fits: bool) -> dict:
    return {"step": "train", "batch_per_chip": bpc, "total": total_gib * GIB, "fits": fits, "hbm": 15.36 * GIB,
            "model_flops": 1e15 * bpc}


def test_table_of_a_fitting_and_a_non_fitting_row(tpu_fit, tmp_path):
    fits = [_report(8, 3.0, True), _report(16, 5.0, True), _report(40, 13.0, True), _report(41, 15.5, False)]
    (tmp_path / "124M_v5e-16_fsdp_full.json").write_text(json.dumps({"reports": fits}))
    (tmp_path / "1.5B_v5e-16_dp_none.json").write_text(json.dumps({"reports": [_report(2, 40.0, False),
                                                                                _report(1, 30.0, False)]}))
    lines = tpu_fit.table(tmp_path).splitlines()
    assert len(lines) == 4
    assert lines[2] == ("| 124M | v5e-16 | fsdp 16 | full | 40 | 13.00 (15.36) | 0.250 | 40000 | "
                        "8 (3.00), 16 (5.00), 40 (13.00), 41 (15.50) |")
    assert lines[3] == "| 1.5B | v5e-16 | data 16 | none | 0 (does not fit) | 30.00 at 1 (15.36) | 10.000 | - | 1 (30.00), 2 (40.00) |"
