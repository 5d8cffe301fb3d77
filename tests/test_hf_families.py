"""jaxgpt.io.hf_families: Llama, Qwen2 and Qwen3 checkpoints against transformers' own LlamaForCausalLM,
Qwen2ForCausalLM and Qwen3ForCausalLM on the same random weights (logits within 1e-4, float32 on both sides):
grouped-query attention, rope_theta != 10000, tied and untied heads, q/k/v biases, QK-norm with head_dim !=
hidden / heads; greedy decoding with jaxgpt's KV cache against `generate`; export -> `from_pretrained`; sharded
and bfloat16 checkpoints; peft adapters both ways on a Llama; the folder through `load_model` and the sampling
CLI; and what cannot load, refused in one line naming the file and the field."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import write_bpe_tokenizer

from jaxgpt import GPT
from jaxgpt.decode import DecodeOptions, generate
from jaxgpt.io import hf_families
from jaxgpt.io.hf import export_hf, load_hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4  # max abs logit difference, float32 on both sides
VOCAB = 307  # above the 300 tokens of the tokenizer write_bpe_tokenizer trains
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None)
FAMILIES = {  # (config class, model class, fields beyond SHAPE)
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 5e5})),
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM",
                   dict(num_key_value_heads=1, tie_word_embeddings=True,
                        rope_parameters={"rope_type": "default", "rope_theta": 1e4})),
    "llama_scaled": ("LlamaConfig", "LlamaForCausalLM",  # Llama 3.1+'s rope scaling (3.2 1B: 32, 1, 4, 8192)
                     dict(num_key_value_heads=2, rope_parameters={
                         "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",
              dict(num_key_value_heads=2, head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
}


def _randomize(model, seed: int) -> None:
    """Weights at a realistic scale, every one fresh: matrices and biases N(0, 0.02), norm scales 1 + N(0, 0.1)
    (transformers starts norms at 1 and biases at 0, which would hide a swapped norm or a dropped bias)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))


def _make(kind: str, folder, seed: int = 0):
    cfg_cls, model_cls, extra = FAMILIES[kind]
    hf_cfg = getattr(transformers, cfg_cls)(**SHAPE, **extra)
    model = getattr(transformers, model_cls)(hf_cfg).eval()
    _randomize(model, seed)
    if hf_cfg.tie_word_embeddings:
        model.tie_weights()
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(kind, transformers model, its save_pretrained folder, jaxgpt cfg, params loaded from it)."""
    folder = tmp_path_factory.mktemp(request.param)
    model = _make(request.param, folder)
    cfg, params = load_hf(folder)
    return request.param, model, folder, cfg, params


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens))).logits.numpy()


def _ours(cfg, params, tokens):
    return np.asarray(GPT(cfg).apply({"params": params}, jnp.asarray(tokens)))


TOKENS = np.random.default_rng(1).integers(0, VOCAB, (2, 24))


def test_config_maps_every_field_the_math_depends_on(family):
    kind, model, _, cfg, params = family
    c = model.config
    assert (cfg.n_layer, cfg.n_head, cfg.kv_heads, cfg.head_dim) == (
        c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, getattr(c, "head_dim", 16))
    assert (cfg.n_embd, cfg.mlp_hidden, cfg.vocab_size, cfg.block_size) == (64, 96, VOCAB, 64)
    assert cfg.rope_theta == c.rope_parameters["rope_theta"] and cfg.layer_norm_eps == 1e-5
    assert cfg.tie_embeddings == (kind == "llama_tied") and ("lm_head" in params) == (kind != "llama_tied")
    assert (cfg.qkv_bias, cfg.qk_norm) == (kind == "qwen2", kind == "qwen3")
    block = (cfg.mlp, cfg.norm, cfg.pos_embedding, cfg.bias, cfg.fused_qkv)
    assert block == ("swiglu", "rmsnorm", "rope", False, False)


def test_logits_match_transformers_and_export_round_trips(family, tmp_path):
    kind, model, _, cfg, params = family
    ours = _ours(cfg, params, TOKENS)
    np.testing.assert_allclose(ours, _hf_logits(model, TOKENS), atol=TOL, rtol=0)

    export_hf(cfg, params, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == kind.split("_")[0]
    back = type(model).from_pretrained(tmp_path).eval()
    np.testing.assert_allclose(_hf_logits(back, TOKENS), ours, atol=TOL, rtol=0)
    cfg2, params2 = load_hf(tmp_path)  # and back into jaxgpt: the same config and pytree
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_llama3_rope_scaling_changes_the_low_frequencies_as_transformers_does():
    """The scaled frequencies equal transformers' llama3 inv_freq (float32), and differ from the plain ones."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from jaxgpt.nn.rope import inverse_frequencies

    cfg_cls, _, extra = FAMILIES["llama_scaled"]
    hf_cfg = getattr(transformers, cfg_cls)(**SHAPE, **extra)
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    cfg = load_hf_config_of(hf_cfg)
    ours = np.asarray(inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_params))
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6, atol=0)
    plain = np.asarray(inverse_frequencies(cfg.head_dim, cfg.rope_theta))
    assert (ours < plain).sum() >= 2 and ours[0] == plain[0]  # low frequencies slowed, the highest kept


