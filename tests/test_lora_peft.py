"""lora.save_peft / lora.load_peft against peft itself, on a random tiny transformers GPT-2: both directions give
peft's logits (1e-4), q/k/v slices and RsLoRA included."""

from __future__ import annotations

import copy
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import lora
from jaxgpt.nn.config import GPTConfig
from jaxgpt.nn.model import GPT, init_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def hf_base(hf_tiny_gpt2):
    """conftest.py's random transformers GPT-2 in jaxgpt, and tokens: (model, cfg, params, toks)."""
    model, cfg, params = hf_tiny_gpt2
    return model, cfg, params, np.random.default_rng(1).integers(0, cfg.vocab_size, size=(2, 16))


def _jax_logits(cfg, params, adapters, lcfg, toks):
    forward = jax.jit(
        lambda p, a, t: GPT(cfg).apply({"params": lora.wrap(p, a, lcfg)}, t))
    return np.asarray(forward(params, adapters, jnp.asarray(toks)))


def _random_adapters(params, lcfg, seed, std=0.2):
    """init_lora's tree with fresh normal A and B (NumPy draws over its shapes: nothing compiled)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(std * rng.standard_normal(x.shape), jnp.float32),
                        jax.eval_shape(lambda: lora.init_lora(0, params, lcfg)))


def _torch_logits(model, toks):
    with torch.no_grad():
        return model(torch.as_tensor(toks)).logits.numpy()


@pytest.mark.parametrize("targets,rslora", [
    (("attn/c_attn/q", "attn/c_attn/v", "mlp/c_fc"), True),  # q/v as one rank-2r c_attn adapter in peft
    (("h_1/attn/c_attn/k", "attn/c_proj"), False),
])
def test_save_peft_loads_in_peft_with_same_logits_and_round_trips(hf_base, tmp_path, targets, rslora):
    hf_model, cfg, params, toks = hf_base
    lcfg = lora.LoraConfig(rank=4, alpha=12.0, targets=targets, rank_stabilized=rslora)
    ad = _random_adapters(params, lcfg, 2)
    lora.save_peft(tmp_path / "peft", ad, lcfg)
    pmodel = peft.PeftModel.from_pretrained(copy.deepcopy(hf_model), tmp_path / "peft").eval()
    want = _jax_logits(cfg, params, ad, lcfg, toks)
    np.testing.assert_allclose(_torch_logits(pmodel, toks), want, atol=1e-4, rtol=0)
    assert np.abs(want - _torch_logits(hf_model, toks)).max() > 1e-2  # the adapters matter
    back, back_cfg = lora.load_peft(tmp_path / "peft", params)  # our own layout: the slices come back exactly
    assert back_cfg == lcfg
    chex.assert_trees_all_equal(back, ad)
    pmodel.save_pretrained(tmp_path / "resaved")  # peft's own file: whole c_attn adapters, same logits
    back, back_cfg = lora.load_peft(tmp_path / "resaved", params)
    np.testing.assert_allclose(_jax_logits(cfg, params, back, back_cfg, toks), want, atol=1e-4, rtol=0)


def test_load_peft_adapters_trained_elsewhere(hf_base, tmp_path):
    """peft adapters with random nonzero B, use_rslora, and one module at another rank and alpha
    (rank_pattern / alpha_pattern): loaded into jaxgpt they give peft's logits."""
    hf_model, cfg, params, toks = hf_base
    pcfg = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                           use_rslora=True, lora_dropout=0.0, rank_pattern={"h.1.attn.c_attn": 2},
                           alpha_pattern={"h.1.attn.c_attn": 5.0})
    pmodel = peft.get_peft_model(copy.deepcopy(hf_model), pcfg).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in pmodel.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    pmodel.save_pretrained(tmp_path / "peft")
    ad, lcfg = lora.load_peft(tmp_path / "peft", params)
    assert (lcfg.rank, lcfg.alpha, lcfg.rank_stabilized) == (4, 12.0, True)
    chex.assert_shape(ad["h_1"]["attn"]["c_attn"]["A"], (32, 4))  # rank 2 padded with zero columns
    want = _torch_logits(pmodel, toks)
    np.testing.assert_allclose(_jax_logits(cfg, params, ad, lcfg, toks), want, atol=1e-4, rtol=0)
    assert np.abs(want - _torch_logits(hf_model, toks)).max() > 1e-2


def test_peft_bad_input(hf_base, tmp_path):
    _, _, params, _ = hf_base
    untied = jax.eval_shape(lambda: init_params(GPTConfig.preset("tiny", tie_embeddings=False), 0))
    lcfg = lora.LoraConfig(rank=2, alpha=4.0, targets=("lm_head",))
    with pytest.raises(ValueError, match="LoRA on lm_head has no peft equivalent on a transformers GPT-2"):
        lora.save_peft(tmp_path / "head", _random_adapters(untied, lcfg, 0), lcfg)
    assert not (tmp_path / "head").exists()
    lcfg = lora.LoraConfig(rank=2, alpha=4.0, targets=("c_fc",))
    ad = _random_adapters(params, lcfg, 1)
    lora.save_peft(tmp_path / "ok", ad, lcfg)
    with pytest.raises(FileExistsError, match="already exists"):
        lora.save_peft(tmp_path / "ok", ad, lcfg)
    conf_file = tmp_path / "ok" / lora.PEFT_CONFIG
    conf_file.write_text(json.dumps({**json.loads(conf_file.read_text()), "use_dora": True}))
    with pytest.raises(ValueError, match=r"uses use_dora=True \(DoRA\), which jaxgpt's LoRA does not support"):
        lora.load_peft(tmp_path / "ok", params)
    with pytest.raises(FileNotFoundError, match="lacks adapter_config.json or adapter_model.safetensors"):
        lora.load_peft(tmp_path, params)
    wide = jax.eval_shape(lambda: init_params(GPTConfig.preset("tiny", n_embd=64), 0))
    conf_file.write_text(json.dumps({**json.loads(conf_file.read_text()), "use_dora": False}))
    with pytest.raises(ValueError, match=r"do not fit the weight \[64, 256\]"):
        lora.load_peft(tmp_path / "ok", wide)
