"""A run's starting point and identity: its data, model config and initial params, what is trained (full or
LoRA), the files that make a workdir resumable, the restored train state, and what a run leaves at its end.

Workdir layout:
  config.json        GPTConfig of the model (so a run restores without knowing its training config)
  tokenizer.json     tokenizer meta (`jaxgpt.data.tokenizer.from_meta`)
  train_config.json  the full training config
  lora_run.json      LoRA settings and base of a LoRA run (its checkpoints hold the adapters only)
  checkpoints/<step>/{params, optimizer, meta}   orbax CheckpointManager (last k + best by val loss)
  metrics.jsonl      one JSON object per log / eval / event line
  loss.png, sample.txt, lora/ and hf/ (LoRA runs)
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from jaxgpt.data import memmap, preparation
from jaxgpt.data.shard_loader import is_shard_dir
from jaxgpt.io import atomic, checkpoint, hf
from jaxgpt.nn.config import GPTConfig
from jaxgpt.nn.model import init_params
from jaxgpt.train.steps import TrainState, identity_combine, init_state, no_split

Params = Any
LORA_RUN_FILE = "lora_run.json"
# what config.model may change on a loaded model when fine-tuning
# how the step runs, not what it computes: a run may resume with other values
RUN_ONLY_FIELDS = ("remat", "scan_layers")
FINETUNE_OVERRIDES = ("dropout", "dtype", "param_dtype", "attention", "block_size", "remat", "scan_layers")


# ---------------------------------------------------------------------------------------------------------
# Data and model config


def data_dir_of(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> Path:
    """config.data.dir, or <workdir>/data when it is empty."""
    return Path(config.data.dir) if config.data.dir else Path(workdir) / "data"


def ensure_data(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> Path:
    """The prepared dataset directory, tokenizing config.data.dataset into it when it is missing (a directory
    of llm.c shards is used as it is)."""
    d = data_dir_of(config, workdir)
    if not (d / "meta.json").is_file() and not is_shard_dir(d):
        preparation.prepare(d, dataset=config.data.dataset, tokenizer=config.data.tokenizer,
                         input_path=config.data.input or None, bpe_path=config.data.bpe_path or None,
                         val_fraction=float(config.data.val_fraction))
    return d


def data_meta(data_dir: Path) -> dict[str, Any]:
    """meta.json of a prepared directory; llm.c / modded-nanogpt shards made elsewhere have none and hold GPT-2
    BPE tokens."""
    if not (data_dir / "meta.json").is_file() and is_shard_dir(data_dir):
        return {"kind": "gpt2", "vocab_size": 50257}
    return memmap.load_meta(data_dir)


def apply_precision(cfg: GPTConfig, config: ml_collections.ConfigDict) -> GPTConfig:
    """config.mixed_precision: bfloat16 compute with float32 master weights."""
    if config.get("mixed_precision", False):
        return cfg.replace(dtype="bfloat16", param_dtype="float32")
    return cfg


def model_config(config: ml_collections.ConfigDict, vocab_size: int | None = None) -> GPTConfig:
    """GPTConfig from config.model (vocab_size 0 means "from the data"), with the mixed-precision switch."""
    fields = dict(config.model.to_dict())
    if not fields.get("vocab_size"):
        if vocab_size is None:
            raise ValueError("config.model.vocab_size is 0 (from the data) but no data vocabulary is known")
        fields["vocab_size"] = vocab_size
    return apply_precision(GPTConfig.from_dict(fields), config)


# ---------------------------------------------------------------------------------------------------------
# Starting point: from scratch, a Hugging Face GPT-2, or a jaxgpt run


class Initial(NamedTuple):
    cfg: GPTConfig
    params: Params | None  # None: from scratch, init_params(cfg, config.seed)
    tokenizer: dict[str, Any]


def initial_model(config: ml_collections.ConfigDict, data_meta: dict[str, Any]) -> Initial:
    """Model config, starting params and tokenizer meta: from scratch, a Hugging Face GPT-2 dir, or a jaxgpt run."""
    src = config.init_from
    if src == "scratch":
        cfg = model_config(config, data_meta["vocab_size"])
        tok = {k: v for k, v in data_meta.items() if k in ("kind", "chars", "vocab_size")}
        return Initial(cfg, None, tok)  # initialised by `train` unless a checkpoint supplies the values
    if src not in ("hf", "run"):
        raise ValueError(f"config.init_from={src!r} is not valid; use 'scratch', 'hf' or 'run'")
    if not config.init_path:
        raise ValueError(f"config.init_from={src!r} needs config.init_path (a directory or a model name)")
    if src == "hf":
        cfg, params = hf.load_hf_gpt2(config.init_path)
        tok = {"kind": "gpt2", "vocab_size": 50257}
    else:
        cfg, params, tok = checkpoint.load_run(config.init_path, config.init_which)
    if data_meta.get("kind") != tok.get("kind") or data_meta.get("chars") != tok.get("chars"):
        raise ValueError(f"the training data uses the {data_meta.get('kind')!r} tokenizer but {config.init_path} "
                         f"was trained with {tok.get('kind')!r} (or another char vocabulary); prepare the data "
                         "with the model's tokenizer")
    cfg, params = override_model(cfg, params, config)
    return Initial(cfg, params, tok)


def _is_unset(v: Any) -> bool:
    """0, "" and None in config.model mean "keep the loaded value" (False is a setting, not unset)."""
    return v is None or (isinstance(v, str) and v == "") or (type(v) in (int, float) and v == 0)


def override_model(cfg: GPTConfig, params: Params, config: ml_collections.ConfigDict) -> tuple[GPTConfig, Params]:
    """Fine-tuning changes to a loaded model: dropout, dtypes, attention, remat, scan, a smaller block_size."""
    # dropout is always a setting: 0.0 turns it off
    changes = {k: v for k, v in config.model.to_dict().items()
               if (k == "dropout" or not _is_unset(v)) and v != getattr(cfg, k, None)}
    bad = sorted(set(changes) - set(FINETUNE_OVERRIDES))
    if bad:
        raise ValueError(f"config.model sets {', '.join(f'{k}={changes[k]!r}' for k in bad)}, which the loaded "
                         f"model fixes ({', '.join(f'{k}={getattr(cfg, k, None)!r}' for k in bad)}); when "
                         f"fine-tuning, config.model may set only {list(FINETUNE_OVERRIDES)}")
    if changes.get("block_size", 0) > cfg.block_size:
        raise ValueError(f"config.model.block_size={changes['block_size']} exceeds the loaded model's "
                         f"{cfg.block_size}; use at most {cfg.block_size}")
    cfg = apply_precision(cfg.replace(**changes), config)
    if "block_size" in changes and "wpe" in params:
        params = {**params, "wpe": {"embedding": params["wpe"]["embedding"][: cfg.block_size]}}
    params = jax.tree.map(lambda p: jnp.asarray(p, cfg.params_dtype), params)
    return cfg, params


# ---------------------------------------------------------------------------------------------------------
# What is trained: everything, or LoRA adapters on a frozen base


@dataclasses.dataclass(frozen=True)
class Trainable:
    """`split(params) -> (trainable, frozen)` and `combine(trainable, frozen) -> params`; lora: its LoraConfig."""

    split: Callable[[Params], tuple[Params, Params]] = no_split
    combine: Callable[[Params, Params], Params] = identity_combine
    lora: Any = None


def lora_config_of(config: ml_collections.ConfigDict):
    """The jaxgpt.lora.LoraConfig of config.lora, or None when config.lora.rank is 0 (LoRA off)."""
    from jaxgpt import lora

    lc = config.get("lora")
    if lc is None or lc.rank == 0:
        return None
    if config.init_from == "scratch":
        raise ValueError("config.lora.rank > 0 fine-tunes a loaded model, but config.init_from='scratch'; set "
                         "config.init_from to 'hf' or 'run' (and config.init_path), or config.lora.rank=0")
    targets = (lc.targets,) if isinstance(lc.targets, str) else tuple(lc.targets)
    try:
        return lora.LoraConfig(rank=lc.rank, alpha=float(lc.alpha), targets=targets,
                               rank_stabilized=lc.rank_stabilized)
    except ValueError as e:
        raise ValueError(f"config.lora: {e}") from None


def trainable_of(config: ml_collections.ConfigDict, split: Callable, combine: Callable) -> Trainable:
    """Full training (the given split/combine), or LoRA when config.lora.rank > 0: float32 adapters applied in
    activation space (`lora.wrap`) to a frozen base, quantized first when config.lora.base_quantize is set."""
    from jaxgpt import lora

    lora_cfg = lora_config_of(config)
    if lora_cfg is None:
        return Trainable(split, combine)
    if split is not no_split or combine is not identity_combine:
        raise ValueError("config.lora.rank > 0 chooses split/combine itself; pass either LoRA settings or "
                         "split/combine, not both")
    seed, quantize_base = int(config.seed), base_quantizer(config)

    def lora_split(params: Params) -> tuple[Params, Params]:
        adapters = lora.init_lora(jax.random.PRNGKey(seed), params, lora_cfg, jnp.float32)
        return adapters, quantize_base(params)

    return Trainable(lora_split, lambda adapters, base: lora.wrap(base, adapters, lora_cfg), lora_cfg)


def base_quantizer(config: ml_collections.ConfigDict) -> Callable[[Params], Params]:
    """config.lora.base_quantize: "" keeps the base as loaded; "int8" / "int4" quantize its block kernels (QLoRA)."""
    from jaxgpt import quantize

    kind = config.lora.get("base_quantize", "") or ""
    if kind == "":
        return lambda params: params
    if kind not in ("int8", "int4"):
        raise ValueError(f"config.lora.base_quantize={kind!r} is not valid; use '', 'int8' or 'int4'")
    qcfg = quantize.QuantConfig(bits=int(kind[3:]))  # per output channel: fits every kernel shape
    return lambda params: quantize.quantize(params, qcfg)


def check_lora_export(cfg: GPTConfig, config: ml_collections.ConfigDict, trainable: Trainable) -> None:
    """Refuse before training, not after, a merged Hugging Face export of a model GPT-2 cannot hold."""
    if trainable.lora is None or not config.lora.export:
        return
    if not (cfg.pos_embedding == "learned" and cfg.norm == "layernorm" and cfg.norm_position == "pre" and cfg.bias):
        raise ValueError("config.lora.export=True needs a GPT-2 architecture (learned positions, pre-LN "
                         "LayerNorm, biases) for the Hugging Face export; set config.lora.export=False to "
                         "keep the adapters only")


# ---------------------------------------------------------------------------------------------------------
# Identity: a workdir holds one run; refuse to resume over another model


def lora_identity(config: ml_collections.ConfigDict, trainable: Trainable) -> dict[str, Any] | None:
    if trainable.lora is None:
        return None
    quantized = config.lora.get("base_quantize", "") or ""
    return {**trainable.lora.to_dict(), "init_from": config.init_from, "init_path": str(config.init_path),
            **({"base_quantize": quantized} if quantized else {})}


def check_identity(wd: Path, steps: list[int], cfg: GPTConfig, lora_now: dict[str, Any] | None) -> None:
    """With checkpoints in wd, the model config and the LoRA settings must be the saved ones."""
    if not steps:
        return
    cfg_file = wd / "config.json"
    saved = json.loads(cfg_file.read_text()) if cfg_file.is_file() else None
    diff = {k: (saved.get(k, v), v) for k, v in cfg.to_dict().items()  # fields older runs lack have defaults
            if k not in RUN_ONLY_FIELDS and saved.get(k, v) != v} if saved is not None else {}
    if diff:
        raise ValueError(f"{wd} holds a run of another model (saved, now: {diff}); resume with the same "
                         "config or use a new --workdir")
    lora_file = wd / LORA_RUN_FILE
    lora_saved = json.loads(lora_file.read_text()) if lora_file.is_file() else None
    if lora_saved != lora_now:
        raise ValueError(f"{wd} holds a run with LoRA settings {lora_saved} but config.lora gives {lora_now}; "
                         "resume with the same config.lora, init_from and init_path, or use a new --workdir")


def write_identity(wd: Path, cfg: GPTConfig, tok_meta: dict[str, Any], config: ml_collections.ConfigDict,
                   lora_now: dict[str, Any] | None) -> None:
    atomic.write_json(wd / "config.json", cfg.to_dict())
    atomic.write_json(wd / "tokenizer.json", tok_meta)
    atomic.write_json(wd / "train_config.json", json.loads(config.to_json_best_effort()))
    if lora_now is not None:
        atomic.write_json(wd / LORA_RUN_FILE, lora_now)


def open_checkpoints(config: ml_collections.ConfigDict, wd: Path, cfg: GPTConfig, lora_now: dict | None):
    """The run's orbax CheckpointManager and its complete steps, after the identity checks."""
    mngr = checkpoint.run_checkpoint_manager(wd, keep=config.keep_checkpoints, keep_best=config.keep_best,
                                             async_save=config.async_checkpointing)
    try:
        steps = sorted(mngr.all_steps())
        checkpoint.check_run_checkpoints(wd, steps)
        check_identity(wd, steps, cfg, lora_now)
    except Exception:
        mngr.close()
        raise
    return mngr, steps


