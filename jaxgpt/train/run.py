"""A run: `open_run(train_cfg, workdir)` reads the training config once into typed parts and returns a frozen
`Run` holding everything the loop needs: its workdir, data, model config, what is trained (full or LoRA), the
train program, the (restored) train state on the mesh, and the checkpoint manager. `finish_lora` and
`sample_text` are what a run leaves at its end. Each file of the workdir is named by `jaxgpt.io.workdir.Workdir`.
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
import numpy as np

from jaxgpt.data import memmap, preparation, streaming
from jaxgpt.data.batches import TrainBatches, place_fn
from jaxgpt.data.shard_loader import is_shard_dir
from jaxgpt.io import checkpoint, hf, paths
from jaxgpt.io.workdir import Workdir
from jaxgpt.nn import weights
from jaxgpt.nn.config import GPTConfig
from jaxgpt.nn.model import init_params
from jaxgpt.train import config as train_config
from jaxgpt.train import metrics
from jaxgpt.train.config import DataConfig, LoopConfig, LoraSettings, StartConfig
from jaxgpt.train.program import Trainable, TrainProgram, build_program
from jaxgpt.train.steps import TrainState, identity_combine, init_state, no_split

Params = Any
# what config.model may change on a loaded model when fine-tuning
# how the step runs, not what it computes: a run may resume with other values
RUN_ONLY_FIELDS = ("remat", "scan_layers")
FINETUNE_OVERRIDES = ("dropout", "dtype", "param_dtype", "attention", "block_size", "remat", "scan_layers")


# ---------------------------------------------------------------------------------------------------------
# Data and model config


def ensure_data(data_cfg: DataConfig, wd: Workdir) -> Path:
    """The prepared dataset directory (data.dir, or the workdir's data/ when it is empty: a local folder even for
    a bucket workdir, `Workdir.data`), tokenizing data.dataset into it when it is missing (a directory of llm.c
    shards is used as it is)."""
    if paths.is_url(data_cfg.dir):
        raise ValueError(f"config.data.dir={data_cfg.dir} is a bucket, but the dataset is read from a local disk "
                         "(memory-mapped): copy it to a local folder and pass that, or leave config.data.dir empty")
    d = Path(data_cfg.dir) if data_cfg.dir else Path(wd.data)
    streaming.check_finished(d)  # an interrupted `python -m jaxgpt.data` leaves an incomplete manifest
    if not (d / "meta.json").is_file() and not is_shard_dir(d):
        preparation.prepare(d, dataset=data_cfg.dataset, tokenizer=data_cfg.tokenizer,
                            input_path=data_cfg.input or None, bpe_path=data_cfg.bpe_path or None,
                            val_fraction=float(data_cfg.val_fraction))
    return d


def data_meta(data_dir: Path) -> dict[str, Any]:
    """meta.json of a prepared directory; llm.c / modded-nanogpt shards made elsewhere have none and hold GPT-2
    BPE tokens."""
    if not (data_dir / "meta.json").is_file() and is_shard_dir(data_dir):
        return {"kind": "gpt2", "vocab_size": 50257}
    return memmap.load_meta(data_dir)


def apply_precision(model_cfg: GPTConfig, mixed_precision: bool) -> GPTConfig:
    """config.mixed_precision: bfloat16 compute with float32 master weights."""
    if mixed_precision:
        return model_cfg.replace(dtype="bfloat16", param_dtype="float32")
    return model_cfg


def model_config(model: dict[str, Any], mixed_precision: bool, vocab_size: int | None = None) -> GPTConfig:
    """GPTConfig from config.model's fields (vocab_size 0 means "from the data", else GPT-2's 50257 when no data
    is known), with the mixed-precision switch."""
    fields = dict(model)
    if not fields.get("vocab_size"):
        fields["vocab_size"] = vocab_size or 50257
    return apply_precision(GPTConfig.from_dict(fields), mixed_precision)


# ---------------------------------------------------------------------------------------------------------
# Starting point: from scratch, a Hugging Face GPT-2, or a jaxgpt run


class Initial(NamedTuple):
    model_cfg: GPTConfig
    params: Params | None  # None: from scratch, init_params(model_cfg, seed)
    tokenizer: dict[str, Any]


def initial_model(start: StartConfig, model: dict[str, Any], data_meta: dict[str, Any]) -> Initial:
    """Model config, starting params and tokenizer meta: from scratch, a Hugging Face dir (GPT-2, Llama, Qwen2,
    Qwen3), or a jaxgpt run."""
    from jaxgpt.data.tokenizer import hf_tokenizer
    from jaxgpt.io import hf_families

    src = start.init_from
    if src == "scratch":
        model_cfg = model_config(model, start.mixed_precision, data_meta["vocab_size"])
        tok = {k: v for k, v in data_meta.items() if k in ("kind", "chars", "vocab_size")}
        return Initial(model_cfg, None, tok)  # initialised by `open_run` unless a checkpoint supplies the values
    if src not in ("hf", "run"):
        raise ValueError(f"config.init_from={src!r} is not valid; use 'scratch', 'hf' or 'run'")
    if not start.init_path:
        raise ValueError(f"config.init_from={src!r} needs config.init_path (a directory or a model name)")
    if src == "hf":  # GPT-2, Llama, Qwen2 or Qwen3 (config.json's model_type); the latter with their tokenizer.json
        folder = hf.model_dir(start.init_path)  # a Hub name is downloaded here, once
        model_cfg, params = hf.load_hf(folder)
        tok = (hf_tokenizer(folder).meta() if hf_families.is_family_dir(folder)
               else {"kind": "gpt2", "vocab_size": 50257})
    else:
        model_cfg, params, tok = Workdir(start.init_path).load(start.init_which)
    if data_meta.get("kind") != tok.get("kind") or data_meta.get("chars") != tok.get("chars"):
        raise ValueError(f"the training data uses the {data_meta.get('kind')!r} tokenizer but {start.init_path} "
                         f"was trained with {tok.get('kind')!r} (or another char vocabulary); prepare the data "
                         "with the model's tokenizer")
    model_cfg, params = override_model(model_cfg, params, model, start.mixed_precision)
    return Initial(model_cfg, params, tok)


def _is_unset(v: Any) -> bool:
    """0, "" and None in config.model mean "keep the loaded value" (False is a setting, not unset)."""
    return v is None or (isinstance(v, str) and v == "") or (type(v) in (int, float) and v == 0)


def override_model(model_cfg: GPTConfig, params: Params, model: dict[str, Any],
                   mixed_precision: bool) -> tuple[GPTConfig, Params]:
    """Fine-tuning changes to a loaded model: dropout, dtypes, attention, remat, scan, a smaller block_size."""
    # dropout is always a setting: 0.0 turns it off
    changes = {k: v for k, v in model.items()
               if (k == "dropout" or not _is_unset(v)) and v != getattr(model_cfg, k, None)}
    bad = sorted(set(changes) - set(FINETUNE_OVERRIDES))
    if bad:
        raise ValueError(f"config.model sets {', '.join(f'{k}={changes[k]!r}' for k in bad)}, which the loaded "
                         f"model fixes ({', '.join(f'{k}={getattr(model_cfg, k, None)!r}' for k in bad)}); when "
                         f"fine-tuning, config.model may set only {list(FINETUNE_OVERRIDES)}")
    if changes.get("block_size", 0) > model_cfg.block_size:
        raise ValueError(f"config.model.block_size={changes['block_size']} exceeds the loaded model's "
                         f"{model_cfg.block_size}; use at most {model_cfg.block_size}")
    model_cfg = apply_precision(model_cfg.replace(**changes), mixed_precision)
    if "block_size" in changes and "wpe" in params:
        params = {**params, "wpe": {"embedding": params["wpe"]["embedding"][: model_cfg.block_size]}}
    params = jax.tree.map(lambda p: jnp.asarray(p, model_cfg.params_dtype), params)
    return model_cfg, params


# ---------------------------------------------------------------------------------------------------------
# What is trained: everything, or LoRA adapters on a frozen base


def lora_config_of(lora_cfg: LoraSettings, init_from: str):
    """The jaxgpt.lora.LoraConfig of config.lora, or None when config.lora.rank is 0 (LoRA off)."""
    from jaxgpt import lora

    if lora_cfg.rank == 0:
        return None
    if init_from == "scratch":
        raise ValueError("config.lora.rank > 0 fine-tunes a loaded model, but config.init_from='scratch'; set "
                         "config.init_from to 'hf' or 'run' (and config.init_path), or config.lora.rank=0")
    try:
        return lora.LoraConfig(rank=lora_cfg.rank, alpha=float(lora_cfg.alpha), targets=lora_cfg.targets,
                               rank_stabilized=lora_cfg.rank_stabilized)
    except ValueError as e:
        raise ValueError(f"config.lora: {e}") from None


def trainable_of(lora_cfg: LoraSettings, init_from: str, seed: int, split: Callable = no_split,
                 combine: Callable = identity_combine) -> Trainable:
    """Full training (the given split/combine), or LoRA when config.lora.rank > 0: float32 adapters applied in
    activation space (`lora.wrap`) to a frozen base, quantized first when config.lora.base_quantize is set."""
    from jaxgpt import lora

    adapters_cfg = lora_config_of(lora_cfg, init_from)
    if adapters_cfg is None:
        return Trainable(split, combine)
    if split is not no_split or combine is not identity_combine:
        raise ValueError("config.lora.rank > 0 chooses split/combine itself; pass either LoRA settings or "
                         "split/combine, not both")
    quantize_base = base_quantizer(lora_cfg.base_quantize)

    def lora_split(params: Params) -> tuple[Params, Params]:
        adapters = lora.init_lora(jax.random.PRNGKey(seed), params, adapters_cfg, jnp.float32)
        return adapters, quantize_base(params)

    return Trainable(lora_split, lambda adapters, base: lora.wrap(base, adapters, adapters_cfg), adapters_cfg)


def base_quantizer(kind: str) -> Callable[[Params], Params]:
    """config.lora.base_quantize: "" keeps the base as loaded; "int8" / "int4" quantize its block kernels (QLoRA)."""
    from jaxgpt import quantize

    if kind == "":
        return lambda params: params
    if kind not in ("int8", "int4"):
        raise ValueError(f"config.lora.base_quantize={kind!r} is not valid; use '', 'int8' or 'int4'")
    qcfg = quantize.QuantConfig(bits=int(kind[3:]))  # per output channel: fits every kernel shape
    return lambda params: quantize.quantize(params, qcfg)


def check_lora_export(model_cfg: GPTConfig, lora_cfg: LoraSettings, trainable: Trainable) -> None:
    """Refuse before training, not after, a merged Hugging Face export of a model no supported family (GPT-2,
    Llama, Qwen2, Qwen3: `hf.export_hf`) can hold."""
    from jaxgpt.io import hf_families

    if trainable.lora is None or not lora_cfg.export:
        return
    c = model_cfg
    if c.pos_embedding == "learned" and c.norm == "layernorm":  # export_hf writes GPT-2
        if not (c.norm_position == "pre" and c.bias):
            raise ValueError("config.lora.export=True needs a GPT-2 architecture (learned positions, pre-LN "
                             "LayerNorm, biases) for the Hugging Face export; set config.lora.export=False to "
                             "keep the adapters only")
        return
    try:
        hf_families.family_of(c)
    except ValueError as e:
        raise ValueError(f"config.lora.export=True: {e}; set config.lora.export=False to keep the adapters "
                         "only") from None


# ---------------------------------------------------------------------------------------------------------
# Identity: a workdir holds one run; refuse to resume over another model


def lora_identity(lora_cfg: LoraSettings, start: StartConfig, trainable: Trainable) -> dict[str, Any] | None:
    if trainable.lora is None:
        return None
    quantized = lora_cfg.base_quantize
    return {**trainable.lora.to_dict(), "init_from": start.init_from, "init_path": str(start.init_path),
            **({"base_quantize": quantized} if quantized else {})}


def check_identity(wd: Workdir, steps: list[int], model_cfg: GPTConfig, lora_now: dict[str, Any] | None,
                   optimizer: str = "adamw") -> None:
    """With checkpoints in wd, the model config, the LoRA settings and the optimizer must be the saved ones."""
    if not steps:
        return
    saved = wd.read_model_config()
    diff = {k: (saved.get(k, v), v) for k, v in model_cfg.to_dict().items()  # fields older runs lack have defaults
            if k not in RUN_ONLY_FIELDS and saved.get(k, v) != v} if saved is not None else {}
    if diff:
        raise ValueError(f"{wd} holds a run of another model (saved, now: {diff}); resume with the same "
                         "config or use a new --workdir")
    lora_saved = wd.read_lora_run()
    if lora_saved != lora_now:
        raise ValueError(f"{wd} holds a run with LoRA settings {lora_saved} but config.lora gives {lora_now}; "
                         "resume with the same config.lora, init_from and init_path, or use a new --workdir")
    saved_optimizer = (json.loads(wd.train_config.read_text()).get("optimizer", "adamw")  # older runs: AdamW
                       if wd.train_config.is_file() else optimizer)
    if saved_optimizer != optimizer:  # another optimizer state: it cannot be restored
        raise ValueError(f"{wd} holds a run trained with config.optimizer={saved_optimizer!r}, not {optimizer!r}; "
                         f"resume it with --config.optimizer={saved_optimizer}, or start a new --workdir from it "
                         "(init_from='run', init_path=that workdir)")


def open_checkpoints(loop: LoopConfig, wd: Workdir, model_cfg: GPTConfig, lora_now: dict | None,
                     optimizer: str = "adamw"):
    """The run's orbax CheckpointManager and its complete steps, after the identity checks."""
    mngr = checkpoint.run_checkpoint_manager(wd.checkpoints, keep=loop.keep_checkpoints, keep_best=loop.keep_best,
                                             async_save=loop.async_checkpointing)
    try:
        steps = sorted(mngr.all_steps())
        checkpoint.check_run_checkpoints(wd.checkpoints, steps)
        check_identity(wd, steps, model_cfg, lora_now, optimizer)
    except Exception:
        mngr.close()
        raise
    return mngr, steps


