"""Training (jaxgpt.train.steps, runs, trainer): schedule, loss and the full train step against independent references (nanoGPT's formula,
float64 NumPy, transformers GPT-2 + torch AdamW), gradient accumulation, mixed precision, the training loop,
fine-tuning from Hugging Face and from a jaxgpt run, and non-finite losses."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxgpt import data as data_lib
from jaxgpt.io.hf import export_hf_gpt2
from jaxgpt.io.workdir import Workdir
from jaxgpt.nn.config import GPTConfig
from jaxgpt.nn.model import init_params
from jaxgpt.train import config as train_config
from jaxgpt.train import metrics, steps, trainer
from jaxgpt.train.config import OptimConfig
from jaxgpt.train.run import model_config

REPO = Path(__file__).resolve().parents[1]
from helpers import SHARED

pytestmark = pytest.mark.run

SHAKESPEARE = SHARED / "data" / "tinyshakespeare.txt"
BPE = SHARED / "data" / "gpt2.tiktoken"


def load_config(name: str):
    if str(REPO) not in sys.path:  # as for `python train.py`: configs may import their siblings (`from configs import`)
        sys.path.insert(0, str(REPO))
    return train_config.load_config_file(str(REPO / "configs" / f"{name}.py"))


def nanogpt_lr(it, lr, min_lr, warmup, decay):  # nanoGPT train.py get_lr, verbatim logic
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > decay:
        return min_lr
    ratio = (it - warmup) / (decay - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "configs").glob("*.py")))
def test_every_config_loads_and_validates(name):
    c = load_config(name)
    train_config.validate(c)


def test_cpu_recipe_is_nanogpts_command_line():
    """configs/shakespeare_char_cpu.py = shakespeare_char + nanoGPT's README flags for the CPU run."""
    c, base = load_config("shakespeare_char_cpu"), load_config("shakespeare_char")
    m = c.model
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.dropout, m.bias) == (4, 4, 128, 64, 0.0, False)
    assert (c.batch_size, c.max_iters, c.lr_decay_iters, c.eval_iters) == (12, 2000, 2000, 20)
    for k in ("learning_rate", "min_lr", "beta2", "warmup_iters", "eval_interval", "weight_decay", "grad_clip"):
        assert c[k] == base[k], k


class ScheduleAndLossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_lr_schedule_matches_nanogpt(self):
        c = train_config.base_config()
        c.learning_rate, c.min_lr, c.warmup_iters, c.lr_decay_iters = 6e-4, 6e-5, 37, 401
        sched = self.variant(steps.lr_schedule(OptimConfig.of(c)))
        for it in [0, 1, 17, 36, 37, 38, 100, 219, 400, 401, 402, 5000]:
            ref = nanogpt_lr(it, 6e-4, 6e-5, 37, 401)
            np.testing.assert_allclose(float(sched(jnp.int32(it))), ref, rtol=2e-6, err_msg=f"iter {it}")
        c.decay_lr = False
        const = self.variant(steps.lr_schedule(OptimConfig.of(c)))
        assert float(const(jnp.int32(10**6))) == pytest.approx(6e-4)

    @chex.variants(with_jit=True, without_jit=True)
    def test_cross_entropy_matches_float64_numpy(self):
        rng = np.random.default_rng(0)
        logits = rng.normal(size=(3, 7, 11)).astype(np.float32) * 3
        targets = rng.integers(0, 11, size=(3, 7))
        l64 = logits.astype(np.float64)
        logz = np.log(np.exp(l64 - l64.max(-1, keepdims=True)).sum(-1)) + l64.max(-1)
        ref = np.mean(logz - np.take_along_axis(l64, targets[..., None], -1)[..., 0])
        got = self.variant(steps.cross_entropy)(jnp.asarray(logits), jnp.asarray(targets))
        np.testing.assert_allclose(float(got), ref, rtol=1e-6)


def test_schedule_rejects_decay_before_warmup():
    c = train_config.base_config()
    c.warmup_iters, c.lr_decay_iters = 100, 50
    with pytest.raises(ValueError, match="lr_decay_iters=50 must be larger than warmup_iters=100"):
        steps.lr_schedule(OptimConfig.of(c))