# ---------------------------------------------------------------------------------------------------------
# The train state: fresh, or restored from the latest checkpoint


def initial_state(cfg: GPTConfig, params: Params | None, seed: int, tx: Any, trainable: Trainable,
                  resuming: bool) -> tuple[TrainState, Params]:
    """(state, frozen). Resuming a run from scratch needs only the state's structure (the checkpoint holds the
    values), so nothing is initialised; otherwise the params are split into trainable and frozen."""
    if params is None and resuming:
        abstract = jax.eval_shape(lambda: trainable.split(init_params(cfg, seed)))
        if not jax.tree.leaves(abstract[1]):
            return jax.eval_shape(lambda t: init_state(t, tx), abstract[0]), None
    trainable_params, frozen = trainable.split(init_params(cfg, seed) if params is None else params)
    return init_state(trainable_params, tx), frozen


def restore_state(mngr, wd: Path, step: int, state: TrainState, shardings: Any = None) -> TrainState:
    """The train state saved at `step` (its structure and dtypes from `state`), placed on `shardings` (a tree
    like `state`; default: the shardings of `state`'s arrays), so a run saved on one mesh resumes on another."""
    if shardings is not None:
        state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
    r = checkpoint.restore_run_step(mngr, step, params=state.params,
                                    optimizer={"step": state.step, "opt_state": state.opt_state})
    opt = r["optimizer"]
    restored = TrainState(step=jnp.asarray(opt["step"], jnp.int32), params=r["params"], opt_state=opt["opt_state"])
    if int(restored.step) != step:
        raise ValueError(f"checkpoint {wd / checkpoint.RUN_CKPT_DIR / str(step)} holds step {int(restored.step)}; "
                         "it is corrupt: move it aside to resume from an earlier step")
    return restored


