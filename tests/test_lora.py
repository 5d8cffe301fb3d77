"""LoRA / RsLoRA transforms, checked against peft on a randomly initialised transformers GPT-2 and against
float64 NumPy. alpha != rank everywhere: a scale of 1 would hide scaling bugs."""

from __future__ import annotations

import copy
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

from jaxgpt import lora
from jaxgpt.io.hf import export_hf_gpt2
from jaxgpt.nn.config import GPTConfig
from jaxgpt.nn.model import GPT, init_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

RANK, ALPHA = 4, 12.0  # scale 3 (LoRA) or 6 (RsLoRA), never 1
V, T = 97, 16  # vocabulary of conftest.py's hf_tiny_gpt2, tokens per row


# ---------------------------------------------------------------------------------------------------------
# Fixtures: one random transformers GPT-2 loaded into jaxgpt (conftest.py's hf_tiny_gpt2)


@pytest.fixture(scope="module")
def hf_base(hf_tiny_gpt2):
    assert hf_tiny_gpt2[1].vocab_size == V
    return hf_tiny_gpt2


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(1).integers(0, V, size=(2, T))


@functools.lru_cache(maxsize=None)
def _tiny(**overrides) -> tuple[GPTConfig, dict]:
    """A tiny config and random params of its shapes (NumPy draws: nothing to compile), once per shape."""
    cfg = GPTConfig.preset("tiny", **overrides)
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda: init_params(cfg, 0))
    def draw(path, s):  # norm scales around 1, everything else around 0
        centre = 1.0 if path[-1].key == "scale" else 0.0
        return jnp.asarray(centre + 0.1 * rng.standard_normal(s.shape), s.dtype)

    return cfg, jax.tree_util.tree_map_with_path(draw, shapes)


def _jax_path(peft_name: str) -> tuple[str, ...]:
    """'base_model.model.transformer.h.0.attn.c_attn' -> ('h_0', 'attn', 'c_attn')."""
    parts = peft_name.split(".")
    i = parts.index("h")
    return (f"h_{parts[i + 1]}",) + tuple(parts[i + 2:])


def _peft_model(hf_model, target_modules, rslora: bool, seed: int = 0):
    """peft-wrapped copy of the model with random nonzero A and B, and the same values as jaxgpt adapters."""
    pcfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=target_modules, fan_in_fan_out=True,
                           use_rslora=rslora, lora_dropout=0.0)
    model = peft.get_peft_model(copy.deepcopy(hf_model), pcfg).eval()
    gen = torch.Generator().manual_seed(seed)
    adapters: dict = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            a_w, b_w = module.lora_A["default"].weight, module.lora_B["default"].weight  # [r, in], [out, r]
            with torch.no_grad():
                b_w.copy_(0.2 * torch.randn(b_w.shape, generator=gen))
            node = adapters
            for k in _jax_path(name):
                node = node.setdefault(k, {})
            node["A"] = jnp.asarray(a_w.detach().numpy().T)  # [in, r]
            node["B"] = jnp.asarray(b_w.detach().numpy().T)  # [r, out]
    assert adapters, "peft adapted no module"
    return model, adapters


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg: GPTConfig, params, toks) -> jax.Array:
    return GPT(cfg).apply({"params": params}, toks)


def _logits(cfg: GPTConfig, params, toks) -> np.ndarray:
    """Compiled once per config and params structure (plain and merged params share it)."""
    return np.asarray(_forward(cfg, params, jnp.asarray(toks)))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _adapter_grads(cfg: GPTConfig, lcfg: lora.LoraConfig, params, adapters, toks) -> dict:
    """Gradients of the next-token loss w.r.t. A and B (weight space, the base held fixed)."""
    def loss(ad):
        logits = GPT(cfg).apply({"params": lora.apply_lora(params, ad, lcfg)}, toks[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, toks[:, 1:]).mean()

    return jax.grad(loss)(adapters)


def _torch_logits(model, toks) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(toks)).logits.numpy()


# ---------------------------------------------------------------------------------------------------------
# Scale


