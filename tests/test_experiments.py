"""Smoke tests of the design-choice studies (experiments/) at a tiny size: the files they write and the
numbers in them, so that the figures of docs/design.md cannot silently rot."""

from __future__ import annotations

import json
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import (
    common,
    kv_cache_flops,
    norm_placement,
    positions,
    run_all,
    weight_tying,
)
from jaxgpt.decode.kv_cache import init_cache
from jaxgpt.nn.config import GPTConfig
from jaxgpt.nn.model import GPT, init_params

TINY = dict(n_head=2, n_embd=16, block_size=16, batch_size=4, eval_iters=2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One runs folder for the module: the tying and positions studies share their tied / learned run."""
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, shared_dir):
    return common.char_data(tmp_path_factory.mktemp("data") / "char", shared_dir / "data" / "tinyshakespeare.txt")


def _png(path) -> None:
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


# ---------------------------------------------------------------------------------------------------------
# KV cache FLOPs


def test_flops_formulas_match_a_hand_count_and_xla():
    cfg = GPTConfig(vocab_size=97, block_size=128, n_layer=2, n_head=4, n_embd=128)
    C, L, V = 128, 2, 97
    for n in (1, 7, 15, 64):
        # dense re-computation is exactly n times the cached step: the "15x at 15 tokens"
        assert kv_cache_flops.flops_uncached(cfg, n) == n * kv_cache_flops.flops_cached(cfg, n)
        causal = kv_cache_flops.flops_uncached(cfg, n, causal_only=True)
        assert causal == kv_cache_flops.flops_uncached(cfg, n) - L * 2 * n * (n - 1) * C
    # per layer: c_attn C x 3C, c_proj C x C, c_fc C x 4C, mlp.c_proj 4C x C; q.K and p.V over n keys; the head
    n = 15
    by_hand = L * 2 * (3 * C * C + C * C + 4 * C * C + 4 * C * C + n * C + n * C) + 2 * C * V
    assert kv_cache_flops.flops_cached(cfg, n) == by_hand
    # XLA's count of the compiled programs: the formula's matmuls plus a few % of elementwise work
    model = GPT(cfg)
    params = init_params(cfg, 0)
    toks = jax.random.randint(jax.random.PRNGKey(1), (1, 32), 0, V)
    full = jax.jit(lambda p, t: model.apply({"params": p}, t))
    step = jax.jit(lambda p, t, c: model.apply({"params": p}, t, cache=c)[0])
    cache = init_cache(cfg, 1, 32).replace(lengths=jnp.full((1,), 31, jnp.int32))
    assert 1.0 <= kv_cache_flops.xla_flops(full, params, toks) / kv_cache_flops.flops_uncached(cfg, 32) < 1.06
    assert 1.0 <= kv_cache_flops.xla_flops(step, params, toks[:, -1:], cache) / kv_cache_flops.flops_cached(cfg, 32) < 1.06


def test_kv_study_tiny(tmp_path):
    s = kv_cache_flops.KVStudy(n_layer=1, n_head=2, n_embd=32, vocab_size=50, lengths=(8, 32), rounds=2,
                               e2e_prompt=4, e2e_new=6, table_lengths=(1, 15, 1024))
    res = kv_cache_flops.run(s, out_dir=tmp_path, progress=False)
    on_disk = json.loads((tmp_path / "kvflops_results.json").read_text())
    assert on_disk["formulas"] == kv_cache_flops.FORMULAS
    _png(tmp_path / "kvflops_ratio.png")
    rows = {r["n"]: r for r in res["analytic"]["rows"]}
    assert rows[15]["ratio"] == 15 and rows[1024]["ratio"] == 1024  # GPT-2 124M
    assert rows[15]["ratio_causal"] < 15 and rows[1]["ratio_causal"] == 1
    for r in res["measured"]["rows"]:
        assert r["flops_ratio"] == r["n"]
        assert r["ms_cached"] > 0 and r["ms_uncached"] > 0
        assert 1.0 <= r["xla_flops_uncached"] / r["flops_uncached"] < 1.2
    e2e = res["measured"]["end_to_end"]
    assert e2e["same_tokens"] and e2e["flops_ratio"] > 1


# ---------------------------------------------------------------------------------------------------------
# Weight tying


@pytest.mark.run
def test_weight_tying_tiny(tmp_path, data_dir, runs):
    s = weight_tying.TyingStudy(vocabs=("char",), n_layer=1, steps=12, warmup_iters=2, eval_interval=6, **TINY)
    res = weight_tying.run(s, data_dir=data_dir, workdir=runs, out_dir=tmp_path, progress=False,
                           check_pytree=False)  # tracing the 175B-shape pytree takes a minute
    assert json.loads((tmp_path / "tying_results.json").read_text())["trained"].keys() == {"char"}
    _png(tmp_path / "tying_loss.png")
    t = res["trained"]["char"]
    # counted from the trained params pytrees: tying removes exactly vocab x n_embd
    assert t["saved"] == t["vocab_size"] * s.n_embd == t["vocab_x_embd"]
    assert t["untied"]["params_pytree"] == t["untied"]["params"]["total"]
    for which in ("tied", "untied"):
        r = t[which]
        assert r["val_loss"] < math.log(t["vocab_size"]) - 0.05  # learned something past a uniform guess
        assert r["evals"][-1]["val_loss"] < r["evals"][0]["val_loss"] + 1e-3
    table = {r["name"]: r for r in res["param_table"]}
    # Hugging Face's GPT2LMHeadModel("gpt2").num_parameters() is 124,439,808 (tied)
    assert table["gpt2 (124M)"]["tied"] == 124_439_808
    for r in res["param_table"]:
        assert r["saved"] == 50257 * r["n_embd"] and r["untied"] - r["tied"] == r["saved"]
    assert 0.30 < table["gpt2 (124M)"]["saved_of_tied"] < 0.32
    assert table["GPT-3 175B shape (L96, C12288)"]["saved_of_tied"] < 0.005
    # the tied run is the positions study's learned run: one training, shared through the runs folder
    assert t["tied"]["workdir"] == str(common.run_dir(common.RunSpec(
        name="learned", model=dict(n_layer=1, n_head=2, n_embd=16, block_size=16, dropout=0.0),
        steps=12, batch_size=4, learning_rate=s.learning_rate, min_lr=s.min_lr, warmup_iters=2,
        eval_interval=6, eval_iters=2, seed=s.seed), data_dir, runs))


def test_param_table_counts_the_real_pytree():
    """param_count against the leaves of the params pytree (by shape only) for GPT-2 124M, tied and untied."""
    (row,) = weight_tying.param_table(weight_tying.SHAPES[:1])
    assert row["tied_pytree"] == row["tied"] == 124_439_808
    assert row["untied_pytree"] == row["untied"] == 124_439_808 + 50257 * 768


# ---------------------------------------------------------------------------------------------------------
# Positions


@pytest.mark.run
def test_positions_tiny(tmp_path, data_dir, runs):
    s = positions.PositionsStudy(methods=("learned", "rope"), n_layer=1, steps=12, warmup_iters=2,
                                 eval_interval=6, long_windows=8, **TINY)
    res = positions.run(s, data_dir=data_dir, workdir=runs, out_dir=tmp_path, progress=False)
    assert json.loads((tmp_path / "positions_results.json").read_text())["methods"].keys() == {"learned", "rope"}
    _png(tmp_path / "positions_loss.png")
    learned, rope = res["methods"]["learned"], res["methods"]["rope"]
    T, C = s.block_size, s.n_embd
    # learned positions cannot go past the table; rope is evaluated on all 2T positions
    assert not learned["extrapolates"] and learned["loss_beyond_context"] is None
    assert len(learned["loss_per_position"]) == T and len(rope["loss_per_position"]) == 2 * T
    assert rope["extrapolates"] and math.isfinite(rope["loss_beyond_context"])
    assert learned["params"]["positions"] == T * C and rope["params"]["positions"] == 0
    assert learned["params"]["total"] - rope["params"]["total"] == T * C
    vocab = res["vocab_size"]
    for r in (learned, rope):
        assert r["val_loss"] < math.log(vocab) - 0.05
        assert abs(np.mean(r["loss_per_position"][:T]) - r["loss_within_context"]) < 1e-9


def test_loss_per_position_matches_numpy(data_dir):
    """The per-position loss against a float64 NumPy log-softmax of the same logits."""
    cfg = GPTConfig(vocab_size=65, block_size=16, n_layer=1, n_head=2, n_embd=16, pos_embedding="rope")
    params = init_params(cfg, 3)
    x, y = common.val_windows(data_dir, 32, 5, seed=1)  # twice block_size: rope has no table
    got = common.loss_per_position(cfg, params, x, y, batch=2)
    logits = np.asarray(jax.jit(GPT(cfg).apply)({"params": params}, jnp.asarray(x)), np.float64)  # [5, 32, V]
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    want = -np.take_along_axis(logp, y[..., None], -1)[..., 0].mean(0)
    chex.assert_shape(got, (32,))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Norm placement


@pytest.mark.run
def test_norm_placement_tiny(tmp_path, data_dir):
    s = norm_placement.NormStudy(depths=(2,), norms=("layernorm",), warmups=(0,), steps=12, grad_batch=4,
                                 learning_rate=3e-3, trained=None, lr_sweep=(), lr_sweep_depth=2, **TINY)
    res = norm_placement.run(s, data_dir=data_dir, workdir=tmp_path / "wd", out_dir=tmp_path, progress=False)
    assert json.loads((tmp_path / "norm_placement.json").read_text())["runs"] == res["runs"]
    _png(tmp_path / "norm_curves.png")
    _png(tmp_path / "norm_grad_init.png")
    assert [(r["placement"], r["norm"]) for r in res["runs"]] == [("pre", "layernorm"), ("post", "layernorm")]
    for r in res["runs"]:
        assert len(r["loss"]) == s.steps and r["non_finite_step"] is None and not r["diverged"]
        assert np.mean(r["loss"][-3:]) < r["loss"][0] - 0.05  # loss decreases
        assert abs(r["loss"][0] - res["divergence_threshold"]) < 0.3  # starts near ln V
        assert r["outcome"] == "stalled"  # 12 steps do not get past the character frequencies
    assert 3.0 < res["unigram_entropy"] < res["divergence_threshold"]
    for g in res["grad_norms_init"].values():
        assert len(g["blocks"]) == 2 and all(math.isfinite(v) and v > 0 for v in g["blocks"])
    # the same seed and batch give the same initial loss for both placements (the only switch is placement)
    losses = [g["loss"] for g in res["grad_norms_init"].values()]
    assert abs(losses[0] - losses[1]) < 0.2
    # Post-LN's block-0 gradient spike comes from the tiny embedding scale: it shrinks with unit-size embeddings
    c = res["embedding_scale_check"]
    assert len(c["embedding_x1"]) == len(c["embedding_x50"]) == 2
    assert c["embedding_x50"][0] < c["embedding_x1"][0]
    # the sweep figure, from the grid's runs relabelled as a sweep (no extra training)
    res["lr_sweep"] = [{**r, "peak_lr": 1e-3} for r in res["runs"]]
    assert [r["peak_lr"] for r in norm_placement.sweep_points(res)] == [1e-3, 3e-3] * 2
    _png(norm_placement.plot_lr_sweep(res, tmp_path / "norm_lr_sweep.png"))


def _result(loss, non_finite=None) -> common.RunResult:
    return common.RunResult(name="x", config=GPTConfig.preset("tiny"), steps=list(range(len(loss))), loss=loss,
                            grad_norm=[1.0] * len(loss), lr=[1e-3] * len(loss), evals=[],
                            non_finite_step=non_finite, wall_s=0.0, workdir=None)


def test_divergence_rule_and_climb():
    ln_v = math.log(65)
    assert not _result([4.2, 3.0, 2.5, 2.4]).diverged(ln_v)
    assert _result([4.2, 3.0, 5.0, 6.0]).diverged(ln_v)  # ends above a uniform guess
    assert _result([4.2, 3.0], non_finite=2).diverged(ln_v)
    assert _result([4.2, 3.0], non_finite=2).final_loss() == math.inf
    assert _result([4.2, 3.0, 2.5, 2.4]).outcome(ln_v, unigram=3.3) == "trained"
    assert _result([4.2, 3.4, 3.3, 3.28]).outcome(ln_v, unigram=3.3) == "stalled"  # character frequencies only
    assert _result([4.2, 3.0], non_finite=2).outcome(ln_v, unigram=3.3) == "diverged"
    assert norm_placement.max_regression([4.0, 3.0, 2.0, 1.0], k=1) == 0.0
    assert norm_placement.max_regression([4.0, 2.0, 3.5, 1.0], k=1) == pytest.approx(1.5)


def test_smooth_is_a_trailing_mean():
    v = np.random.default_rng(0).normal(size=17)
    want = np.array([v[max(0, i - 3):i + 1].mean() for i in range(17)])
    np.testing.assert_allclose(common.smooth(v, 4), want, rtol=1e-12)


def test_run_all_lists_every_study(capsys):
    names = [n for n, _ in run_all.available()]
    assert {"kv_cache_flops", "weight_tying", "positions", "norm_placement"} <= set(names)
    assert run_all.main(["--list", "--only", "positions"]) == 0
    assert capsys.readouterr().out.startswith("python -m experiments.positions")
    with pytest.raises(ValueError, match="unknown studies"):
        run_all.available(["nope"])


def test_ladder_steps_to_target_interpolates_between_the_straddling_evaluations():
    from experiments import ladder

    evals = [{"step": 50, "val_loss": 2.4}, {"step": 100, "val_loss": 2.0}, {"step": 150, "val_loss": 1.9}]
    assert ladder.steps_to(evals, 2.1) == pytest.approx(87.5)  # 2.4 -> 2.0 over 50 steps: 2.1 a quarter before
    assert ladder.steps_to(evals, 2.5) == 50.0 and ladder.steps_to(evals, 1.9) == 150.0
    assert ladder.steps_to(evals, 1.8) is None


@pytest.mark.run
def test_ladder_tiny(tmp_path, data_dir):
    """GPT-2 and the top rung (every model switch, then Muon) at a tiny size: the JSON, the target, the KV bytes of
    an empty cache (1 layer x K and V x heads x 4 float32 values), the parameters of the pytree, the figure."""
    from configs import ladder as ladder_config
    from experiments import ladder

    s = ladder.LadderStudy(rungs=("gpt2", "muon"), seeds=(0,), steps=4, eval_interval=2, eval_iters=1, n_layer=1,
                           n_embd=16, block_size=16, batch_size=4, warmup_iters=1, cost_rounds=1)
    res = ladder.run(s, data_dir=data_dir, workdir=tmp_path / "runs", out_dir=tmp_path, progress=False)
    saved = json.loads((tmp_path / "ladder.json").read_text())
    assert saved["summary"] == res["summary"] and (tmp_path / "ladder.png").stat().st_size > 10_000
    gpt2, top = res["summary"]["rungs"]
    assert res["summary"]["target_val_loss"] == gpt2["final_val_loss"]["median"] == res["runs"][0]["final_val_loss"]
    assert gpt2["steps_to_target"]["median"] <= 4 and [e["step"] for e in res["runs"][0]["evals"]] == [2, 4]
    assert (gpt2["kv_bytes_per_token"], top["kv_bytes_per_token"]) == (2 * 4 * 4 * 4, 2 * 1 * 4 * 4)
    cfg = GPTConfig(vocab_size=65, n_layer=1, n_head=4, n_embd=16, block_size=16, bias=False,
                    **ladder_config.switches("muon")[0])
    assert top["params"] == sum(x.size for x in jax.tree.leaves(jax.eval_shape(lambda: init_params(cfg, 0))))
    assert top["switches"]["train"] == {"optimizer": "muon"} and top["ms_per_step"]["median"] > 0
    assert "| muon |" in ladder.table(res)
    cost = res["step_cost"]  # the two rungs timed back to back: GPT-2 against itself is 1
    assert cost["vs_gpt2"]["gpt2"] == 1.0 and cost["ms_per_step"]["muon"] > 0
    got, steps_ = top["wall_to_target_vs_gpt2_back_to_back"]["median"], top["steps_to_target"]["median"]
    assert got == (None if steps_ is None else pytest.approx(steps_ * cost["vs_gpt2"]["muon"] / 4))
