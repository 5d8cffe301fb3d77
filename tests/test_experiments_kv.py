"""Smoke test of experiments/kv_compression.py at a tiny size: a random tiny model (the real study trains one)."""

from __future__ import annotations

import json

import chex
import numpy as np
import pytest

from experiments import kv_compression as kvc
from jaxgpt.nn.config import GPTConfig
from jaxgpt.nn.model import init_params

KINDS = ("float32", "int8", "turbo2", "uniform2")
STUDY = kvc.KVStudy(kinds=KINDS, block_size=48, eval_windows=3, prefix=8, prompts=2, prompt_len=8, new_tokens=12,
                    speed_repeats=1)


@pytest.fixture(scope="module")
def tiny() -> tuple[GPTConfig, dict, np.ndarray, np.ndarray, np.ndarray]:
    cfg = GPTConfig.preset("tiny", block_size=48, n_layer=1, n_head=2, n_embd=32)  # head_dim 16
    params = init_params(cfg, 3)
    rng = np.random.default_rng(7)
    toks = rng.integers(0, cfg.vocab_size, (3, 49), dtype=np.int32)
    prompts = rng.integers(0, cfg.vocab_size, (2, 8), dtype=np.int32)
    return cfg, params, toks[:, :-1], toks[:, 1:], prompts


def test_dense_cache_matches_full_forward_float64(tiny):
    """Teacher forcing through the dense cache equals the full forward pass; both match a float64 NLL."""
    cfg, params, x, y, _ = tiny
    nll_c, logits_c = kvc.teacher_forced(params, x, y, cfg=cfg, kind="float32", prefix=STUDY.prefix, seed=0)
    nll_f, logits_f = kvc.full_forward(params, x, y, cfg=cfg)
    chex.assert_shape(logits_c, (3, 48, cfg.vocab_size))
    chex.assert_trees_all_close(logits_c, logits_f, atol=2e-5, rtol=2e-5)
    lg = np.asarray(logits_f, np.float64)  # an independent log-softmax in float64
    top = lg.max(-1)
    ref = np.log(np.exp(lg - top[..., None]).sum(-1)) + top - np.take_along_axis(lg, y[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(nll_c), ref, atol=2e-5)
    np.testing.assert_allclose(np.asarray(nll_f), ref, atol=2e-5)


def test_study_tiny_writes_outputs(tiny, tmp_path):
    cfg, params, x, y, prompts = tiny
    res = kvc.evaluate(STUDY, cfg, params, x, y, prompts, progress=False)
    res.update({"study": kvc.dataclasses.asdict(STUDY), "model": {"config": cfg.to_dict()}})
    j, p = kvc.write_outputs(res, tmp_path, "_tiny")
    on_disk = json.loads(j.read_text())
    assert list(on_disk["kinds"]) == list(STUDY.kinds)
    assert p.stat().st_size > 10_000
    ks = res["kinds"]
    c = res["dense_check"]
    assert c["rel_ppl_diff"] < 1e-5 and c["max_abs_nll_diff"] < 2e-5, c
    assert ks["float32"]["greedy_agreement"] == 1.0 and ks["float32"]["logit_rmse"] == 0.0
    assert ks["float32"]["ppl_increase_pct"] == 0.0
    assert 0 < ks["int8"]["logit_rmse"] < ks["turbo2"]["logit_rmse"], ks
    assert ks["int8"]["nll_mean_abs_diff"] < ks["turbo2"]["nll_mean_abs_diff"]
    assert abs(ks["int8"]["ppl_increase_pct"]) < abs(ks["turbo2"]["ppl_increase_pct"]) + 1e-9
    # bits from kv_compress: b + 16/D for turbo/uniform (D = 16 here), mixed b.5 adds a second norm
    assert kvc.bits_and_bytes(cfg, "turbo4", 48)["bits_per_value"] == pytest.approx(4 + 16 / 16)
    assert ks["turbo2"]["bits_per_value"] == ks["uniform2"]["bits_per_value"] == pytest.approx(2 + 1)
    assert kvc.bits_and_bytes(cfg, "turbo3.5", 48)["bits_per_value"] == pytest.approx(3.5 + 32 / 16)
    assert ks["int8"]["bits_per_value"] == pytest.approx(8 + 1)
    assert ks["turbo2"]["gpt2_x_smaller_than_bf16"] > ks["int8"]["gpt2_x_smaller_than_bf16"] > 1.0
    for r in ks.values():
        assert r["tokens_per_s"] > 0 and 0.0 <= r["greedy_agreement"] <= 1.0
    assert "| turbo2 |" in kvc.summary(res)


def test_bad_settings_raise(tiny):
    cfg, params, x, y, prompts = tiny
    with pytest.raises(ValueError, match="turbo5"):
        kvc.evaluate(STUDY, cfg, params, x, y, prompts, kinds=("float32", "turbo5"), progress=False)
    with pytest.raises(ValueError, match="dense reference"):
        kvc.evaluate(STUDY, cfg, params, x, y, prompts, kinds=("int8",), progress=False)
    with pytest.raises(ValueError, match="prefix"):
        kvc.evaluate(kvc.dataclasses.replace(STUDY, prefix=0), cfg, params, x, y, prompts, progress=False)
