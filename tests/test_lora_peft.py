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
from jaxgpt.checkpoint import load_hf_gpt2
from jaxgpt.config import GPTConfig
from jaxgpt.model import GPT, init_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

V = 97


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(hf_cfg).eval()
    with torch.no_grad():  # biases and LayerNorms start at 0/1: make every weight random
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    d = tmp_path_factory.mktemp("hf_gpt2")
    model.save_pretrained(d)
    cfg, params = load_hf_gpt2(d)
    toks = np.random.default_rng(1).integers(0, V, size=(2, 16))
    return model, cfg, params, toks


def _jax_logits(cfg, params, adapters, lcfg, toks):
    return np.asarray(jax.jit(lambda p, a, t: GPT(cfg).apply({"params": lora.wrap(p, a, lcfg)}, t))(
        params, adapters, jnp.asarray(toks)))


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
    rng = np.random.default_rng(2)
    ad = jax.tree.map(lambda x: jnp.asarray(0.2 * rng.standard_normal(x.shape), jnp.float32),
                      lora.init_lora(0, params, lcfg))
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
    ad = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), lora.init_lora(0, untied, lcfg))
    with pytest.raises(ValueError, match="LoRA on lm_head has no peft equivalent on a transformers GPT-2"):
        lora.save_peft(tmp_path / "head", ad, lcfg)
    assert not (tmp_path / "head").exists()
    lcfg = lora.LoraConfig(rank=2, alpha=4.0, targets=("c_fc",))
    lora.save_peft(tmp_path / "ok", lora.init_lora(0, params, lcfg), lcfg)
    with pytest.raises(FileExistsError, match="already exists"):
        lora.save_peft(tmp_path / "ok", lora.init_lora(0, params, lcfg), lcfg)
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
