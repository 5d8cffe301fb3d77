"""The sample command's --adapters (LoRA merged into the base) and --quantize (int8/int4 weights) options:
greedy output equals `generate` on the same transformed params."""

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import SHARED

from jaxgpt import lora
from jaxgpt.data.tokenizer import gpt2_tokenizer
from jaxgpt.decode import generation as G
from jaxgpt.decode.options import DecodeOptions
from jaxgpt.io.hf import export_hf_gpt2
from jaxgpt.nn.config import GPTConfig
from jaxgpt.nn.model import GPT
from jaxgpt.quantize import QuantConfig, quantize
from jaxgpt.sample import build_parser, run

BPE = SHARED / "data" / "gpt2.tiktoken"
pytestmark = pytest.mark.skipif(not BPE.is_file(), reason=f"{BPE} (offline GPT-2 BPE) is missing")
PROMPT = "To be, or not to be"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    cfg = GPTConfig(vocab_size=50257, block_size=64, n_layer=1, n_head=2, n_embd=16)
    shapes = jax.eval_shape(lambda: GPT(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32)))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype), shapes)
    return export_hf_gpt2(cfg, params, tmp_path_factory.mktemp("hf")), cfg, params


def _greedy_text(cfg, params, n=8):
    tok = gpt2_tokenizer(BPE)
    ref = G.generate(params, cfg, [tok.encode(PROMPT)], n, DecodeOptions(temperature=0.0, eos_id=tok.eot_id))
    return tok.decode([t for t in np.asarray(ref.tokens[0, :int(ref.lengths[0])]) if t != tok.eot_id])


def _sample(*extra):
    argv = ["--init-from", "", "--prompt", PROMPT, "--max-new-tokens", "8", "--temperature", "0",
            "--bpe-file", str(BPE), *extra]
    return run(build_parser().parse_args(argv), out=io.StringIO(), err=io.StringIO())


def test_adapters_are_merged(base, tmp_path):
    d, cfg, params = base
    lcfg = lora.LoraConfig(rank=4, alpha=12.0, targets=("attn/c_attn", "mlp/c_fc"))
    adapters = lora.init_lora(jax.random.PRNGKey(1), params, lcfg)
    adapters = jax.tree.map(lambda x: x + 0.5 * jax.random.normal(jax.random.PRNGKey(2), x.shape), adapters)
    lora.save_adapters(tmp_path / "lora", adapters, lcfg)
    merged = lora.merge(params, adapters, lcfg)
    want = _greedy_text(cfg, merged)
    assert want != _greedy_text(cfg, params)  # the adapters change the output, so the check below can fail
    assert _sample("--init-from", str(d), "--adapters", str(tmp_path / "lora")) == [want]


def test_int8_weights(base):
    d, cfg, params = base
    want = _greedy_text(cfg, quantize(params, QuantConfig(bits=8, embeddings=True, lm_head=True)))
    assert _sample("--init-from", str(d), "--quantize", "int8") == [want]


def test_lora_workdir_points_to_its_export(tmp_path):
    (tmp_path / "lora_run.json").write_text("{}")
    with pytest.raises(ValueError, match="--adapters"):
        _sample("--init-from", str(tmp_path))