def test_weight_decay_only_on_2d_weights():
    cfg = GPTConfig.preset("tiny", tie_embeddings=False)
    mask = steps.decay_mask(init_params(cfg, 0))
    assert mask["wte"]["embedding"] and mask["lm_head"]["kernel"] and mask["h_0"]["mlp"]["c_fc"]["kernel"]
    assert not mask["h_0"]["mlp"]["c_fc"]["bias"] and not mask["h_0"]["ln_1"]["scale"]
    assert not mask["ln_f"]["bias"]


def test_train_steps_match_transformers_and_torch_adamw(tmp_path):
    """Three steps of jaxgpt's jitted step == GPT2LMHeadModel + torch AdamW (decay groups), clip_grad_norm_
    and nanoGPT's lr schedule, from the same weights on the same batches: losses and final weights."""
    import torch
    import torch.nn.functional as F
    from transformers import GPT2LMHeadModel

    cfg = GPTConfig.preset("tiny", n_layer=2, n_embd=32, n_head=4, block_size=16)
    c = train_config.base_config()
    c.learning_rate, c.min_lr, c.warmup_iters, c.lr_decay_iters = 3e-3, 3e-4, 1, 3
    c.weight_decay, c.beta2, c.grad_clip = 0.1, 0.95, 0.3
    params = init_params(cfg, 3)
    export_hf_gpt2(cfg, params, tmp_path / "hf")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf", attn_implementation="eager").double()
    hf.train()
    decay = [p for p in hf.parameters() if p.dim() >= 2]
    no_decay = [p for p in hf.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=3e-3, betas=(0.9, 0.95), eps=1e-8)

    tx = steps.make_optimizer(OptimConfig.of(c))
    state = steps.init_state(params, tx)
    step = steps.make_train_step(cfg, tx)
    rng = np.random.default_rng(1)
    for it in range(3):
        x = rng.integers(0, cfg.vocab_size, (1, 4, 16)).astype(np.int32)
        y = rng.integers(0, cfg.vocab_size, (1, 4, 16)).astype(np.int32)
        state, m = step(state, (jnp.asarray(x), jnp.asarray(y)), jax.random.PRNGKey(0))
        for g in opt.param_groups:
            g["lr"] = nanogpt_lr(it, 3e-3, 3e-4, 1, 3)
        logits = hf(torch.from_numpy(x[0]).long()).logits
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), torch.from_numpy(y[0]).long().reshape(-1))
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(hf.parameters(), 0.3)
        opt.step()
        opt.zero_grad()
        assert float(norm) > 0.3  # clipping is active
        np.testing.assert_allclose(float(m["loss"]), loss.item(), rtol=1e-5)
        np.testing.assert_allclose(float(m["grad_norm"]), float(norm), rtol=1e-4)
    assert int(state.step) == 3
    ref = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    p = state.params
    # float32 vs float64: Adam divides by sqrt(v), so entries with near-zero gradients differ by up to ~1e-3 of
    # the 3e-3 step; 1e-5 is 0.3% of one update
    np.testing.assert_allclose(p["wte"]["embedding"], ref["transformer.wte.weight"], atol=1e-5)
    np.testing.assert_allclose(p["wpe"]["embedding"], ref["transformer.wpe.weight"], atol=1e-5)
    np.testing.assert_allclose(p["h_1"]["mlp"]["c_fc"]["kernel"], ref["transformer.h.1.mlp.c_fc.weight"], atol=1e-5)
    np.testing.assert_allclose(p["h_0"]["attn"]["c_attn"]["bias"], ref["transformer.h.0.attn.c_attn.bias"], atol=1e-5)
    np.testing.assert_allclose(p["ln_f"]["scale"], ref["transformer.ln_f.weight"], atol=1e-5)


