"""LoRA fine-tuning through trainer.train: a tiny randomly initialised transformers GPT-2 saved with
save_pretrained is the base; only adapters are trained and checkpointed, the base never moves, resume continues
the same run, and the merged Hugging Face export matches jaxgpt's apply_lora logits (transformers, 1e-4)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import chex
import numpy as np
import pytest

from jaxgpt import data as data_lib
from jaxgpt import lora
from jaxgpt.io import checkpoint
from jaxgpt.io.workdir import Workdir
from jaxgpt.io.hf import load_hf_gpt2
from jaxgpt.nn.model import GPT
from jaxgpt.train import config as train_config
from jaxgpt.train import metrics, trainer

REPO = Path(__file__).resolve().parents[1]
from helpers import SHARED

pytestmark = pytest.mark.run

SHAKESPEARE = SHARED / "data" / "tinyshakespeare.txt"
BPE = SHARED / "data" / "gpt2.tiktoken"
RANK, ALPHA = 4, 12.0  # alpha != rank: a scale of 1 would hide scaling bugs


def load_config(name: str):
    return train_config.load_config_file(str(REPO / "configs" / f"{name}.py"))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A random tiny GPT-2 (untrained: transformers' own init, larger than default so LoRA can move the loss)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=32, initializer_range=0.2))
    d = tmp_path_factory.mktemp("base") / "hf"
    hf.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bpe")
    src = d / "slice.txt"
    src.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:20000], encoding="utf-8")
    data_lib.prepare(d / "data", dataset="text", tokenizer="gpt2", input_path=src, bpe_path=BPE)
    return d / "data"


def lora_config(data_dir: Path, base: Path, **changes):
    c = load_config("finetune_lora")
    c.init_path = str(base)
    c.data.dir, c.data.bpe_path = str(data_dir), str(BPE)
    c.lora.rank, c.lora.alpha = RANK, ALPHA
    c.lora.targets = ("attn/c_attn", "mlp/c_fc")
    c.batch_size, c.grad_accum, c.max_iters, c.eval_iters = 4, 1, 8, 2
    c.eval_interval = c.ckpt_interval = 4
    c.learning_rate, c.min_lr, c.warmup_iters, c.lr_decay_iters = 3e-2, 3e-3, 1, 8
    c.eval_at_start, c.log_interval, c.sample_tokens, c.progress = True, 1, 0, False
    for k, v in changes.items():
        c[k] = v
    return c


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, bpe_dir, base_dir):
    """8 LoRA steps in one go; the base's file hash before training."""
    before = sha256(base_dir / "model.safetensors")
    wd = tmp_path_factory.mktemp("lora") / "wd"
    summary = trainer.train(lora_config(bpe_dir, base_dir), wd)
    return wd, summary, before


def train_losses(wd: Path) -> list[float]:
    return [r["loss"] for r in metrics.read_metrics(wd / "metrics.jsonl") if r["kind"] == "train"]


def test_lora_run_lowers_the_loss_and_checkpoints_adapters_only(lora_run, base_dir):
    wd, summary, _ = lora_run
    evals = {r["step"]: r for r in metrics.read_metrics(wd / "metrics.jsonl") if r["kind"] == "eval"}
    assert sorted(evals) == [0, 4, 8]
    assert evals[8]["train_loss"] < evals[0]["train_loss"] - 0.05, evals
    assert summary["step"] == 8 and summary["lora_trainable"] == 2 * RANK * ((32 + 96) + (32 + 128))

    # the checkpoint holds the adapters (and their Adam moments) alone: a few KB against the base's MB
    step_dir = wd / "checkpoints" / "8"
    ckpt_bytes = checkpoint.pytree_bytes_on_disk(step_dir)
    base_bytes = (base_dir / "model.safetensors").stat().st_size
    assert ckpt_bytes < base_bytes / 20, (ckpt_bytes, base_bytes)
    _, base = load_hf_gpt2(base_dir)
    adapters, lcfg = lora.load_adapters(wd / "lora", base)
    assert lcfg.rank == RANK and lcfg.alpha == ALPHA and not lcfg.rank_stabilized
    mngr = checkpoint.run_checkpoint_manager(Workdir(wd).checkpoints, read_only=True)
    try:
        restored = checkpoint.restore_run_step(mngr, 8, params=adapters)["params"]
    finally:
        mngr.close()
    chex.assert_trees_all_equal(restored, adapters)  # the step-8 checkpoint is exactly the saved adapters
    assert set(restored["h_0"]["attn"]["c_attn"]) == {"A", "B"} and "wte" not in restored
    assert float(np.abs(adapters["h_1"]["mlp"]["c_fc"]["B"]).max()) > 0  # trained away from B = 0