def load_hf_config_of(hf_cfg):
    from jaxgpt.io.hf_families import config_from_hf

    return config_from_hf(hf_cfg.to_dict(), "config.json")


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_greedy_decode_with_kv_cache_is_transformers_generate(kind, tmp_path):
    model = _make(kind, tmp_path, seed=3)
    cfg, params = load_hf(tmp_path)
    prompts = np.random.default_rng(4).integers(0, VOCAB, (2, 7))
    n = 12
    with torch.no_grad():
        ref = model.generate(torch.tensor(prompts), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0).numpy()[:, prompts.shape[1]:]
    out = generate(params, cfg, prompts.tolist(), n, DecodeOptions(temperature=0))
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)


def test_sharded_checkpoint_loads_like_the_single_file(family, tmp_path):
    from safetensors.numpy import load_file, save_file

    kind, _, folder, cfg, params = family
    tensors = load_file(str(folder / "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / file), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / hf_families.INDEX_FILE).write_text(json.dumps(index))
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    cfg2, params2 = load_hf(tmp_path)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params, params2)

    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load_hf(tmp_path)


def test_bfloat16_and_float16_checkpoints_read_exactly(tmp_path):
    model = _make("qwen3", tmp_path / "f32", seed=5)
    for dtype in (torch.bfloat16, torch.float16):
        folder = tmp_path / str(dtype)
        model.to(dtype).save_pretrained(folder)
        _, params = load_hf(folder)
        ref = model.state_dict()
        got = np.asarray(params["h_1"]["attn"]["c_k"]["kernel"])
        np.testing.assert_array_equal(got, ref["model.layers.1.self_attn.k_proj.weight"].float().numpy().T)
        got = np.asarray(params["h_0"]["attn"]["q_norm"]["scale"])
        np.testing.assert_array_equal(got, ref["model.layers.0.self_attn.q_norm.weight"].float().numpy())


# ---------------------------------------------------------------------------------------------------------
# peft on a Llama, both ways


def _peft():
    return pytest.importorskip("peft")


def test_jaxgpt_adapters_load_in_peft_with_the_same_logits(tmp_path):
    from jaxgpt import lora

    peft = _peft()
    model = _make("llama", tmp_path / "base", seed=6)
    cfg, params = load_hf(tmp_path / "base")
    lcfg = lora.LoraConfig(rank=3, alpha=7.0, targets=("attn/c_q", "attn/c_v", "attn/c_proj", "mlp/c_gate",
                                                        "mlp/c_fc", "mlp/c_proj"))
    adapters = lora.init_lora(0, params, lcfg)
    rng = np.random.default_rng(7)  # B starts at zero: give it values so the adapters change the logits
    adapters = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(0.05 * rng.standard_normal(x.shape), x.dtype)
        if jax.tree_util.keystr(p).endswith("['B']") else x, adapters)
    ours = _ours(cfg, lora.wrap(params, adapters, lcfg), TOKENS)
    assert np.abs(ours - _ours(cfg, params, TOKENS)).max() > 1e-2

    lora.save_peft(tmp_path / "adapters", adapters, lcfg, family="llama")
    conf = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert {m.rsplit(".", 1)[1] for m in conf["target_modules"]} == {"q_proj", "v_proj", "o_proj", "gate_proj",
                                                                     "up_proj", "down_proj"}
    with_peft = peft.PeftModel.from_pretrained(model, tmp_path / "adapters").eval()
    np.testing.assert_allclose(_hf_logits(with_peft, TOKENS), ours, atol=TOL, rtol=0)