def test_gradient_accumulation_equals_one_large_batch():
    """Four micro-batches of 2 rows give the gradient of one batch of 8 (SGD with lr 1: new = old - grad)."""
    cfg = GPTConfig.preset("tiny")
    tx = optax.sgd(1.0)
    params = init_params(cfg, 0)
    rng = np.random.default_rng(2)
    x = rng.integers(0, cfg.vocab_size, (8, 32)).astype(np.int32)
    y = rng.integers(0, cfg.vocab_size, (8, 32)).astype(np.int32)
    step = steps.make_train_step(cfg, tx, donate=False)
    s1, m1 = step(steps.init_state(params, tx), (x[None], y[None]), jax.random.PRNGKey(0))
    s4, m4 = step(steps.init_state(params, tx), (x.reshape(4, 2, 32), y.reshape(4, 2, 32)), jax.random.PRNGKey(0))
    np.testing.assert_allclose(float(m4["loss"]), float(m1["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m4["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
    chex.assert_trees_all_close(s4.params, s1.params, atol=1e-7)
    assert float(m1["grad_norm"]) > 0.1


def test_mixed_precision_keeps_float32_master_weights():
    c = train_config.base_config()
    c.model.update(GPTConfig.preset("tiny").to_dict())
    c.mixed_precision = True
    cfg = model_config(c.model.to_dict(), c.mixed_precision)
    assert (cfg.dtype, cfg.param_dtype) == ("bfloat16", "float32")
    tx = steps.make_optimizer(OptimConfig.of(c))
    params = init_params(cfg, 0)
    x = np.random.default_rng(3).integers(0, cfg.vocab_size, (1, 4, 32)).astype(np.int32)
    y = np.roll(x, -1, axis=-1)
    state, m = steps.make_train_step(cfg, tx, donate=False)(steps.init_state(params, tx), (x, y),
                                                                  jax.random.PRNGKey(0))
    loss32 = steps.make_eval_step(cfg.replace(dtype="float32"))(params, x[0], y[0])
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state.params))
    assert bool(m["finite"]) and int(state.step) == 1
    np.testing.assert_allclose(float(m["loss"]), float(loss32), atol=2e-2)  # bf16 rounding
    assert float(m["loss"]) != float(loss32)  # bf16 compute really ran
    assert not np.array_equal(state.params["wte"]["embedding"], params["wte"]["embedding"])


def test_dropout_keys_depend_on_the_step_only():
    cfg = GPTConfig.preset("tiny", dropout=0.3)
    tx = optax.sgd(1e-3)
    params = init_params(cfg, 0)
    x = jnp.asarray(np.random.default_rng(4).integers(0, cfg.vocab_size, (1, 4, 32)), jnp.int32)
    step = steps.make_train_step(cfg, tx, donate=False)
    s0 = steps.init_state(params, tx)
    a = step(s0, (x, x), jax.random.PRNGKey(5))[1]["loss"]
    b = step(s0, (x, x), jax.random.PRNGKey(5))[1]["loss"]
    c = step(s0.replace(step=jnp.int32(1)), (x, x), jax.random.PRNGKey(5))[1]["loss"]
    assert float(a) == float(b) and float(a) != float(c)


# ---------------------------------------------------------------------------------------------------------
# the loop


def tiny_config(data_dir: Path, **changes):
    c = load_config("tiny")
    c.data.dir = str(data_dir)
    c.max_iters, c.eval_interval, c.ckpt_interval, c.lr_decay_iters = 40, 20, 20, 40
    c.sample_tokens = 20
    for k, v in changes.items():
        c[k] = v
    return c


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, pydoc_char_dir):
    wd = tmp_path_factory.mktemp("run") / "wd"
    summary = trainer.train(tiny_config(pydoc_char_dir), wd)
    return wd, summary


