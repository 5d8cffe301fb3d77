"""jaxgpt.io.hf: Hugging Face GPT-2 import and export against transformers' own GPT2LMHeadModel on the same random
weights (logits within 1e-4): tied and untied heads, the full 124M shape, what GPT-2 cannot express, bad folders."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import GPT, GPTConfig, init_params
from jaxgpt.io.hf import export_hf_gpt2, load_hf_gpt2

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4  # max abs logit difference, float32 on both sides


def _hf_model(tmp_path, tie=True, **shape):
    torch.manual_seed(0)
    kw = dict(vocab_size=211, n_positions=48, n_embd=64, n_layer=3, n_head=4, tie_word_embeddings=tie)
    kw.update(shape)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**kw)).eval()
    with torch.no_grad():  # fresh non-trivial values for biases and LayerNorms too
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    return model


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens))).logits.numpy()


@pytest.mark.parametrize("tie", [True, False])
def test_import_export_parity(tmp_path, tie):
    model = _hf_model(tmp_path / "hf", tie=tie)
    cfg, params = load_hf_gpt2(tmp_path / "hf")
    assert cfg.tie_embeddings == tie and cfg.n_layer == 3 and cfg.block_size == 48
    tokens = np.random.default_rng(1).integers(0, 211, (3, 40))
    ours = np.asarray(GPT(cfg).apply({"params": params}, jnp.asarray(tokens)))
    np.testing.assert_allclose(ours, _hf_logits(model, tokens), atol=TOL, rtol=0)

    export_hf_gpt2(cfg, params, tmp_path / "out")
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    np.testing.assert_allclose(_hf_logits(back, tokens), ours, atol=TOL, rtol=0)
    # and back into jaxgpt: the same pytree
    cfg2, params2 = load_hf_gpt2(tmp_path / "out")
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_export_of_jaxgpt_init(tmp_path):
    cfg = GPTConfig.preset("tiny", tie_embeddings=False)
    params = init_params(cfg, 4)
    export_hf_gpt2(cfg, params, tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 20))
    np.testing.assert_allclose(_hf_logits(hf, tokens), np.asarray(GPT(cfg).apply({"params": params}, jnp.asarray(tokens))),
                               atol=TOL, rtol=0)


@pytest.mark.slow
def test_full_124m_shape_parity(tmp_path):
    """The real GPT-2 124M shape with random weights (no download), one batch."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    model.save_pretrained(tmp_path)
    cfg, params = load_hf_gpt2(tmp_path)
    assert cfg == GPTConfig.preset("gpt2")
    tokens = np.random.default_rng(3).integers(0, 50257, (2, 64))
    ours = np.asarray(jax.jit(lambda p, t: GPT(cfg).apply({"params": p}, t))(params, jnp.asarray(tokens)))
    np.testing.assert_allclose(ours, _hf_logits(model, tokens), atol=TOL, rtol=0)


@pytest.mark.parametrize("kw,needle", [(dict(pos_embedding="rope"), "pos_embedding"), (dict(norm="rmsnorm"), "norm"),
                                       (dict(norm_position="post"), "norm_position"), (dict(bias=False), "bias")])
def test_export_rejects_what_gpt2_cannot_express(tmp_path, kw, needle):
    cfg = GPTConfig.preset("tiny", **kw)
    with pytest.raises(ValueError, match=needle):
        export_hf_gpt2(cfg, init_params(cfg), tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


def test_bad_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_gpt2(tmp_path)
    _hf_model(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="safetensors"):
        load_hf_gpt2(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not GPT-2"):
        load_hf_gpt2(tmp_path / "hf")
    with pytest.raises(FileNotFoundError):
        load_hf_gpt2(tmp_path / "missing" / "dir")
