"""benchmarks/gpu_suite.sh --smoke on the CPU: the script a GPU run depends on runs end to end, writes its JSON and
table, and counts the bytes a decode step reads the way the model's shapes say it should."""

from __future__ import annotations

import json
import subprocess

from helpers import REPO, xla_env


def test_gpu_suite_smoke_writes_rows_and_counts_decode_bytes(tmp_path):
    out = tmp_path / "suite"
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--smoke", str(out)],
                          env=xla_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "gpu_suite.json").read_text())
    assert report["smoke"] is True
    train = [r for r in report["rows"] if r["kind"] == "train"]
    decode = {(r["weights"], r["batch"]): r for r in report["rows"] if r["kind"] == "decode"}
    assert [(r["attention"], r["remat"]) for r in train] == [("xla", "none"), ("xla", "dots_saveable")]
    assert all(r["tokens_per_s"] > 0 and r["mfu"] is None for r in train)  # no peak FLOPs known for a CPU
    assert set(decode) == {("bf16", 1), ("bf16", 4), ("int8", 1), ("int8", 4)}
    # smoke model: 2 layers, n_embd 64, prompt 16, 32 new tokens; a row's bf16 K and V at the mean length read
    kv_row = 2 * 2 * 64 * 2 * (16 + 32 / 2)
    for weights in ("bf16", "int8"):
        grown = decode[weights, 4]["bytes_per_step"] - decode[weights, 1]["bytes_per_step"]
        assert abs(grown - 3 * kv_row) < 1e-6
    assert all(r["tokens_per_s"] > 0 for r in decode.values())
    assert decode["int8", 1]["bytes_per_step"] < decode["bf16", 1]["bytes_per_step"]
    table = (out / "gpu_suite.md").read_text()
    assert table.count("| train |") == 2 and table.count("| decode |") == 4