def test_train_writes_metrics_checkpoints_plot_and_sample(finished_run, pydoc_char_dir):
    wd, summary = finished_run
    records = metrics.read_metrics(wd / "metrics.jsonl")
    train = {r["step"]: r for r in records if r["kind"] == "train"}
    evals = {r["step"]: r for r in records if r["kind"] == "eval"}
    assert sorted(train) == list(range(40)) and sorted(evals) == [20, 40]
    assert train[0]["loss"] == pytest.approx(math.log(json.loads((wd / "tokenizer.json").read_text())["vocab_size"]),
                                             abs=0.05)  # uniform prediction at init
    assert evals[40]["val_loss"] < train[0]["loss"] - 0.3
    assert summary["val_loss"] == evals[40]["val_loss"] and summary["step"] == 40
    assert train[5]["tokens_per_s"] > 0 and train[5]["mfu"] is None  # n/a on CPU
    # the rate logged next to an evaluation is the training rate (evaluation and saving are not counted)
    tps = np.asarray([train[s]["tokens_per_s"] for s in range(2, 40) if train[s]["tokens_per_s"]])
    assert len(tps) > 30 and tps.max() < 5 * np.median(tps), (train[19]["tokens_per_s"], np.median(tps))
    assert (wd / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sample = (wd / "sample.txt").read_text()
    assert len(sample) == 20 and summary["sample"] == sample
    assert set(sample) <= set(json.loads((wd / "tokenizer.json").read_text())["chars"])
    assert GPTConfig.from_dict(json.loads((wd / "config.json").read_text())).n_layer == 2
    assert json.loads((wd / "train_config.json").read_text())["max_iters"] == 40
    assert sorted(int(p.name) for p in (wd / "checkpoints").iterdir()) == [20, 40]


def test_eval_at_start_and_logging_leave_the_steps_unchanged(finished_run, pydoc_char_dir, tmp_path):
    """eval_at_start compiles the train step in a background thread while evaluating; metrics are fetched one
    step behind. Neither may change a step: the first 10 losses equal the finished run's exactly, and the
    logged lr is nanoGPT's schedule at that step."""
    wd, _ = finished_run
    c = tiny_config(pydoc_char_dir, max_iters=10, eval_at_start=True, sample_tokens=0, log_interval=1)
    trainer.train(c, tmp_path / "wd")
    records = metrics.read_metrics(tmp_path / "wd" / "metrics.jsonl")
    evals = [r["step"] for r in records if r["kind"] == "eval"]
    steps = {r["step"]: r for r in records if r["kind"] == "train"}
    reference = {r["step"]: r for r in metrics.read_metrics(wd / "metrics.jsonl") if r["kind"] == "train"}
    assert evals == [0, 10] and sorted(steps) == list(range(10))
    assert [steps[i]["loss"] for i in range(10)] == [reference[i]["loss"] for i in range(10)]  # bitwise
    for i in range(10):
        assert steps[i]["lr"] == pytest.approx(nanogpt_lr(i, c.learning_rate, c.min_lr, c.warmup_iters,
                                                          c.lr_decay_iters), rel=1e-6)


def test_load_run_restores_the_final_params(finished_run, pydoc_char_dir):
    """The val loss of load_run's params, recomputed on the run's eval batches, is the logged final val loss."""
    wd, summary = finished_run
    cfg, params, tok_meta = Workdir(wd).load()
    assert tok_meta["kind"] == "char" and cfg.vocab_size == tok_meta["vocab_size"]
    val = data_lib.load_split(pydoc_char_dir, "val", cfg.block_size)
    c = tiny_config(pydoc_char_dir)
    ev = steps.make_eval_step(cfg)
    losses = [ev(params, *data_lib.get_batch(val, c.batch_size, cfg.block_size,
                                              data_lib.batch_rng(c.seed, k, "val", stream=1)))
              for k in range(c.eval_iters)]
    assert float(np.mean(np.asarray(losses, np.float64))) == summary["val_loss"]
    _, best, _ = Workdir(wd).load("best")
    _, at20, _ = Workdir(wd).load(20)
    assert not np.array_equal(at20["wte"]["embedding"], params["wte"]["embedding"])
    chex.assert_trees_all_equal(best, params)  # val loss still falling: the best is the last


def test_a_finished_run_is_not_retrained(finished_run, pydoc_char_dir, capsys, tmp_path):
    import shutil

    wd = tmp_path / "wd"
    shutil.copytree(finished_run[0], wd)
    s = trainer.train(tiny_config(pydoc_char_dir, sample_tokens=0), wd)
    assert s["start_step"] == 40 and s["step"] == 40
    assert "already holds a finished run" in capsys.readouterr().out
    before, after = (finished_run[0] / "metrics.jsonl").read_text(), (wd / "metrics.jsonl").read_text()
    assert after.startswith(before)
    assert [json.loads(line)["event"] for line in after[len(before):].splitlines()] == ["resume"]


def test_a_run_resumes_with_scanned_layers_and_remat(finished_run, pydoc_char_dir, tmp_path, monkeypatch):
    """remat and scan_layers change how the step runs, not the model: a run saved unrolled resumes scanned with
    full remat (its train state held stacked), its losses are those of resuming it unrolled, and its own
    checkpoints resume unrolled."""
    import shutil

    layouts, of = [], steps.StateLayout.of
    monkeypatch.setattr(steps.StateLayout, "of", lambda *a: layouts.append(of(*a)) or layouts[-1])
    losses = {}
    for name, changes in (("plain", {}), ("scanned", {"scan_layers": True, "remat": "full"})):
        wd = tmp_path / name
        shutil.copytree(finished_run[0], wd)
        c = tiny_config(pydoc_char_dir, max_iters=44, lr_decay_iters=44, sample_tokens=0)
        c.model.update(changes)
        assert trainer.train(c, wd)["start_step"] == 40
        losses[name] = [r["loss"] for r in metrics.read_metrics(wd / "metrics.jsonl")
                        if r["kind"] == "train" and r["step"] >= 40]
    assert len(losses["plain"]) == 4 and [la.stacked for la in layouts] == [False, True]
    np.testing.assert_allclose(losses["scanned"], losses["plain"], rtol=1e-5)
    # The scanned run held its state stacked and saved it unrolled: it loads, and resumes unrolled.
    _, plain, _ = Workdir(tmp_path / "plain").load()
    _, scanned, _ = Workdir(tmp_path / "scanned").load()
    assert jax.tree.structure(scanned) == jax.tree.structure(plain)
    np.testing.assert_allclose(scanned["h_1"]["mlp"]["c_fc"]["kernel"], plain["h_1"]["mlp"]["c_fc"]["kernel"],
                               atol=1e-5)
    c = tiny_config(pydoc_char_dir, max_iters=46, lr_decay_iters=46, sample_tokens=0)
    assert trainer.train(c, tmp_path / "scanned")["start_step"] == 44


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(pydoc_char_dir, tmp_path):
    """An optimizer that turns the update at step 7 into NaN: the run stops naming step 7, checkpoint 5 stays."""
    c = tiny_config(pydoc_char_dir, ckpt_interval=5, eval_interval=5, log_interval=3, max_iters=20)

    def poison_at(n: int) -> optax.GradientTransformation:
        def update(updates, count, params=None):
            scale = jnp.where(count == n, jnp.nan, 1.0)
            return jax.tree.map(lambda u: u * scale, updates), count + 1

        return optax.GradientTransformation(lambda p: jnp.zeros((), jnp.int32), update)

    tx = optax.chain(steps.make_optimizer(OptimConfig.of(c)), poison_at(7))
    with pytest.raises(FloatingPointError, match=r"at step 7; training stopped.*\(step 5\)"):
        trainer.train(c, tmp_path / "wd", tx=tx)
    assert sorted(int(p.name) for p in (tmp_path / "wd" / "checkpoints").iterdir()) == [5]
    _, params, _ = Workdir(tmp_path / "wd").load()
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(params))
    events = [r for r in metrics.read_metrics(tmp_path / "wd" / "metrics.jsonl") if r.get("event") == "non-finite"]
    assert events and events[0]["step"] == 7