@pytest.mark.parametrize("rank,alpha", [(4, 12.0), (8, 16.0), (16, 5.0), (64, 1.0)])
@pytest.mark.parametrize("rslora", [False, True])
def test_scale_equals_peft(rank, alpha, rslora):
    model = torch.nn.Sequential(torch.nn.Linear(64, 64))
    peft.inject_adapter_in_model(peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["0"],
                                                 use_rslora=rslora), model)
    expected = model[0].scaling["default"]
    got = lora.lora_scale(lora.LoraConfig(rank=rank, alpha=alpha, rank_stabilized=rslora))
    assert got == pytest.approx(expected, rel=1e-12)
    assert got == pytest.approx(alpha / (math.sqrt(rank) if rslora else rank), rel=1e-12)


# ---------------------------------------------------------------------------------------------------------
# Forward and gradients against peft


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("peft_targets,targets", [
    (["c_attn"], ("attn/c_attn",)),
    (["c_attn", "c_proj", "c_fc"], ("c_attn", "c_proj", "c_fc")),  # "c_proj": attn and mlp, as peft
])
def test_logits_and_grads_match_peft(hf_base, tokens, rslora, peft_targets, targets):
    hf_model, cfg, params = hf_base
    pmodel, adapters = _peft_model(hf_model, peft_targets, rslora)
    lcfg = lora.LoraConfig(rank=RANK, alpha=ALPHA, targets=targets, rank_stabilized=rslora)
    # the jaxgpt adapters built by init_lora have exactly the structure peft's target list produced
    chex.assert_trees_all_equal_shapes(lora.init_lora(0, params, lcfg), adapters)

    want = _torch_logits(pmodel, tokens)
    np.testing.assert_allclose(_logits(cfg, params, tokens), _torch_logits(hf_model, tokens), atol=1e-4)
    got = _logits(cfg, lora.apply_lora(params, adapters, lcfg), tokens)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert np.abs(want - _torch_logits(hf_model, tokens)).max() > 1e-2  # the adapters really change the model

    # gradients of the next-token loss w.r.t. A and B (base held fixed) equal peft's
    grads = jax.device_get(_adapter_grads(cfg, lcfg, params, adapters, jnp.asarray(tokens)))
    t_logits = pmodel(torch.as_tensor(tokens[:, :-1])).logits
    torch.nn.functional.cross_entropy(t_logits.reshape(-1, V), torch.as_tensor(tokens[:, 1:]).reshape(-1)).backward()
    for name, module in pmodel.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            g = grads
            for k in _jax_path(name):
                g = g[k]
            np.testing.assert_allclose(g["A"], module.lora_A["default"].weight.grad.numpy().T, atol=2e-5, rtol=1e-3)
            np.testing.assert_allclose(g["B"], module.lora_B["default"].weight.grad.numpy().T, atol=2e-5, rtol=1e-3)


@pytest.mark.parametrize("rslora", [False, True])
def test_merged_export_matches_peft_unmerged(hf_base, tokens, rslora, tmp_path):
    """merge -> Hugging Face export -> transformers logits equal peft's unmerged forward; peft's own merged
    kernels equal ours."""
    hf_model, cfg, params = hf_base
    pmodel, adapters = _peft_model(hf_model, ["c_attn", "c_fc"], rslora, seed=3)
    lcfg = lora.LoraConfig(rank=RANK, alpha=ALPHA, targets=("c_attn", "mlp/c_fc"), rank_stabilized=rslora)
    merged = lora.merge(params, adapters, lcfg)
    want = _torch_logits(pmodel, tokens)  # peft unmerged: x W + scale (x A) B
    np.testing.assert_allclose(_logits(cfg, merged, tokens), want, atol=1e-4, rtol=0)
    export_hf_gpt2(cfg, merged, tmp_path / "merged")
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    np.testing.assert_allclose(_torch_logits(reloaded, tokens), want, atol=1e-4, rtol=0)
    sd = pmodel.merge_and_unload().state_dict()
    for i in range(cfg.n_layer):
        np.testing.assert_allclose(merged[f"h_{i}"]["attn"]["c_attn"]["kernel"],
                                   sd[f"transformer.h.{i}.attn.c_attn.weight"].numpy(), atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Pure transforms against float64 NumPy


def _random_adapters(params, lcfg, seed):
    """init_lora's tree with every A and B replaced by fresh normal values (B nonzero; NumPy draws over its
    shapes, nothing compiled)."""
    rng = np.random.default_rng(seed)
    ad = jax.eval_shape(lambda: lora.init_lora(seed, params, lcfg))
    return jax.tree.map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), jnp.float32), ad)