# ---------------------------------------------------------------------------------------------------------
# The train state: fresh, or restored from the latest checkpoint


def initial_state(model_cfg: GPTConfig, params: Params | None, seed: int, tx: Any, trainable: Trainable,
                  resuming: bool) -> tuple[TrainState, Params]:
    """(state, frozen). Resuming a run from scratch needs only the state's structure (the checkpoint holds the
    values), so nothing is initialised; otherwise the params are split into trainable and frozen."""
    if params is None and resuming:
        abstract = jax.eval_shape(lambda: trainable.split(init_params(model_cfg, seed)))
        if not jax.tree.leaves(abstract[1]):
            return jax.eval_shape(lambda t: init_state(t, tx), abstract[0]), None
    trainable_params, frozen = trainable.split(init_params(model_cfg, seed) if params is None else params)
    return init_state(trainable_params, tx), frozen


def restore_state(mngr, wd: Workdir, step: int, state: TrainState, shardings: Any = None) -> TrainState:
    """The train state saved at `step` (its structure and dtypes from `state`), placed on `shardings` (a tree
    like `state`; default: the shardings of `state`'s arrays), so a run saved on one mesh resumes on another."""
    if shardings is not None:
        state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
    r = checkpoint.restore_run_step(mngr, step, params=state.params,
                                    optimizer={"step": state.step, "opt_state": state.opt_state})
    opt = r["optimizer"]
    restored = TrainState(step=jnp.asarray(opt["step"], jnp.int32), params=r["params"], opt_state=opt["opt_state"])
    if int(restored.step) != step:
        raise ValueError(f"checkpoint {wd.checkpoint(step)} holds step {int(restored.step)}; "
                         "it is corrupt: move it aside to resume from an earlier step")
    return restored