def test_bad_settings_get_clear_errors(pydoc_char_dir, tmp_path):
    with pytest.raises(ValueError, match="config.batch_size=0 is not valid"):
        trainer.train(tiny_config(pydoc_char_dir, batch_size=0), tmp_path / "a")
    with pytest.raises(ValueError, match="fewer than block_size"):
        c = tiny_config(pydoc_char_dir)
        c.model.block_size = 50_000
        trainer.train(c, tmp_path / "b")
    with pytest.raises(ValueError, match="model only 50"):
        c = tiny_config(pydoc_char_dir)
        c.model.vocab_size = 50
        trainer.train(c, tmp_path / "c")
    with pytest.raises(ValueError, match="init_from='hub' is not valid"):
        trainer.train(tiny_config(pydoc_char_dir, init_from="hub"), tmp_path / "d")


# ---------------------------------------------------------------------------------------------------------
# fine-tuning


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bpe")
    src = d / "slice.txt"
    src.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:30000], encoding="utf-8")
    data_lib.prepare(d / "data", dataset="text", tokenizer="gpt2", input_path=src, bpe_path=BPE)
    return d / "data"


def finetune_config(data_dir: Path, init_from: str, init_path: Path, bpe: bool = True):
    c = load_config("finetune_gpt2")
    c.init_from, c.init_path = init_from, str(init_path)
    c.data.dir = str(data_dir)
    c.data.bpe_path = str(BPE) if bpe else ""
    c.batch_size, c.grad_accum, c.max_iters, c.eval_iters, c.eval_interval, c.ckpt_interval = 2, 2, 3, 1, 3, 3
    c.sample_tokens, c.progress = 0, False
    return c


