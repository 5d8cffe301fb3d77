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
    assert (tmp_path / "logs" / "124M_v5p-8_fsdp_full.log").exists()
    ran.clear()
    tpu_fit.run(tmp_path, ["v5p-8", "1.5B"], shard, skip=("fsdp_full", "_dp_"))
    assert sorted(ran["0/1"]) == ["1.5B_v5p-8_fsdp_dots_saveable", "1.5B_v5p-8_fsdp_none"]


def _report(bpc: int, total_gib: float, fits: bool) -> dict:
    return {"step": "train", "batch_per_chip": bpc, "total": total_gib * GIB, "fits": fits, "hbm": 15.36 * GIB,
            "model_flops": 1e15 * bpc}


def test_table_of_a_fitting_and_a_non_fitting_row(tpu_fit, tmp_path):
    fits = [_report(8, 3.0, True), _report(16, 5.0, True), _report(40, 13.0, True), _report(41, 15.5, False)]
    (tmp_path / "124M_v5e-16_fsdp_full.json").write_text(json.dumps({"reports": fits}))
    (tmp_path / "1.5B_v5e-16_dp_none.json").write_text(json.dumps({"reports": [_report(2, 40.0, False),
                                                                                _report(1, 30.0, False)]}))
    (tmp_path / "1.5B_v6e-8_dp_none.json").write_text(json.dumps({"reports": [_report(1, 39.0, False)]}))
    lines = tpu_fit.table(tmp_path).splitlines()
    assert len(lines) == 5
    assert lines[4] == "| 1.5B | v6e-8 | data 8 | none | 0 (does not fit) | 39.00 at 1 (15.36) | - | - | 1 (39.00) |"
    assert lines[2] == ("| 124M | v5e-16 | fsdp 16 | full | 40 | 13.00 (15.36) | 2.500 | 40000 | "
                        "8 (3.00), 16 (5.00), 40 (13.00), 41 (15.50) |")
    assert lines[3] == "| 1.5B | v5e-16 | data 16 | none | 0 (does not fit) | 30.00 at 1 (15.36) | 10.000 | - | 1 (30.00), 2 (40.00) |"
    assert tpu_fit.table(tmp_path, skip=["fsdp_full"]).splitlines() == lines[:2] + lines[3:]
    assert tpu_fit.table(tmp_path, only=["v6e-8"]).splitlines() == lines[:2] + lines[4:]


def test_guess_from_the_same_row_on_another_topology(tpu_fit, tmp_path):
    """1 GiB at no rows over 16 chips is 2 GiB over 8 (FSDP; the same under data parallelism), 0.5 GiB a row:
    on a 30.72 GiB chip the guess is (30.72 - 2) / 0.5 = 57 rows (59 data parallel). --near goes with it."""
    row = [_report(10, 6.0, True), _report(11, 6.5, False)]
    for mesh in ("fsdp", "dp"):
        (tmp_path / f"124M_v5e-16_{mesh}_full.json").write_text(json.dumps({"reports": row}))
    (tmp_path / "355M_v6e-8_fsdp_full.json").write_text(json.dumps({"reports": [{**_report(4, 2.0, True),
                                                                                 "hbm": 30.72 * GIB}]}))
    assert tpu_fit.guess(tmp_path, "124M", "v6e-8", "full", "fsdp") == 57
    assert tpu_fit.guess(tmp_path, "124M", "v6e-8", "full", "dp") == 59
    assert tpu_fit.guess(tmp_path, "124M", "v4-8", "full", "fsdp") is None  # nothing known of the chip
    assert tpu_fit.guess(tmp_path, "774M", "v6e-8", "full", "fsdp") is None  # nor of the model
    assert tpu_fit.guess(tmp_path, "124M", "v5e-64", "full", "fsdp") == int((15.36 - 0.25) / 0.5)  # v5e-16's chip
    assert "--near" in tpu_fit.aot_args("124M", "v6e-8", "full", "fsdp", start=57)
    assert "--batch_per_chip=8" in tpu_fit.aot_args("124M", "v6e-8", "full", "fsdp")


def test_largest_and_plot(tpu_fit, tmp_path):
    (tmp_path / "124M_v5e-16_fsdp_full.json").write_text(json.dumps(
        {"reports": [_report(8, 3.0, True), _report(40, 13.0, True), _report(41, 15.5, False)]}))
    (tmp_path / "1.5B_v5e-16_dp_none.json").write_text(json.dumps({"reports": [_report(1, 30.0, False)]}))
    assert tpu_fit.largest(tmp_path) == {("124M", "v5e-16", "full", "fsdp"): 40, ("1.5B", "v5e-16", "none", "dp"): 0}
    assert tpu_fit.largest(tmp_path, skip=["fsdp_full"]) == {("1.5B", "v5e-16", "none", "dp"): 0}
    tpu_fit.plot(tmp_path, tmp_path / "fit.png")
    assert (tmp_path / "fit.png").read_bytes()[:4] == b"\x89PNG"


def test_refresh_regenerates_each_marked_table_with_its_filters(tpu_fit, tmp_path):
    (tmp_path / "124M_v5e-16_fsdp_full.json").write_text(json.dumps({"reports": [_report(8, 3.0, True)]}))
    (tmp_path / "124M_v6e-8_dp_none.json").write_text(json.dumps({"reports": [_report(2, 9.0, True)]}))
    doc = ("intro\n<!-- tpu_fit table --only fsdp_full: begin -->\nstale\n<!-- tpu_fit table --only fsdp_full: end -->\n"
           "middle\n<!-- tpu_fit table --skip fsdp_full: begin -->\n| old |\n<!-- tpu_fit table --skip fsdp_full: end -->\n")
    got = tpu_fit.refresh(doc, tmp_path)
    assert got == doc.replace("stale", tpu_fit.table(tmp_path, only=["fsdp_full"])).replace(
        "| old |", tpu_fit.table(tmp_path, skip=["fsdp_full"]))
    assert "| 124M | v5e-16 |" in got.split("middle")[0] and "| 124M | v6e-8 |" in got.split("middle")[1]
    assert tpu_fit.refresh(got, tmp_path) == got
    with pytest.raises(ValueError, match="not after --only or --skip"):
        tpu_fit.refresh(doc.replace("--only fsdp_full", "fsdp_full"), tmp_path)


def test_the_tables_of_docs_scale_are_the_rows_kept(tpu_fit):
    """docs/scale.md's fit tables are what `tpu_fit.py docs` makes of docs/figures/tpu_fit/: a row measured again
    (or edited by hand) shows up here until the docs are regenerated."""
    text = tpu_fit.DOC.read_text()
    assert text.count("<!-- tpu_fit table") == 4  # two tables, each between a begin and an end line
    assert tpu_fit.refresh(text, tpu_fit.ROWS) == text, "run: tpu_fit.py docs"
    assert len(list(tpu_fit.ROWS.glob("*.json"))) == len(tpu_fit.rows())
