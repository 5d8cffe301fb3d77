"""Smoke test of experiments/quantize_layernorm.py at a tiny size (the real run is minutes of training)."""

from __future__ import annotations

import json
import math

import chex
import pytest

from experiments.quantize_layernorm import (
    StudyConfig,
    load_text,
    model_config,
    run,
    trained_params,
)


@pytest.mark.run
def test_quantize_layernorm_study_tiny(tmp_path, shared_dir):
    sc = StudyConfig(data=str(shared_dir / "data" / "tinyshakespeare.txt"), workdir=str(tmp_path / "wd"),
                     out_dir=str(tmp_path / "out"), norms=("layernorm",), n_layer=1, n_head=2, n_embd=64,
                     block_size=32, steps=40, batch_size=8, warmup=5, eval_windows=8, group_size=64,
                     gpt2_sizes=False)
    res = run(sc)
    on_disk = json.loads((tmp_path / "out" / "quant_layernorm.json").read_text())
    assert on_disk["models"].keys() == {"layernorm"}
    assert (tmp_path / "out" / "quant_layernorm.png").stat().st_size > 10_000
    m = res["models"]["layernorm"]
    v = m["variants"]
    assert list(v) == ["fp32", "int8", "int8 + norms int8", "int8 + norms int4", "int4 g128"]
    assert v["fp32"]["agreement"] == 1.0
    # 40 steps already beat the uniform guess over the vocabulary
    assert math.isfinite(v["fp32"]["perplexity"]) and v["fp32"]["perplexity"] < res["vocab_size"]
    assert abs(v["int8"]["ppl_change_pct"]) < 2.0 and v["int8"]["agreement"] > 0.9
    assert v["int4 g128"]["bytes"] < v["int8 + norms int4"]["bytes"] < v["int8 + norms int8"]["bytes"] \
        < v["int8"]["bytes"] < v["fp32"]["bytes"]
    assert m["int8_quantized_weights_ratio"] < 0.27

    # a second call reuses the cached params instead of training again
    log = tmp_path / "wd" / "layernorm" / "train_log.jsonl"
    mtime = log.stat().st_mtime_ns
    tok, train_ids, _ = load_text(sc.data)
    cfg = model_config(sc, tok.vocab_size, "layernorm")
    p1, _ = trained_params(sc, cfg, train_ids)
    p2, _ = trained_params(sc, cfg, train_ids)
    assert log.stat().st_mtime_ns == mtime
    chex.assert_trees_all_equal(p1, p2)
