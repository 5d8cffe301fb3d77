"""Llama, Qwen2 and Qwen3 checkpoints in and out (transformers' LlamaForCausalLM, Qwen2ForCausalLM,
Qwen3ForCausalLM), as GPTConfig switches: rope (rotate_half, Llama's layout), rmsnorm, no biases, SwiGLU,
grouped-query attention, separate q/k/v projections, q/k/v biases (Qwen2), QK-norm and a free head_dim (Qwen3).

One table (`tensor_map`) names every tensor of a family once: its Hugging Face name, its jaxgpt param path,
its jaxgpt shape and whether it is transposed (torch Linear weights are [out, in], jaxgpt kernels [in, out]).
Import and export both walk it, so they cannot disagree.

Weights are read from `model.safetensors` or from the shards a `model.safetensors.index.json` lists, with a
small reader of the safetensors format that also takes bfloat16 (safetensors' numpy loader does not).
Config fields that change the math and are not implemented (rope scaling, sliding windows, MLP biases, an
activation other than SiLU, ...) are refused by name before any weight is read.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from jaxgpt.io import atomic, paths
from jaxgpt.nn.config import GPTConfig

FAMILIES = ("llama", "qwen2", "qwen3")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# tensors some checkpoints carry that hold no weights (recomputed buffers)
IGNORED_TENSORS = re.compile(r".*\.rotary_emb\.inv_freq")

Params = Any


# ---------------------------------------------------------------------------------------------------------
# config.json <-> GPTConfig


def _rope(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """GPTConfig's rope fields from transformers 5's `rope_parameters` or older `rope_theta` / `rope_scaling`:
    the default rope, or Llama 3.1's scaling ("llama3"); other scalings are refused."""
    params = hf.get("rope_parameters") or {}
    if isinstance(params, dict) and "rope_type" not in params and params and all(isinstance(v, dict) for v in
                                                                                 params.values()):
        raise ValueError(f"{where}: rope_parameters per layer type ({sorted(params)}) is not supported; jaxgpt "
                         "has one rope for every layer")
    scaling = hf.get("rope_scaling") or {}
    fields: dict[str, Any] = {}
    for d, name in ((params, "rope_parameters"), (scaling, "rope_scaling")):
        kind = d.get("rope_type", d.get("type", "default")) if d else "default"
        if kind not in ("default", "llama3"):
            raise ValueError(f"{where}: {name} has rope_type {kind!r}; jaxgpt implements the default rope and "
                             "Llama 3.1's 'llama3' scaling (no YaRN / linear / dynamic scaling)")
        if float(d.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError(f"{where}: {name} sets partial_rotary_factor={d['partial_rotary_factor']}; jaxgpt "
                             "rotates the whole head")
        if kind == "llama3":
            try:
                fields = {"rope_scaling": "llama3", "rope_factor": float(d["factor"]),
                          "rope_low_freq_factor": float(d["low_freq_factor"]),
                          "rope_high_freq_factor": float(d["high_freq_factor"]),
                          "rope_original_context": int(d["original_max_position_embeddings"])}
            except KeyError as e:
                raise ValueError(f"{where}: {name} of rope_type 'llama3' has no {e.args[0]!r}") from None
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    return {"rope_theta": float(theta), **fields}


def _refuse_unsupported(hf: dict[str, Any], family: str, where: str) -> None:
    """One line naming the first config field whose math jaxgpt does not implement."""
    act = hf.get("hidden_act", "silu")
    checks = [
        (act != "silu", f"hidden_act={act!r} (jaxgpt's gated MLP is SwiGLU: silu)"),
        (bool(hf.get("mlp_bias")), "mlp_bias=true (jaxgpt's Llama MLP has no biases)"),
        (bool(hf.get("use_sliding_window")), "use_sliding_window=true (sliding-window attention)"),
        (any(t != "full_attention" for t in hf.get("layer_types") or []),
         f"layer_types {sorted(set(hf.get('layer_types') or []))} (only full_attention)"),
        (family != "qwen2" and bool(hf.get("attention_bias")),
         "attention_bias=true (it biases o_proj too; jaxgpt biases only q/k/v)"),
        (int(hf.get("pretraining_tp") or 1) != 1, f"pretraining_tp={hf.get('pretraining_tp')}"),
        (float(hf.get("attention_dropout") or 0.0) != 0.0, f"attention_dropout={hf.get('attention_dropout')}"),
    ]
    for bad, what in checks:
        if bad:
            raise ValueError(f"{where} sets {what}, which jaxgpt does not implement; this checkpoint cannot load")


def config_from_hf(hf: dict[str, Any], where: str = "config.json", **overrides: Any) -> GPTConfig:
    """GPTConfig from a Llama / Qwen2 / Qwen3 config.json dict (`where` names the file in errors)."""
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise ValueError(f"{where}: model_type {family!r} is not one of {', '.join(FAMILIES)}")
    _refuse_unsupported(hf, family, where)
    rope = _rope(hf, where)
    try:
        C, H = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        fields = {"vocab_size": int(hf["vocab_size"]), "n_layer": int(hf["num_hidden_layers"]), "n_head": H,
                  "n_embd": C, "mlp_hidden": int(hf["intermediate_size"])}
    except KeyError as e:
        raise KeyError(f"{where} has no {e.args[0]!r}; is it a {family} config.json?") from None
    kv = int(hf.get("num_key_value_heads") or H)
    head = int(hf.get("head_dim") or C // H)
    return GPTConfig(
        **fields, block_size=int(hf.get("max_position_embeddings", 2048)),
        n_kv_head=0 if kv == H else kv, head_size=0 if H * head == C else head,
        layer_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), **rope,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bias=False, pos_embedding="rope", norm="rmsnorm", norm_position="pre", mlp="swiglu", fused_qkv=False,
        qkv_bias=family == "qwen2", qk_norm=family == "qwen3", **overrides,
    )


def family_of(model_cfg: GPTConfig) -> str:
    """The Hugging Face family a GPTConfig exports as; one line listing what none of them can express."""
    problems = [what for bad, what in (
        (model_cfg.pos_embedding != "rope", f"pos_embedding={model_cfg.pos_embedding!r} (they use rope)"),
        (model_cfg.norm != "rmsnorm", f"norm={model_cfg.norm!r} (they use rmsnorm)"),
        (model_cfg.norm_position != "pre", f"norm_position={model_cfg.norm_position!r} (they are pre-norm)"),
        (model_cfg.bias, "bias=True (they have no biases but Qwen2's q/k/v)"),
        (model_cfg.mlp != "swiglu", f"mlp={model_cfg.mlp!r} (they use swiglu)"),
        (float(model_cfg.logit_softcap) != 0.0, f"logit_softcap={model_cfg.logit_softcap} (they have none)"),
        (model_cfg.qk_norm and model_cfg.qkv_bias, "qk_norm with qkv_bias (Qwen3's attention_bias adds o_proj's)"),
    ) if bad]
    if problems:
        raise ValueError("cannot export as Llama / Qwen2 / Qwen3: " + "; ".join(problems))
    return "qwen3" if model_cfg.qk_norm else "qwen2" if model_cfg.qkv_bias else "llama"


def config_to_hf(model_cfg: GPTConfig, family: str) -> dict[str, Any]:
    """config.json for `family` that transformers 4.4x and 5.x both read (rope_theta and rope_parameters)."""
    c = model_cfg
    hf = {
        "architectures": [ARCHITECTURES[family]], "model_type": family, "hidden_act": "silu",
        "vocab_size": c.vocab_size, "hidden_size": c.n_embd, "intermediate_size": _mlp_hidden(c),
        "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head, "num_key_value_heads": c.kv_heads,
        "head_dim": c.head_dim, "max_position_embeddings": c.block_size, "rms_norm_eps": c.layer_norm_eps,
        "rope_theta": c.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "rope_scaling": None, "tie_word_embeddings": c.tie_embeddings, "attention_dropout": 0.0,
        "initializer_range": 0.02, "use_cache": True, "torch_dtype": "float32", "dtype": "float32",
    }
    if c.rope_scaling == "llama3":  # Llama 3.1+'s scaling, in both spellings transformers reads
        factor, low, high, context = c.rope_scaling_params
        scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                   "original_max_position_embeddings": context}
        hf.update(rope_scaling=scaling, rope_parameters={**scaling, "rope_theta": c.rope_theta})
    if family == "llama":
        hf.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    else:
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=c.n_layer)
    if family == "qwen3":
        hf["attention_bias"] = False
    return hf