# ---------------------------------------------------------------------------------------------------------
# The run: everything the loop needs, built once


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run, opened (`open_run`): read by the loop, never changed. `state` is the starting train
    state (restored when `resumed`), placed on the program's shardings in the loop's layout."""

    parts: train_config.Parts
    workdir: Workdir
    data_dir: Path
    model_cfg: GPTConfig
    tok_meta: dict[str, Any]
    trainable: Trainable
    program: TrainProgram
    state: TrainState
    frozen: Params
    start: int
    resumed: bool
    mngr: Any  # the orbax CheckpointManager of workdir.checkpoints
    data: TrainBatches
    dropout_rng: jax.Array
    meta: dict[str, Any]  # saved beside each checkpoint
    unrolled: Callable  # state in the loop's layout -> the saved (unrolled) layout

    @property
    def tokens_per_step(self) -> int:
        return int(np.prod(self.program.batch_shape))

    @property
    def flops_per_token(self) -> float:
        c = self.model_cfg
        n_params = weights.count_params((self.state.params, self.frozen))
        n_params -= c.block_size * c.n_embd if c.pos_embedding == "learned" else 0
        attn_width = c.n_head * c.head_dim  # the scores' and values' width (n_embd for GPT-2)
        return metrics.flops_per_token(c.n_layer, c.block_size, attn_width, n_params)


def open_run(train_cfg: ml_collections.ConfigDict, workdir: str | os.PathLike | Workdir, *, main: bool = True,
             tx: Any = None, split: Callable = no_split, combine: Callable = identity_combine,
             shardings_fn: Callable | None = None) -> Run:
    """Read `train_cfg` once and open the run in `workdir`: data (prepared if missing), model, what is trained,
    identity files (written by the `main` process), the train program and the starting state (see `train`)."""
    p = train_config.parts(train_cfg)
    wd = workdir if isinstance(workdir, Workdir) else Workdir(workdir)
    trainable = trainable_of(p.lora, p.start.init_from, p.loop.seed, split, combine)
    data_dir = ensure_data(p.data, wd)
    meta = data_meta(data_dir)
    init = initial_model(p.start, p.model, meta)
    model_cfg = init.model_cfg
    if meta["vocab_size"] > model_cfg.vocab_size:
        raise ValueError(f"the data has {meta['vocab_size']} token ids but the model only "
                         f"{model_cfg.vocab_size}; set config.model.vocab_size >= {meta['vocab_size']} (or 0)")
    check_lora_export(model_cfg, p.lora, trainable)
    program = build_program(model_cfg, p.optim, p.mesh, grad_accum=p.loop.grad_accum, batch_rows=p.loop.batch_size,
                            tx=tx, trainable=trainable, shardings_fn=shardings_fn)
    lora_now = lora_identity(p.lora, p.start, trainable)
    mngr, ckpt_steps = open_checkpoints(p.loop, wd, model_cfg, lora_now, p.optim.optimizer)
    tok_meta = init.tokenizer
    try:
        if main:
            wd.write_identity(model_cfg, tok_meta, json.loads(train_cfg.to_json_best_effort()), lora_now)
        state, frozen = _starting_state(program, mngr, wd, init, p.loop.seed, trainable, ckpt_steps)
        del init
        data = TrainBatches(data_dir, seed=p.loop.seed, accum=p.loop.grad_accum, batch=p.loop.batch_size,
                            block=model_cfg.block_size, eval_iters=p.loop.eval_iters,
                            batch_sharding=program.shardings.batch if program.shardings else None,
                            vocab_size=model_cfg.vocab_size)
    except Exception:
        mngr.close()
        raise
    return Run(parts=p, workdir=wd, data_dir=data_dir, model_cfg=model_cfg, tok_meta=tok_meta, trainable=trainable,
               program=program, state=state, frozen=frozen, start=ckpt_steps[-1] if ckpt_steps else 0,
               resumed=bool(ckpt_steps), mngr=mngr, data=data,
               dropout_rng=jax.random.fold_in(jax.random.PRNGKey(p.loop.seed), 1),
               meta={"model": model_cfg.to_dict(), "tokenizer": tok_meta, "seed": p.loop.seed,
                     "data_dir": str(data_dir)},
               unrolled=_unrolled(program))


def _starting_state(program: TrainProgram, mngr: Any, wd: Workdir, init: Initial, seed: int, trainable: Trainable,
                    ckpt_steps: list[int]) -> tuple[TrainState, Params]:
    """(state, frozen) on the program's shardings in the loop's layout: fresh, or the latest checkpoint's
    (restored straight onto this run's mesh, whatever mesh saved it)."""
    state, frozen = initial_state(program.model_cfg, init.params, seed, program.tx, trainable, bool(ckpt_steps))
    saved = program.saved_shardings
    if ckpt_steps:
        state = restore_state(mngr, wd, ckpt_steps[-1], state, saved.state if saved else None)
    place = place_fn(saved.state if saved else None)
    state = place(state, saved.state) if saved else place(state)
    frozen = place(frozen, saved.frozen) if saved and frozen is not None else frozen
    if program.layout.stacked:
        out = program.shardings.state if program.shardings else None
        state = jax.jit(program.layout.inward, out_shardings=out)(state)
    return state, frozen


def _unrolled(program: TrainProgram) -> Callable:
    """The jitted `unrolled(state)` that checkpoints and the end-of-run sample and exports read (identity when
    nothing is stacked)."""
    if not program.layout.stacked:
        return lambda st: st
    saved = program.saved_shardings
    return jax.jit(program.layout.outward, out_shardings=saved.state if saved else None)


# ---------------------------------------------------------------------------------------------------------
# What a run leaves at its end


def finish_lora(run: Run, state: TrainState, main: bool = True) -> dict[str, Any]:
    """End of a LoRA run: the adapters alone to the workdir's lora/ (jaxgpt.lora.load_adapters reads them) and,
    when config.lora.export, merge(base, adapters) as a Hugging Face GPT-2 directory (config.lora.export_dir,
    default the workdir's hf/; a quantized base is dequantized). Both are written atomically, replacing the
    previous ones. Sharded arrays are gathered from every process first, so a multi-host run exports too."""
    from jaxgpt import lora
    from jaxgpt.quantize import dequantize  # a QLoRA base: the export is float
    from jaxgpt.sharding import gather_to_host

    lora_cfg, export = run.trainable.lora, run.parts.lora.export
    out: dict[str, Any] = {"lora_trainable": lora.lora_param_count(run.frozen, lora_cfg)["trainable"]}
    adapters = gather_to_host(state.params)
    merged = dequantize(lora.merge(gather_to_host(run.frozen), adapters, lora_cfg)) if export else None
    if not main:
        return out
    out["adapters"] = str(lora.save_adapters(run.workdir.adapters, adapters, lora_cfg, force=True))
    if merged is not None:
        export_dir = run.parts.lora.export_dir or run.workdir.hf_export
        out["export"] = str(hf.export_hf(run.model_cfg, merged, export_dir))
    return out


def sample_text(run: Run, params: Params) -> str:
    """config.sample_tokens tokens after config.sample_prompt (default: a newline, or <|endoftext|> for BPE),
    by `jaxgpt.decode.sample_text` with the context sliding past block_size."""
    from jaxgpt.data.tokenizer import from_meta
    from jaxgpt.decode import DecodeOptions
    from jaxgpt.decode import sample_text as decode_text

    sample, tok_meta = run.parts.sample, run.tok_meta
    tok = from_meta(tok_meta, run.parts.data.bpe_path or None)
    prompt = sample.sample_prompt
    if prompt:
        ids = tok.encode(prompt)
    elif tok.eot_id is not None:
        ids = [tok.eot_id]
    else:
        ids = tok.encode("\n") if "\n" in tok_meta.get("chars", "") else [0]
    options = DecodeOptions(temperature=sample.temperature, top_k=sample.top_k or None, seed=run.parts.loop.seed)
    return prompt + decode_text(params, run.model_cfg, tok, ids, sample.sample_tokens, options)
