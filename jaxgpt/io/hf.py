"""Weights in and out: Hugging Face GPT-2 import/export (safetensors) and plain orbax pytree save/restore.

Hugging Face GPT-2 uses Conv1D layers whose weights are [in, out], the same layout as jaxgpt's Dense
kernels, so blocks map one to one; only `lm_head.weight` ([vocab, n_embd]) is transposed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxgpt.io import atomic, paths
from jaxgpt.nn import weights
from jaxgpt.nn.config import GPTConfig

HF_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2")
# what a Hub download fetches: the weights (one file or shards with their index), the configs, the tokenizer
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


# ---------------------------------------------------------------------------------------------------------
# Hugging Face GPT-2


def model_dir(path_or_name: str | os.PathLike) -> Any:
    """A local directory or bucket URL, or a Hub model name downloaded with huggingface_hub (needs the network)."""
    p = paths.as_path(path_or_name)
    if p.is_dir():
        return p
    if paths.is_url(p):
        raise FileNotFoundError(f"{p} is not a directory with config.json and model.safetensors")
    name = str(path_or_name)
    hub_id = name.count("/") <= 1 and not name.startswith(("/", ".", "~")) and "\\" not in name  # org/name
    if p.exists() or not hub_id:
        raise FileNotFoundError(f"{name} is not a directory with config.json and model.safetensors")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=HUB_FILES))
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(
            f"cannot download {name!r} from the Hugging Face Hub ({type(e).__name__}: {e}); "
            "offline, pass a local directory holding config.json and model.safetensors"
        ) from e


def config_from_hf(hf: dict[str, Any], **overrides: Any) -> GPTConfig:
    """GPTConfig from a Hugging Face GPT-2 config.json dict."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"model_type {hf.get('model_type')!r} is not GPT-2; only GPT-2 checkpoints load")
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"activation_function {act!r} is not supported; jaxgpt uses GPT-2's tanh GELU (gelu_new)")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(flag):
            raise ValueError(f"config.json sets {flag}=true, which jaxgpt does not implement")
    if not hf.get("scale_attn_weights", True):
        raise ValueError("config.json sets scale_attn_weights=false, which jaxgpt does not implement")
    return GPTConfig(
        vocab_size=hf["vocab_size"], block_size=hf.get("n_positions", 1024), n_layer=hf["n_layer"],
        n_head=hf["n_head"], n_embd=hf["n_embd"], layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=hf.get("tie_word_embeddings", True), bias=True, pos_embedding="learned",
        norm="layernorm", norm_position="pre", **overrides,
    )