def _mlp_hidden(model_cfg: GPTConfig) -> int:
    return model_cfg.mlp_hidden or 4 * model_cfg.n_embd


def is_family_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder (or bucket prefix) whose config.json has a model_type of FAMILIES (not GPT-2)."""
    f = paths.as_path(path) / "config.json"
    try:
        return f.is_file() and json.loads(f.read_text()).get("model_type") in FAMILIES
    except (json.JSONDecodeError, AttributeError):
        return False


# ---------------------------------------------------------------------------------------------------------
# The tensor table


class Tensor(NamedTuple):
    hf_name: str  # name in the Hugging Face state dict
    path: tuple[str, ...]  # jaxgpt param path
    shape: tuple[int, ...]  # jaxgpt shape
    transposed: bool  # the Hugging Face tensor is the transpose (torch Linear [out, in])


def tensor_map(model_cfg: GPTConfig) -> list[Tensor]:
    """Every tensor of the family checkpoint `model_cfg` describes (separate q/k/v projections)."""
    c = model_cfg
    C, F, V = c.n_embd, _mlp_hidden(c), c.vocab_size
    q, kv = c.n_head * c.head_dim, c.kv_heads * c.head_dim
    out = [Tensor("model.embed_tokens.weight", ("wte", "embedding"), (V, C), False),
           Tensor("model.norm.weight", ("ln_f", "scale"), (C,), False)]
    if not c.tie_embeddings:
        out.append(Tensor("lm_head.weight", ("lm_head", "kernel"), (C, V), True))
    for i in range(c.n_layer):
        p, h = f"model.layers.{i}.", f"h_{i}"
        linears = [("self_attn.q_proj", ("attn", "c_q"), (C, q)), ("self_attn.k_proj", ("attn", "c_k"), (C, kv)),
                   ("self_attn.v_proj", ("attn", "c_v"), (C, kv)), ("self_attn.o_proj", ("attn", "c_proj"), (q, C)),
                   ("mlp.gate_proj", ("mlp", "c_gate"), (C, F)), ("mlp.up_proj", ("mlp", "c_fc"), (C, F)),
                   ("mlp.down_proj", ("mlp", "c_proj"), (F, C))]
        out += [Tensor(f"{p}{name}.weight", (h, *path, "kernel"), shape, True) for name, path, shape in linears]
        if c.qkv_bias:
            out += [Tensor(f"{p}self_attn.{n}_proj.bias", (h, "attn", f"c_{n}", "bias"), (w,), False)
                    for n, w in (("q", q), ("k", kv), ("v", kv))]
        if c.qk_norm:
            out += [Tensor(f"{p}self_attn.{n}_norm.weight", (h, "attn", f"{n}_norm", "scale"), (c.head_dim,), False)
                    for n in ("q", "k")]
        out += [Tensor(f"{p}input_layernorm.weight", (h, "ln_1", "scale"), (C,), False),
                Tensor(f"{p}post_attention_layernorm.weight", (h, "ln_2", "scale"), (C,), False)]
    return out


def _hf_shape(t: Tensor) -> tuple[int, ...]:
    return t.shape[::-1] if t.transposed else t.shape


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


# ---------------------------------------------------------------------------------------------------------
# safetensors, single file or sharded

_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
           "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _np_dtype(name: str, where: Path, key: str) -> np.dtype:
    if name not in _DTYPES:
        raise ValueError(f"{where}: tensor {key!r} has dtype {name}, which jaxgpt cannot read")
    if name == "BF16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(_DTYPES[name])


def read_safetensors(file: Any) -> dict[str, np.ndarray]:
    """name -> array (memory-mapped and read-only on a local disk; read whole from a bucket) of one safetensors
    file; bfloat16 comes back as ml_dtypes'."""
    raw = file.read_bytes() if paths.is_url(file) else None
    try:
        if raw is None:
            with open(file, "rb") as f:
                head = f.read(8)
                (n,) = struct.unpack("<Q", head)
                header = json.loads(f.read(n))
        else:
            (n,) = struct.unpack("<Q", raw[:8])
            header = json.loads(raw[8:8 + n])
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not a readable safetensors file ({e}); re-download or re-export it") from e
    header.pop("__metadata__", None)
    if raw is not None:
        data = np.frombuffer(raw, np.uint8, offset=8 + n)
    elif header and os.path.getsize(file) > 8 + n:
        data = np.memmap(file, dtype=np.uint8, mode="r", offset=8 + n)
    else:
        data = np.zeros(0, np.uint8)
    out = {}
    for key, info in header.items():
        dtype = _np_dtype(info["dtype"], file, key)
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end - start != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or end > data.size:
            raise ValueError(f"{file}: tensor {key!r} has a byte range that does not fit its shape {shape}; the "
                             "file is truncated or damaged")
        out[key] = data[start:end].view(dtype).reshape(shape)
    return out