def test_peft_adapters_load_into_jaxgpt_with_peft_logits(tmp_path):
    from jaxgpt import lora

    peft = _peft()
    model = _make("llama", tmp_path / "base", seed=8)
    cfg, params = load_hf(tmp_path / "base")
    pcfg = peft.LoraConfig(r=4, lora_alpha=6, init_lora_weights=False,  # random non-zero B
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj"], rank_pattern={"down_proj": 2}, alpha_pattern={"k_proj": 3})
    torch.manual_seed(9)
    with_peft = peft.get_peft_model(model, pcfg).eval()
    with_peft.save_pretrained(tmp_path / "adapters")
    adapters, lcfg = lora.load_peft(tmp_path / "adapters", params)
    ours = _ours(cfg, lora.wrap(params, adapters, lcfg), TOKENS)
    np.testing.assert_allclose(ours, _hf_logits(with_peft, TOKENS), atol=TOL, rtol=0)
    assert np.abs(ours - _ours(cfg, params, TOKENS)).max() > 1e-2


# ---------------------------------------------------------------------------------------------------------
# The folder through load_model and the sampling CLI


def test_a_hub_name_downloads_weights_shards_configs_and_tokenizer_and_loads_with_its_tokenizer(tmp_path,
                                                                                               monkeypatch):
    """`--init-from org/name`: one snapshot of the files a family folder needs (stood in for by a local folder:
    no network here), then the model and the folder's own tokenizer."""
    import fnmatch

    import huggingface_hub

    from jaxgpt.data.tokenizer import HFTokenizer
    from jaxgpt.io.workdir import load_model

    repo = tmp_path / "repo"
    model = _make("llama", repo, seed=12)
    write_bpe_tokenizer(repo)
    (repo / "README.md").write_text("not downloaded")
    asked = []

    def snapshot_download(name, allow_patterns):
        asked.append(name)
        out = tmp_path / "cache" / name.replace("/", "--")
        out.mkdir(parents=True)
        for f in repo.iterdir():
            if any(fnmatch.fnmatch(f.name, pat) for pat in allow_patterns):
                shutil.copy(f, out / f.name)
        return str(out)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    cfg, params, tok = load_model("org/tiny-llama")
    assert asked == ["org/tiny-llama"] and isinstance(tok, HFTokenizer)
    got = sorted(p.name for p in (tmp_path / "cache" / "org--tiny-llama").iterdir())
    assert got == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                   "tokenizer_config.json"], got
    np.testing.assert_allclose(_ours(cfg, params, TOKENS), _hf_logits(model, TOKENS), atol=TOL, rtol=0)


