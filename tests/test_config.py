"""GPTConfig validation, presets and param_count (checked against the initialised pytree)."""

import itertools

import jax
import pytest

from jaxgpt import GPTConfig, param_count
from jaxgpt.nn.model import GPT, count_params


def test_gpt2_preset_counts():
    c = param_count(GPTConfig.preset("gpt2"))
    assert c["total"] == 124_439_808
    assert c["tying_saves"] == 38_597_376 == 50257 * 768
    untied = param_count(GPTConfig.preset("gpt2", tie_embeddings=False))
    assert untied["total"] - c["total"] == 38_597_376


@pytest.mark.parametrize("name,total", [("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080),
                                        ("gpt2-xl", 1_557_611_200)])
def test_openai_sizes(name, total):
    # Totals of OpenAI's released checkpoints (tied head), as transformers reports them.
    assert param_count(GPTConfig.preset(name))["total"] == total


@pytest.mark.parametrize(
    "pos,norm,place,tie,bias",
    list(itertools.product(["learned", "sinusoidal", "rope", "none"], ["layernorm", "rmsnorm"], ["pre", "post"],
                           [True, False], [True, False]))[::3],  # a spread of the 64 combinations
)
def test_param_count_matches_pytree(pos, norm, place, tie, bias):
    cfg = GPTConfig.preset("tiny", pos_embedding=pos, norm=norm, norm_position=place, tie_embeddings=tie, bias=bias)
    shapes = jax.eval_shape(lambda: GPT(cfg).init(jax.random.PRNGKey(0), jax.numpy.zeros((1, 4), "int32")))
    assert count_params(shapes["params"]) == param_count(cfg)["total"]


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(pos_embedding="alibi"), "pos_embedding"),
        (dict(norm="batchnorm"), "norm"),
        (dict(norm_position="middle"), "norm_position"),
        (dict(n_embd=30, n_head=4), "divisible"),
        (dict(n_layer=0), "n_layer"),
        (dict(dropout=1.5), "dropout"),
        (dict(dtype="float64"), "dtype"),
        (dict(attention="flash"), "attention"),
        (dict(pos_embedding="rope", n_embd=12, n_head=4), "even head_dim"),
    ],
)
def test_bad_config_errors(kwargs, needle):
    with pytest.raises(ValueError, match=needle) as e:
        GPTConfig.preset("tiny", **kwargs)
    assert "\n" not in str(e.value)


def test_unknown_preset_and_fields():
    with pytest.raises(ValueError, match="unknown preset"):
        GPTConfig.preset("gpt5")
    with pytest.raises(ValueError, match="unknown fields"):
        GPTConfig.from_dict({"n_layers": 3})
    cfg = GPTConfig.preset("nano", dropout=0.1)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg


def test_frozen():
    cfg = GPTConfig()
    with pytest.raises(Exception):
        cfg.n_layer = 3  # type: ignore[misc]