def load_hf_gpt2(path_or_name: str | os.PathLike, **config_overrides: Any) -> tuple[GPTConfig, dict]:
    """Read a Hugging Face GPT-2 directory (config.json + model.safetensors) -> (GPTConfig, params).

    A model name ("gpt2", "gpt2-medium", ...) is downloaded with huggingface_hub when online.
    """
    from safetensors.numpy import load, load_file

    d = model_dir(path_or_name)
    cfg_file, weights = d / "config.json", d / "model.safetensors"
    for f in (cfg_file, weights):
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing; a Hugging Face GPT-2 directory holds config.json and "
                                    "model.safetensors")
    try:
        hf_cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file} is not valid JSON ({e}); re-download or re-export the checkpoint") from e
    model_cfg = config_from_hf(hf_cfg, **config_overrides)
    try:
        raw = load(weights.read_bytes()) if paths.is_url(weights) else load_file(str(weights))
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{weights} is not a readable safetensors file ({e}); re-download or re-export it") from e
    sd = {k.removeprefix("transformer."): v for k, v in raw.items()}

    def get(key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in sd:
            raise KeyError(f"{weights} has no tensor {key!r}; is it a GPT-2 checkpoint?")
        x = sd[key]
        if tuple(x.shape) != shape:
            raise ValueError(f"{weights}: {key} has shape {tuple(x.shape)}, config.json implies {shape}")
        return np.asarray(x, dtype=model_cfg.params_dtype)

    C, V = model_cfg.n_embd, model_cfg.vocab_size
    params: dict[str, Any] = {
        "wte": {"embedding": get("wte.weight", (V, C))},
        "wpe": {"embedding": get("wpe.weight", (model_cfg.block_size, C))},
        "ln_f": {"scale": get("ln_f.weight", (C,)), "bias": get("ln_f.bias", (C,))},
    }
    for i in range(model_cfg.n_layer):
        p = f"h.{i}."
        params[f"h_{i}"] = {
            "ln_1": {"scale": get(p + "ln_1.weight", (C,)), "bias": get(p + "ln_1.bias", (C,))},
            "attn": {
                "c_attn": {"kernel": get(p + "attn.c_attn.weight", (C, 3 * C)), "bias": get(p + "attn.c_attn.bias", (3 * C,))},
                "c_proj": {"kernel": get(p + "attn.c_proj.weight", (C, C)), "bias": get(p + "attn.c_proj.bias", (C,))},
            },
            "ln_2": {"scale": get(p + "ln_2.weight", (C,)), "bias": get(p + "ln_2.bias", (C,))},
            "mlp": {
                "c_fc": {"kernel": get(p + "mlp.c_fc.weight", (C, 4 * C)), "bias": get(p + "mlp.c_fc.bias", (4 * C,))},
                "c_proj": {"kernel": get(p + "mlp.c_proj.weight", (4 * C, C)), "bias": get(p + "mlp.c_proj.bias", (C,))},
            },
        }
    if not model_cfg.tie_embeddings:
        head = raw.get("lm_head.weight")
        if head is None:
            raise KeyError(f"{weights} has no lm_head.weight but config.json says the embeddings are untied")
        params["lm_head"] = {"kernel": np.ascontiguousarray(np.asarray(head, model_cfg.params_dtype).T)}
    return model_cfg, jax.tree.map(jax.numpy.asarray, params)


def export_hf_gpt2(model_cfg: GPTConfig, params: Any, out_dir: str | os.PathLike) -> Any:
    """Write config.json + model.safetensors that `transformers.GPT2LMHeadModel.from_pretrained` loads.

    Files are written under temporary names and renamed, so an interrupted export never leaves a half
    written checkpoint in place of a good one (in a bucket each object is uploaded whole: `jaxgpt.io.atomic`).
    """
    from safetensors.numpy import save_file

    problems = []
    if model_cfg.pos_embedding != "learned":
        problems.append(f"pos_embedding={model_cfg.pos_embedding!r} (GPT-2 has learned positions)")
    if model_cfg.norm != "layernorm":
        problems.append(f"norm={model_cfg.norm!r} (GPT-2 has LayerNorm)")
    if model_cfg.norm_position != "pre":
        problems.append(f"norm_position={model_cfg.norm_position!r} (GPT-2 is pre-LN)")
    if not model_cfg.bias:
        problems.append("bias=False (GPT-2 has biases)")
    if problems:
        raise ValueError("cannot export to Hugging Face GPT-2: " + "; ".join(problems))
    if any(weights.is_weight_leaf(x) for x in weights.leaves(params)):
        raise ValueError("cannot export quantized params; dequantize them first (jaxgpt.quantize.dequantize)")

    f32 = lambda x: np.ascontiguousarray(np.asarray(jax.device_get(x), dtype=np.float32))  # noqa: E731
    sd = {
        "transformer.wte.weight": f32(params["wte"]["embedding"]),
        "transformer.wpe.weight": f32(params["wpe"]["embedding"]),
        "transformer.ln_f.weight": f32(params["ln_f"]["scale"]),
        "transformer.ln_f.bias": f32(params["ln_f"]["bias"]),
    }
    for i in range(model_cfg.n_layer):
        h, p = params[f"h_{i}"], f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            sd[p + ln + ".weight"] = f32(h[ln]["scale"])
            sd[p + ln + ".bias"] = f32(h[ln]["bias"])
        for mod, lin in (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj")):
            sd[f"{p}{mod}.{lin}.weight"] = f32(h[mod][lin]["kernel"])
            sd[f"{p}{mod}.{lin}.bias"] = f32(h[mod][lin]["bias"])
    if not model_cfg.tie_embeddings:
        sd["lm_head.weight"] = np.ascontiguousarray(f32(params["lm_head"]["kernel"]).T)

    hf_cfg = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
        "vocab_size": model_cfg.vocab_size, "n_positions": model_cfg.block_size, "n_ctx": model_cfg.block_size,
        "n_embd": model_cfg.n_embd, "n_layer": model_cfg.n_layer, "n_head": model_cfg.n_head, "n_inner": None,
        "layer_norm_epsilon": model_cfg.layer_norm_eps, "tie_word_embeddings": model_cfg.tie_embeddings,
        "resid_pdrop": model_cfg.dropout, "embd_pdrop": model_cfg.dropout, "attn_pdrop": model_cfg.dropout,
        "initializer_range": 0.02, "bos_token_id": 50256, "eos_token_id": 50256,
        "scale_attn_weights": True, "use_cache": True,
    }
    out = paths.as_path(out_dir)
    if not paths.is_url(out):
        out.mkdir(parents=True, exist_ok=True)
    with atomic.file(out / "model.safetensors") as tmp:
        save_file(sd, str(tmp), metadata={"format": "pt"})
    atomic.write_text(out / "config.json", json.dumps(hf_cfg, indent=2))
    return out


# ---------------------------------------------------------------------------------------------------------
# Any supported family, chosen by config.json's model_type (Llama, Qwen2, Qwen3: jaxgpt.io.hf_families)


def read_hf_config(d: Path) -> dict[str, Any]:
    """config.json of a Hugging Face model folder, parsed; one line naming the file when it is missing or bad."""
    f = d / "config.json"
    if not f.is_file():
        raise FileNotFoundError(f"{f} is missing; a Hugging Face model folder holds config.json and its weights")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f} is not valid JSON ({e}); re-download or re-export the checkpoint") from e


def load_hf(path_or_name: str | os.PathLike, **config_overrides: Any) -> tuple[GPTConfig, dict]:
    """(GPTConfig, params) of a Hugging Face folder of any supported model_type: gpt2, llama, qwen2, qwen3."""
    from jaxgpt.io import hf_families

    d = model_dir(path_or_name)
    hf_cfg = read_hf_config(d)
    model_type = hf_cfg.get("model_type", "gpt2")
    if model_type == "gpt2":
        return load_hf_gpt2(d, **config_overrides)
    if model_type in hf_families.FAMILIES:
        return hf_families.load(d, hf_cfg, **config_overrides)
    raise ValueError(f"{d / 'config.json'}: model_type {model_type!r} is not supported; jaxgpt loads gpt2, "
                     f"{', '.join(hf_families.FAMILIES)}")


def export_hf(model_cfg: GPTConfig, params: Any, out_dir: str | os.PathLike) -> Path:
    """A Hugging Face folder for `model_cfg`: GPT-2 for GPT-2's block (learned positions, LayerNorm), else
    Llama / Qwen2 / Qwen3 (jaxgpt.io.hf_families.family_of picks the one the switches describe)."""
    from jaxgpt.io import hf_families

    if model_cfg.pos_embedding == "learned" and model_cfg.norm == "layernorm":
        return export_hf_gpt2(model_cfg, params, out_dir)
    return hf_families.export(model_cfg, params, out_dir)