def test_sample_and_eval_clis_on_a_llama_folder_give_transformers_text_and_loss(tmp_path, capsys):
    from jaxgpt.data.tokenizer import HFTokenizer
    from jaxgpt.io.workdir import load_model
    from jaxgpt.sample import main

    model = _make("llama", tmp_path, seed=10)
    write_bpe_tokenizer(tmp_path, bos="<s>", eos="</s>")
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [1, 2]}))
    cfg, params, tok = load_model(tmp_path)
    assert isinstance(tok, HFTokenizer) and (tok.bos_id, tok.eot_id) == (0, 1)
    prompt = tok.encode_prompt("ROMEO: what light")
    assert prompt[0] == 0  # the tokenizer's own BOS, as transformers adds it
    n = 6
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0).numpy()[0, len(prompt):]
    assert 1 not in ref  # no EOS: the CLI decodes all n tokens
    assert main(["--init-from", str(tmp_path), "--prompt", "ROMEO: what light", "--max-new-tokens", str(n),
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out == "ROMEO: what light" + tok.decode(ref) + "\n"

    from jaxgpt.eval.__main__ import main as eval_main

    text = "But, soft! what light through yonder window breaks?"
    (tmp_path / "text.txt").write_text(text)
    assert eval_main(["perplexity", "--init-from", str(tmp_path), "--file", str(tmp_path / "text.txt"),
                      "--output", str(tmp_path / "ppl.json")]) == 0
    ids = torch.tensor([tok.encode(text)])  # one window: the text is shorter than block_size
    assert ids.shape[1] < cfg.block_size
    with torch.no_grad():
        ref_nll = float(model(ids, labels=ids).loss)
    got = json.loads((tmp_path / "ppl.json").read_text())
    assert got["n_tokens"] == ids.shape[1] - 1 and abs(got["nll"] - ref_nll) < 1e-5


@pytest.mark.run
def test_lora_fine_tune_of_a_llama_folder_exports_the_merged_llama(tmp_path):
    """A LoRA run (init_from="hf") on a Llama folder, its data tokenized with the folder's tokenizer.json: the
    loss falls, and transformers' logits of the merged export equal jaxgpt's of merge(base, adapters)."""
    from helpers import REPO, SHAKESPEARE

    from jaxgpt import data as data_lib
    from jaxgpt import lora
    from jaxgpt.train import config as train_config
    from jaxgpt.train import metrics, trainer

    base = tmp_path / "base"
    _make("llama", base, seed=12)
    write_bpe_tokenizer(base)
    (tmp_path / "slice.txt").write_text(SHAKESPEARE.read_text()[:20000])
    data_lib.prepare(tmp_path / "data", dataset="text", tokenizer="hf", input_path=tmp_path / "slice.txt",
                     bpe_path=base)
    c = train_config.load_config_file(str(REPO / "configs" / "finetune_lora.py"))
    c.init_path, c.data.dir, c.data.tokenizer, c.data.bpe_path = str(base), str(tmp_path / "data"), "hf", str(base)
    c.lora.rank, c.lora.alpha, c.lora.targets = 4, 12.0, ("attn/c_q", "attn/c_v", "mlp/c_gate", "mlp/c_proj")
    c.batch_size, c.grad_accum, c.max_iters, c.eval_iters, c.eval_interval, c.ckpt_interval = 4, 1, 6, 2, 6, 6
    c.learning_rate, c.min_lr, c.warmup_iters, c.lr_decay_iters = 3e-2, 3e-3, 1, 6
    c.eval_at_start, c.log_interval, c.sample_tokens, c.progress = True, 1, 4, False
    c.model.block_size = 32
    summary = trainer.train(c, tmp_path / "run")

    evals = [r for r in metrics.read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals[-1]["train_loss"] < evals[0]["train_loss"] - 0.05, evals
    back = transformers.LlamaForCausalLM.from_pretrained(summary["export"]).eval()
    cfg, params = load_hf(base)
    adapters, lcfg = lora.load_adapters(tmp_path / "run" / "lora", params)
    ours = _ours(cfg, lora.merge(params, adapters, lcfg), TOKENS)
    np.testing.assert_allclose(_hf_logits(back, TOKENS), ours, atol=TOL, rtol=0)
    assert np.abs(ours - _ours(cfg, params, TOKENS)).max() > 1e-3  # the adapters moved


# ---------------------------------------------------------------------------------------------------------
# What cannot load: one line naming the file and the field


def _edit_config(src, dst, **changes):
    shutil.copytree(src, dst)
    conf = json.loads((dst / "config.json").read_text())
    conf.update(changes)
    (dst / "config.json").write_text(json.dumps(conf))
    return dst


@pytest.mark.parametrize("change, message", [
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
     "rope_parameters of rope_type 'llama3' has no 'low_freq_factor'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 8.0}}, "rope_type 'yarn'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling has rope_type 'linear'"),
    ({"mlp_bias": True}, "mlp_bias=true"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"use_sliding_window": True}, "use_sliding_window=true"),
    ({"attention_bias": True}, "attention_bias=true"),
    ({"model_type": "mistral"}, "model_type 'mistral' is not supported"),
])
def test_unsupported_config_fields_are_refused_by_name(tmp_path, change, message):
    _make("llama", tmp_path / "good")
    bad = _edit_config(tmp_path / "good", tmp_path / "bad", **change)
    with pytest.raises(ValueError, match=message) as e:
        load_hf(bad)
    assert "config.json" in str(e.value) and "\n" not in str(e.value)


def test_missing_misshapen_and_extra_tensors_are_refused_by_name(tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "good"
    _make("qwen2", folder)
    tensors = load_file(str(folder / "model.safetensors"))

    def variant(name, sd):
        d = tmp_path / name
        d.mkdir()
        shutil.copy(folder / "config.json", d / "config.json")
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
        return d

    key = "model.layers.1.self_attn.k_proj.bias"
    with pytest.raises(KeyError, match=f"model.safetensors has no tensor '{key}'"):
        load_hf(variant("missing", {k: v for k, v in tensors.items() if k != key}))
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.up_proj.weight has shape \(95, 64\), config.json "
                                         r"implies \(96, 64\)"):
        load_hf(variant("shape", {**tensors, "model.layers.0.mlp.up_proj.weight": np.ones((95, 64), np.float32)}))
    with pytest.raises(ValueError, match="does not use, e.g. 'model.layers.0.mlp.up_proj.bias'"):
        load_hf(variant("extra", {**tensors, "model.layers.0.mlp.up_proj.bias": np.ones(96, np.float32)}))
    (tmp_path / "trunc").mkdir()
    shutil.copy(folder / "config.json", tmp_path / "trunc" / "config.json")
    data = (folder / "model.safetensors").read_bytes()
    (tmp_path / "trunc" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or damaged"):
        load_hf(tmp_path / "trunc")


@pytest.mark.parametrize("style, fused", [("llama", True), ("qwen3", False)])
def test_llama_and_qwen3_style_presets_export_to_transformers(tmp_path, style, fused):
    from helpers import random_params

    from jaxgpt import GPTConfig

    cfg = GPTConfig.preset("nano", style=style, fused_qkv=fused)  # fused: one c_attn split into q, k, v
    params = random_params(cfg, seed=11, std=0.05)
    export_hf(cfg, params, tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(model).__name__ == {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}[style]
    tokens = TOKENS % cfg.vocab_size
    np.testing.assert_allclose(_hf_logits(model, tokens), _ours(cfg, params, tokens), atol=TOL, rtol=0)


def test_export_refuses_what_no_family_expresses(tmp_path):
    from helpers import random_params

    from jaxgpt import GPTConfig

    cfg = GPTConfig.preset("tiny", pos_embedding="rope", norm="rmsnorm", bias=False, mlp="relu2")
    with pytest.raises(ValueError, match=r"mlp='relu2' \(they use swiglu\)"):
        export_hf(cfg, random_params(cfg), tmp_path)
    assert not (tmp_path / "model.safetensors").exists()