def weight_files(d: Any) -> list[Any]:
    """The safetensors files of a folder: model.safetensors, or every shard its index file lists."""
    index = d / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a safetensors index (a JSON object with weight_map): {e}") from e
        files = [d / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are missing: {', '.join(missing)}; download them")
        return files
    if (d / SINGLE_FILE).is_file():
        return [d / SINGLE_FILE]
    raise FileNotFoundError(f"{d} has neither {SINGLE_FILE} nor {INDEX_FILE}; pass a Hugging Face model folder")


def read_state_dict(d: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(name -> array, name -> the file holding it) over every weight file of the folder."""
    tensors, where = {}, {}
    for f in weight_files(d):
        for k, v in read_safetensors(f).items():
            if k in tensors:
                raise ValueError(f"{f}: tensor {k!r} is also in {where[k]}; the shards overlap")
            tensors[k], where[k] = v, f
    return tensors, where


# ---------------------------------------------------------------------------------------------------------
# Load and export


def load(d: Any, hf_cfg: dict[str, Any], **config_overrides: Any) -> tuple[GPTConfig, Params]:
    """(GPTConfig, params) of a Llama / Qwen2 / Qwen3 folder whose parsed config.json is `hf_cfg`. Every tensor
    is checked (present, shape) before any is converted; extra tensors are refused by name."""
    import jax.numpy as jnp

    model_cfg = config_from_hf(hf_cfg, str(d / "config.json"), **config_overrides)
    sd, where = read_state_dict(d)
    table = tensor_map(model_cfg)
    files = ", ".join(sorted({f.name for f in where.values()})) or "no file"
    for t in table:
        if t.hf_name not in sd:
            raise KeyError(f"{d}: {files} has no tensor {t.hf_name!r}, which config.json implies "
                           f"({model_cfg.n_layer} layers, tie_word_embeddings={model_cfg.tie_embeddings})")
        got = tuple(sd[t.hf_name].shape)
        if got != _hf_shape(t):
            raise ValueError(f"{where[t.hf_name]}: {t.hf_name} has shape {got}, config.json implies {_hf_shape(t)}")
    used = {t.hf_name for t in table}
    extra = sorted(k for k in sd if k not in used and not IGNORED_TENSORS.fullmatch(k))
    if model_cfg.tie_embeddings and "lm_head.weight" in extra:
        extra.remove("lm_head.weight")  # some tied checkpoints store the (shared) head as well
    if extra:
        raise ValueError(f"{where[extra[0]]} holds {len(extra)} tensor(s) jaxgpt's {hf_cfg['model_type']} mapping "
                         f"does not use, e.g. {extra[0]!r}; the checkpoint does not match its config.json")
    params: dict[str, Any] = {}
    for t in table:
        x = np.asarray(sd[t.hf_name], dtype=np.float32)
        _set(params, t.path, jnp.asarray(np.ascontiguousarray(x.T) if t.transposed else x, model_cfg.params_dtype))
    return model_cfg, params


def _unfused(model_cfg: GPTConfig, params: Params) -> Params:
    """A fused attn/c_attn ([C, (H + 2 Hkv) D], q then k then v) as c_q, c_k, c_v, so one table exports both."""
    if not model_cfg.fused_qkv:
        return params
    q, kv = model_cfg.n_head * model_cfg.head_dim, model_cfg.kv_heads * model_cfg.head_dim
    out = dict(params)
    for i in range(model_cfg.n_layer):
        attn = dict(params[f"h_{i}"]["attn"])
        fused = attn.pop("c_attn")
        for name, lo, hi in (("c_q", 0, q), ("c_k", q, q + kv), ("c_v", q + kv, q + 2 * kv)):
            attn[name] = {k: v[..., lo:hi] for k, v in fused.items()}
        out[f"h_{i}"] = {**params[f"h_{i}"], "attn": attn}
    return out


def export(model_cfg: GPTConfig, params: Params, out_dir: str | os.PathLike) -> Any:
    """Write config.json + model.safetensors that transformers' {Llama,Qwen2,Qwen3}ForCausalLM.from_pretrained
    loads with jaxgpt's logits; the family follows from the switches (`family_of`). Each file is written under a
    temporary name and renamed, so an interrupted export never replaces a good file with half of one."""
    import jax
    from safetensors.numpy import save_file

    from jaxgpt.nn import weights

    family = family_of(model_cfg)
    if any(weights.is_weight_leaf(x) for x in weights.leaves(params)):
        raise ValueError("cannot export quantized params; dequantize them first (jaxgpt.quantize.dequantize)")
    params = _unfused(model_cfg, params)
    sd = {}
    for t in tensor_map(model_cfg.replace(fused_qkv=False)):
        x = np.asarray(jax.device_get(_get(params, t.path)), dtype=np.float32)
        if tuple(x.shape) != t.shape:
            raise ValueError(f"param {'/'.join(t.path)} has shape {tuple(x.shape)}, the config implies {t.shape}")
        sd[t.hf_name] = np.ascontiguousarray(x.T if t.transposed else x)
    out = paths.as_path(out_dir)
    if not paths.is_url(out):
        out.mkdir(parents=True, exist_ok=True)
    with atomic.file(out / SINGLE_FILE) as tmp:
        save_file(sd, str(tmp), metadata={"format": "pt"})
    atomic.write_text(out / "config.json", json.dumps(config_to_hf(model_cfg, family), indent=2))
    return out


# ---------------------------------------------------------------------------------------------------------
# peft module names on a transformers Llama / Qwen (LoRA adapters in peft's format)

PEFT_NAMES = {("attn", "c_q"): "self_attn.q_proj", ("attn", "c_k"): "self_attn.k_proj",
              ("attn", "c_v"): "self_attn.v_proj", ("attn", "c_proj"): "self_attn.o_proj",
              ("mlp", "c_gate"): "mlp.gate_proj", ("mlp", "c_fc"): "mlp.up_proj", ("mlp", "c_proj"): "mlp.down_proj"}
_PEFT_PATHS = {v: k for k, v in PEFT_NAMES.items()}
PEFT_KEY = re.compile(r"(?:base_model\.model\.)?model\.layers\.(\d+)\."
                      r"(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.lora_([AB])(?:\.default)?\.weight")


def peft_module_name(mpath: tuple[str, ...]) -> str | None:
    """("h_0", "attn", "c_q") -> "model.layers.0.self_attn.q_proj"; None for a weight a transformers Llama lacks."""
    m = re.fullmatch(r"h_(\d+)", mpath[0]) if len(mpath) == 3 else None
    name = PEFT_NAMES.get(tuple(mpath[1:]))
    return None if m is None or name is None else f"model.layers.{m.group(1)}.{name}"


def peft_module_path(key: str) -> tuple[tuple[str, ...], str] | None:
    """An adapter tensor name of peft on a Llama -> (jaxgpt module path, "A" | "B"), or None."""
    m = PEFT_KEY.fullmatch(key)
    if m is None:
        return None
    return (f"h_{m.group(1)}", *_PEFT_PATHS[m.group(2)]), m.group(3)