def test_finetune_from_a_hugging_face_gpt2_directory(bpe_dir, tmp_path):
    """Step 0's loss equals transformers' loss of the saved model on the same micro-batches."""
    import torch
    import torch.nn.functional as F
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=32))
    hf.save_pretrained(tmp_path / "hf")
    c = finetune_config(bpe_dir, "hf", tmp_path / "hf")
    summary = trainer.train(c, tmp_path / "wd")
    first = [r for r in metrics.read_metrics(tmp_path / "wd" / "metrics.jsonl") if r["kind"] == "train"][0]

    train = data_lib.load_split(bpe_dir, "train", 32)
    x, y = data_lib.get_batch(train, 4, 32, data_lib.batch_rng(c.seed, 0, "train"))
    hf.eval()
    with torch.no_grad():
        ref = np.mean([F.cross_entropy(hf(torch.from_numpy(x[i:i + 2]).long()).logits.reshape(-1, 50257),
                                       torch.from_numpy(y[i:i + 2]).long().reshape(-1)).item() for i in (0, 2)])
    np.testing.assert_allclose(first["loss"], ref, rtol=1e-5)
    cfg, params, tok = Workdir(tmp_path / "wd").load()
    assert tok["kind"] == "gpt2" and cfg.n_embd == 16 and summary["step"] == 3
    moved = params["h_0"]["mlp"]["c_fc"]["kernel"] - hf.transformer.h[0].mlp.c_fc.weight.detach().numpy()
    assert float(jnp.abs(moved).max()) > 0  # trained


def test_finetune_from_a_jaxgpt_run_with_a_cropped_block(finished_run, pydoc_char_dir, tmp_path):
    src = finished_run[0]
    src_cfg, src_params, _ = Workdir(src).load()
    c = finetune_config(pydoc_char_dir, "run", src, bpe=False)
    c.model.block_size = 16
    trainer.train(c, tmp_path / "wd")
    cfg, params, _ = Workdir(tmp_path / "wd").load()
    assert cfg.block_size == 16 and params["wpe"]["embedding"].shape == (16, src_cfg.n_embd)

    first = [r for r in metrics.read_metrics(tmp_path / "wd" / "metrics.jsonl") if r["kind"] == "train"][0]
    train = data_lib.load_split(pydoc_char_dir, "train", 16)
    x, y = data_lib.get_batch(train, 4, 16, data_lib.batch_rng(c.seed, 0, "train"))
    cropped = {**src_params, "wpe": {"embedding": src_params["wpe"]["embedding"][:16]}}
    loss_fn = steps.make_loss_fn(cfg)
    ref = np.mean([float(loss_fn(cropped, None, x[i:i + 2], y[i:i + 2], jax.random.PRNGKey(0), True)) for i in (0, 2)])
    np.testing.assert_allclose(first["loss"], ref, rtol=1e-6)


def test_finetune_refuses_mismatched_tokenizer_and_fixed_fields(finished_run, bpe_dir, pydoc_char_dir, tmp_path):
    with pytest.raises(ValueError, match="prepare the data with the model's tokenizer"):
        trainer.train(finetune_config(bpe_dir, "run", finished_run[0]), tmp_path / "a")
    c = finetune_config(pydoc_char_dir, "run", finished_run[0], bpe=False)
    c.model.block_size = 64
    with pytest.raises(ValueError, match="exceeds the loaded model's 32"):
        trainer.train(c, tmp_path / "b")
    c = finetune_config(pydoc_char_dir, "run", finished_run[0], bpe=False)
    c.model.n_layer = 3
    with pytest.raises(ValueError, match=r"sets n_layer=3, which the loaded model fixes \(n_layer=2\)"):
        trainer.train(c, tmp_path / "c")
    c = finetune_config(pydoc_char_dir, "run", finished_run[0], bpe=False)
    c.model.bias = False  # False is a setting (not "keep the loaded value", as 0 and "" are)
    with pytest.raises(ValueError, match=r"sets bias=False, which the loaded model fixes \(bias=True\)"):
        trainer.train(c, tmp_path / "e")
    with pytest.raises(FileNotFoundError, match="not a jaxgpt training workdir"):
        trainer.train(finetune_config(pydoc_char_dir, "run", tmp_path / "nothing", bpe=False), tmp_path / "d")
