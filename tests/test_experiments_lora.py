"""Smoke test of experiments/lora_rank.py at a tiny size (the real run is minutes of CPU training)."""

from __future__ import annotations

import json
import math

import pytest

from experiments.lora_rank import (
    LearningConfig,
    learning_study,
    plot_learning,
    plot_variance,
    variance_study,
)
from jaxgpt import lora


def test_variance_slopes(tmp_path):
    res = variance_study(ranks=(1, 4, 16, 64, 256), dim=256, alpha=5.0, seeds=4)
    # the estimate's relative spread is about 2 / sqrt(dim * seeds) at r = 1 and shrinks with r
    assert res["slope"]["lora"] == pytest.approx(-1.0, abs=0.03)  # Var = alpha^2 / r
    assert res["slope"]["rslora"] == pytest.approx(0.0, abs=0.03)  # Var = alpha^2
    assert res["max_rel_err"]["lora"] < 0.25 and res["max_rel_err"]["rslora"] < 0.25
    for row in res["rows"]:
        assert row["lora"]["theory"] == pytest.approx(25.0 / row["rank"])
        assert row["rslora"]["theory"] == pytest.approx(25.0)
    plot_variance(res, tmp_path / "v.png")
    assert (tmp_path / "v.png").stat().st_size > 10_000


@pytest.mark.run
def test_learning_study_tiny(tmp_path, shared_dir):
    lc = LearningConfig(base_text=str(shared_dir / "data" / "tinyshakespeare.txt"), workdir=str(tmp_path / "wd"),
                        n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4, base_steps=30, ft_steps=6,
                        ft_lr=1e-2, alpha=3.0, ranks=(4,), eval_every=3, eval_windows=4, full_finetune=False,
                        ft_seeds=(1,))
    res = learning_study(lc)
    assert set(res["runs"]) == {"lora_r4", "rslora_r4"}
    assert res["runs"]["lora_r4"]["scale"] == pytest.approx(0.75) and res["runs"]["rslora_r4"]["scale"] == 1.5
    start = {name: run["curve"][0]["target_val_loss"] for name, run in res["runs"].items()}
    # B starts at zero: every run starts from the base's own loss
    assert max(start.values()) - min(start.values()) < 1e-5
    assert res["base_on_target"] == pytest.approx(start["lora_r4"])
    assert res["runs"]["lora_r4"]["final"]["target_val_loss"] != res["runs"]["rslora_r4"]["final"]["target_val_loss"]
    for name, run in res["runs"].items():
        assert [c["step"] for c in run["curve"]] == [0, 3, 6]
        assert all(math.isfinite(c["target_val_loss"]) for c in run["curve"])
        assert run["final"]["target_val_loss"] < start[name]  # a few steps on the target text help
        lcfg = lora.LoraConfig(rank=run["rank"], alpha=3.0, targets=("all",), rank_stabilized=run["method"] == "rslora")
        assert run["scale"] == pytest.approx(lora.lora_scale(lcfg))
        assert run["trainable"] == run["rank"] * ((16 + 48) + (16 + 16) + (16 + 64) + (64 + 16))
    lines = (tmp_path / "wd" / "metrics.jsonl").read_text().splitlines()
    assert {json.loads(line)["run"] for line in lines} == {"base", *(f"{n}/seed1" for n in res["runs"])}
    plot_learning(res, tmp_path / "l.png")
    assert (tmp_path / "l.png").stat().st_size > 10_000