def _np_delta(a, b, scale):
    return scale * np.asarray(a, np.float64) @ np.asarray(b, np.float64)


class PureTransformTest(chex.TestCase):
    """apply_lora / merge / unmerge / split on jaxgpt params, jitted and not, against float64 NumPy."""

    def setUp(self):
        super().setUp()
        self.cfg, self.params = _tiny(tie_embeddings=False)  # n_embd 16, 2 layers, lm_head [16, 97]

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(False, True)
    def test_apply_lora_matches_numpy(self, rslora):
        lcfg = lora.LoraConfig(rank=3, alpha=7.0, targets=("all", "lm_head"), rank_stabilized=rslora)
        ad = _random_adapters(self.params, lcfg, 0)
        out = self.variant(lambda p, a: lora.apply_lora(p, a, lcfg))(self.params, ad)
        s = 7.0 / (math.sqrt(3) if rslora else 3)
        expect = jax.tree.map(lambda x: np.asarray(x, np.float64), self.params)
        for i in range(self.cfg.n_layer):
            for mod, lin in (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj")):
                a = ad[f"h_{i}"][mod][lin]
                expect[f"h_{i}"][mod][lin]["kernel"] += _np_delta(a["A"], a["B"], s)
        expect["lm_head"]["kernel"] += _np_delta(ad["lm_head"]["A"], ad["lm_head"]["B"], s)
        chex.assert_trees_all_close(out, expect, atol=1e-5, rtol=1e-5)
        chex.assert_trees_all_equal_shapes_and_dtypes(out, self.params)

    @chex.variants(with_jit=True, without_jit=True)
    def test_q_v_slices_change_only_their_columns(self):
        lcfg = lora.LoraConfig(rank=2, alpha=5.0, targets=("attn/c_attn/q", "attn/c_attn/v"))
        ad = _random_adapters(self.params, lcfg, 1)
        self.assertEqual(set(ad["h_0"]["attn"]["c_attn"]), {"q", "v"})
        chex.assert_shape(ad["h_0"]["attn"]["c_attn"]["q"]["A"], (16, 2))
        chex.assert_shape(ad["h_0"]["attn"]["c_attn"]["v"]["B"], (2, 16))
        merged = self.variant(lambda p, a: lora.merge(p, a, lcfg))(self.params, ad)
        c = self.cfg.n_embd
        for i in range(self.cfg.n_layer):
            w0 = np.asarray(self.params[f"h_{i}"]["attn"]["c_attn"]["kernel"], np.float64)
            w1 = np.asarray(merged[f"h_{i}"]["attn"]["c_attn"]["kernel"], np.float64)
            qa, va = ad[f"h_{i}"]["attn"]["c_attn"]["q"], ad[f"h_{i}"]["attn"]["c_attn"]["v"]
            np.testing.assert_array_equal(w1[:, c:2 * c], w0[:, c:2 * c])  # k untouched, bit for bit
            np.testing.assert_allclose(w1[:, :c], w0[:, :c] + _np_delta(qa["A"], qa["B"], 2.5), atol=1e-5)
            np.testing.assert_allclose(w1[:, 2 * c:], w0[:, 2 * c:] + _np_delta(va["A"], va["B"], 2.5), atol=1e-5)
            self.assertGreater(np.abs(w1[:, :c] - w0[:, :c]).min(), 0.0)
            for other in ("c_proj",):
                np.testing.assert_array_equal(merged[f"h_{i}"]["attn"][other]["kernel"],
                                              self.params[f"h_{i}"]["attn"][other]["kernel"])

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(False, True)
    def test_unmerge_and_split_recover_base_and_adapters(self, rslora):
        lcfg = lora.LoraConfig(rank=4, alpha=3.0, targets=("attn/c_attn/q", "attn/c_attn/k", "mlp/c_fc"),
                               rank_stabilized=rslora)
        ad = _random_adapters(self.params, lcfg, 2)
        merged = self.variant(lambda p, a: lora.merge(p, a, lcfg))(self.params, ad)
        base = self.variant(lambda m, a: lora.unmerge(m, a, lcfg))(merged, ad)
        chex.assert_trees_all_close(base, self.params, atol=2e-6, rtol=0)
        back = lora.split(merged, self.params, lcfg)
        chex.assert_trees_all_equal_shapes(back, ad)
        prod = lambda x: np.asarray(x["A"], np.float64) @ np.asarray(x["B"], np.float64)  # noqa: E731
        chex.assert_trees_all_close(jax.tree.map(prod, back, is_leaf=lambda x: "A" in x),
                                    jax.tree.map(prod, ad, is_leaf=lambda x: "A" in x), atol=1e-4, rtol=1e-4)
        chex.assert_trees_all_close(lora.merge(self.params, back, lcfg), merged, atol=1e-5, rtol=0)


def test_init_lora_matches_peft_init_and_starts_at_base():
    params = {"h_0": {"attn": {"c_attn": {"kernel": jnp.ones((256, 768))}}}}
    lcfg = lora.LoraConfig(rank=64, alpha=16.0, targets=("c_attn",))
    ad = lora.init_lora(jax.random.PRNGKey(0), params, lcfg)["h_0"]["attn"]["c_attn"]
    chex.assert_shape(ad["A"], (256, 64))
    chex.assert_shape(ad["B"], (64, 768))
    assert not np.any(np.asarray(ad["B"]))
    layer = torch.nn.Sequential(torch.nn.Linear(256, 768))
    peft.inject_adapter_in_model(peft.LoraConfig(r=64, lora_alpha=16, target_modules=["0"]), layer)
    ref = layer[0].lora_A["default"].weight.detach().numpy()  # peft's default init, [r, in]
    a = np.asarray(ad["A"])
    bound = 1 / math.sqrt(256)
    assert np.abs(a).max() <= bound and np.abs(ref).max() <= bound
    assert a.var() == pytest.approx(ref.var(), rel=0.05)  # both U(-1/sqrt(in), 1/sqrt(in)): var = 1/(3 in)
    assert a.var() == pytest.approx(bound ** 2 / 3, rel=0.05)
    _, base = _tiny()
    lcfg = lora.LoraConfig(rank=2, alpha=4.0, targets=("all",))
    start = jax.jit(lambda b: lora.apply_lora(b, lora.init_lora(1, b, lcfg), lcfg))
    chex.assert_trees_all_equal(start(base), base)


# ---------------------------------------------------------------------------------------------------------
# Training: only adapters are trainable


def test_optimizer_state_is_adapter_sized_and_grads_reach_adapters_only():
    cfg, params = _tiny()
    lcfg = lora.LoraConfig(rank=2, alpha=6.0, targets=("attn/c_attn/q", "attn/c_attn/v"))
    adapters = lora.init_lora(0, params, lcfg)
    n_adapter = sum(x.size for x in jax.tree.leaves(adapters))
    assert n_adapter == lora.lora_param_count(params, lcfg)["trainable"] == 2 * 2 * 2 * (16 + 16)
    opt = optax.adam(1e-1)
    state = opt.init(adapters)
    arrays = [x for x in jax.tree.leaves(state) if x.ndim > 0]
    assert sum(x.size for x in arrays) == 2 * n_adapter  # Adam's mu and nu, nothing of the base
    toks = jax.random.randint(jax.random.PRNGKey(1), (4, 17), 0, cfg.vocab_size)

    def loss(ad, p, batch):
        logits = GPT(cfg).apply({"params": lora.apply_lora(p, ad, lcfg)}, batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    @jax.jit
    def step(ad, st, p, batch):
        value, g = jax.value_and_grad(loss)(ad, p, batch)  # w.r.t. argument 0, the adapters, only
        upd, st = opt.update(g, st, ad)
        return optax.apply_updates(ad, upd), st, value, g

    before = jax.tree.map(np.asarray, params)
    ad, st, l0, g = step(adapters, state, params, toks)
    chex.assert_trees_all_equal_structs(g, adapters)
    b_grad = np.abs(np.asarray(g["h_0"]["attn"]["c_attn"]["q"]["B"])).max()
    assert b_grad > 0  # B starts at zero, its gradient does not
    assert not np.any(np.asarray(g["h_0"]["attn"]["c_attn"]["q"]["A"]))  # A's gradient is B^T(...) = 0 at start
    for _ in range(10):
        ad, st, l1, _ = step(ad, st, params, toks)
    assert float(l1) < float(l0) - 0.02, (float(l0), float(l1))
    chex.assert_trees_all_equal(params, before)  # the base never moves
    jaxpr = jax.make_jaxpr(jax.grad(loss))(adapters, params, toks)
    assert len(jaxpr.out_avals) == len(jax.tree.leaves(adapters))


# ---------------------------------------------------------------------------------------------------------
# Parameter report, saving, bad input


def test_param_count_gpt2_124m():
    params = jax.eval_shape(lambda: init_params(GPTConfig(), 0))  # shapes only, nothing allocated
    r = lora.lora_param_count(params, lora.LoraConfig(rank=8, alpha=16.0, targets=("attn/c_attn",)))
    assert (r["trainable"], r["total"]) == (294_912, 124_439_808)
    assert r["fraction"] == pytest.approx(0.00237, abs=1e-5)
    r = lora.lora_param_count(params, lora.LoraConfig(rank=8, alpha=16.0, targets=("all",)))
    assert r["trainable"] == 12 * 8 * ((768 + 2304) + (768 + 768) + (768 + 3072) + (3072 + 768))


def test_save_load_roundtrip_and_shape_errors(tmp_path):
    _, params = _tiny()
    lcfg = lora.LoraConfig(rank=3, alpha=5.0, targets=("attn/c_attn/v", "mlp/c_proj"), rank_stabilized=True)
    ad = _random_adapters(params, lcfg, 4)
    path = lora.save_adapters(tmp_path / "ad", ad, lcfg)
    back, lcfg2 = lora.load_adapters(path, params)
    assert lcfg2 == lcfg
    chex.assert_trees_all_equal(back, ad)
    with pytest.raises(FileExistsError, match="already exists"):
        lora.save_adapters(path, _random_adapters(params, lcfg, 5), lcfg)
    chex.assert_trees_all_equal(lora.load_adapters(path, params)[0], ad)  # the refused save changed nothing
    shapes = lambda **kw: jax.eval_shape(lambda: init_params(GPTConfig.preset("tiny", **kw), 0))  # noqa: E731
    with pytest.raises(ValueError, match=r"h_0/attn/c_attn/kernel is \[16, 48\]; this base has \[32, 96\]"):
        lora.load_adapters(path, shapes(n_embd=32))
    with pytest.raises(ValueError, match=r"h_1/attn/c_attn/kernel is \[16, 48\]; this base has no such weight"):
        lora.load_adapters(path, shapes(n_layer=1))
    wide = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes(n_embd=32))
    with pytest.raises(ValueError, match=r"do not fit the weight \[32, 32\]"):
        lora.apply_lora(wide, ad, lcfg)
    with pytest.raises(ValueError, match=r"has rank 3 but LoraConfig.rank is 4"):
        lora.apply_lora(params, ad, lcfg.replace(rank=4))
    new = _random_adapters(params, lcfg, 6)
    lora.save_adapters(path, new, lcfg, force=True)
    chex.assert_trees_all_equal(lora.load_adapters(path, params)[0], new)
    assert [p.name for p in tmp_path.iterdir()] == ["ad"]  # no temporary folders left behind


@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=0), "rank=0 is not valid"),
    (dict(rank=-2), "rank=-2 is not valid"),
    (dict(alpha=0.0), "alpha=0.0 is not valid"),
    (dict(targets=()), "targets=.* is not valid"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lora.LoraConfig(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(targets=("attn/c_atn",)), "'attn/c_atn' matches no weight"),
    (dict(targets=("mlp/c_fc/q",)), "'mlp/c_fc/q' matches no weight"),
    (dict(targets=("lm_head",)), "'lm_head' matches no weight"),  # tied embeddings: no head kernel
    (dict(rank=17), r"rank 17 exceeds min\(in, out\) = 16"),
    (dict(rank=17, targets=("attn/c_attn/q",)), r"rank 17 exceeds min\(in, out\) = 16 of h_0/attn/c_attn/q"),
    (dict(targets=("c_attn", "attn/c_attn/v")), "both whole and as its v slice"),
])
def test_bad_targets(kwargs, match):
    _, params = _tiny()
    lcfg = lora.LoraConfig(**{"rank": 2, "alpha": 4.0, **kwargs})
    with pytest.raises(ValueError, match=match):
        lora.init_lora(0, params, lcfg)
    with pytest.raises(ValueError, match=match):
        lora.lora_param_count(params, lcfg)