def test_base_never_changes_and_merged_export_matches(lora_run, base_dir):
    """Non-target weights of the export are the base's bit for bit; targets are W + (alpha/r) A B (float64
    NumPy); transformers' logits of the export equal jaxgpt's logits of apply_lora(base, adapters)."""
    import torch
    from transformers import GPT2LMHeadModel

    wd, summary, before = lora_run
    assert sha256(base_dir / "model.safetensors") == before
    assert Path(summary["export"]) == wd / "hf"
    cfg, base = load_hf_gpt2(base_dir)
    _, merged = load_hf_gpt2(wd / "hf")
    adapters, lcfg = lora.load_adapters(wd / "lora", base)
    scale = ALPHA / RANK
    for i in range(cfg.n_layer):
        for mod, lin in (("attn", "c_attn"), ("mlp", "c_fc")):
            ab = adapters[f"h_{i}"][mod][lin]
            ref = np.asarray(base[f"h_{i}"][mod][lin]["kernel"], np.float64) + scale * (
                np.asarray(ab["A"], np.float64) @ np.asarray(ab["B"], np.float64))
            np.testing.assert_allclose(merged[f"h_{i}"][mod][lin]["kernel"], ref, rtol=0, atol=1e-6)
        for mod, lin in (("attn", "c_proj"), ("mlp", "c_proj")):
            np.testing.assert_array_equal(merged[f"h_{i}"][mod][lin]["kernel"], base[f"h_{i}"][mod][lin]["kernel"])
    np.testing.assert_array_equal(merged["wte"]["embedding"], base["wte"]["embedding"])

    x = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 32))
    ours = GPT(cfg).apply({"params": lora.apply_lora(base, adapters, lcfg)}, x)
    hf = GPT2LMHeadModel.from_pretrained(wd / "hf").eval()
    with torch.no_grad():
        theirs = hf(torch.from_numpy(x)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=0, atol=1e-4)


def test_resume_continues_the_same_run(lora_run, bpe_dir, base_dir, tmp_path):
    """4 steps, then a second call to 8: the same losses and adapters as the uninterrupted run."""
    wd_full = lora_run[0]
    wd = tmp_path / "wd"
    trainer.train(lora_config(bpe_dir, base_dir, max_iters=4), wd)
    s = trainer.train(lora_config(bpe_dir, base_dir), wd)
    assert s["start_step"] == 4 and s["step"] == 8
    np.testing.assert_allclose(train_losses(wd), train_losses(wd_full), rtol=1e-6)
    _, base = load_hf_gpt2(base_dir)
    got, _ = lora.load_adapters(wd / "lora", base)
    want, _ = lora.load_adapters(wd_full / "lora", base)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-7)


def test_lora_bad_settings_get_clear_errors(lora_run, bpe_dir, base_dir, tmp_path):
    with pytest.raises(ValueError, match="init_from='scratch'"):
        trainer.train(lora_config(bpe_dir, base_dir, init_from="scratch"), tmp_path / "a")
    c = lora_config(bpe_dir, base_dir)
    c.lora.targets = ("attn/c_qkv",)
    with pytest.raises(ValueError, match="'attn/c_qkv' matches no weight"):
        trainer.train(c, tmp_path / "b")
    c = lora_config(bpe_dir, base_dir)
    c.lora.rank = -2
    with pytest.raises(ValueError, match=r"config.lora: LoraConfig.rank=-2 is not valid"):
        trainer.train(c, tmp_path / "c")
    wd = tmp_path / "d"
    shutil.copytree(lora_run[0], wd)
    c = lora_config(bpe_dir, base_dir)
    c.lora.rank = 2
    with pytest.raises(ValueError, match="holds a run with LoRA settings"):
        trainer.train(c, wd)
    assert json.loads(Workdir(wd).lora_run.read_text())["rank"] == RANK  # nothing overwritten
    c = lora_config(bpe_dir, base_dir)
    c.model.dropout = 0.0
    c.lora.rank = 0  # a full fine-tune over a LoRA run's adapters-only checkpoints
    with pytest.raises(ValueError, match="holds a run with LoRA settings"):
        trainer.train(c, wd)


def test_qlora_on_an_int8_base_trains_and_exports_its_own_logits(bpe_dir, base_dir, tmp_path):
    """--config.lora.base_quantize=int8: the base's block kernels are int8 in the step, the adapters float32;
    the merged (dequantized) export gives transformers the logits of wrap(int8 base, adapters)."""
    import torch
    from transformers import GPT2LMHeadModel

    from jaxgpt import quantize

    c = lora_config(bpe_dir, base_dir, max_iters=4)
    c.lora.base_quantize = "int8"
    wd = tmp_path / "wd"
    summary = trainer.train(c, wd)
    evals = {r["step"]: r for r in metrics.read_metrics(wd / "metrics.jsonl") if r["kind"] == "eval"}
    assert evals[4]["train_loss"] < evals[0]["train_loss"] - 0.05, evals
    assert json.loads(Workdir(wd).lora_run.read_text())["base_quantize"] == "int8"

    cfg, base = load_hf_gpt2(base_dir)
    qbase = quantize.quantize(base, quantize.QuantConfig(bits=8))
    adapters, lcfg = lora.load_adapters(wd / "lora", base)
    assert adapters["h_0"]["attn"]["c_attn"]["A"].dtype == np.float32
    x = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 32))
    ours = GPT(cfg).apply({"params": lora.wrap(qbase, adapters, lcfg)}, x)
    hf = GPT2LMHeadModel.from_pretrained(Path(summary["export"])).eval()
    with torch.no_grad():
        theirs = hf(torch.from_numpy(x)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=0, atol=1e-4)

    c.lora.base_quantize = ""  # the same adapters over the float base would be another run
    with pytest.raises(ValueError, match="holds a run with LoRA settings"):
        trainer.train(c, wd)