# ---------------------------------------------------------------------------------------------------------
# What a run leaves at its end


def finish_lora(cfg: GPTConfig, base: Params, adapters: Params, lora_cfg: Any, config: ml_collections.ConfigDict,
                workdir: Path, main: bool = True) -> dict[str, Any]:
    """End of a LoRA run: the adapters alone to <workdir>/lora (jaxgpt.lora.load_adapters reads them) and,
    when config.lora.export, merge(base, adapters) as a Hugging Face GPT-2 directory (config.lora.export_dir,
    default <workdir>/hf; a quantized base is dequantized). Both are written atomically, replacing the previous
    ones. Sharded arrays are gathered from every process first, so a multi-host run exports too."""
    from jaxgpt import lora
    from jaxgpt.quantize import dequantize  # a QLoRA base: the export is float
    from jaxgpt.sharding import gather_to_host

    out: dict[str, Any] = {"lora_trainable": lora.lora_param_count(base, lora_cfg)["trainable"]}
    adapters = gather_to_host(adapters)
    merged = dequantize(lora.merge(gather_to_host(base), adapters, lora_cfg)) if config.lora.export else None
    if not main:
        return out
    out["adapters"] = str(lora.save_adapters(workdir / "lora", adapters, lora_cfg, force=True))
    if merged is not None:
        out["export"] = str(hf.export_hf_gpt2(cfg, merged, config.lora.export_dir or workdir / "hf"))
    return out


def sample_text(cfg: GPTConfig, params: Params, tok_meta: dict[str, Any], config: ml_collections.ConfigDict) -> str:
    """config.sample_tokens tokens after config.sample_prompt (default: a newline, or <|endoftext|> for BPE),
    by `jaxgpt.decode.generate` with the context sliding past block_size."""
    from jaxgpt.data.tokenizer import from_meta
    from jaxgpt.decode import generate

    tok = from_meta(tok_meta, config.data.bpe_path or None)
    prompt = config.sample_prompt
    if prompt:
        ids = tok.encode(prompt)
    elif tok.eot_id is not None:
        ids = [tok.eot_id]
    else:
        ids = tok.encode("\n") if "\n" in tok_meta.get("chars", "") else [0]
    return prompt + generate.sample_text(params, cfg, tok, ids, int(config.sample_tokens),
                                         temperature=float(config.temperature), top_k=int(config.top_k),
                                         seed=int(config.seed))
