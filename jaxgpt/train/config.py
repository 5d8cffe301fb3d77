"""The training config: every setting with its default, and the checks that give bad settings one-line errors.

`configs/*.py` start from `base_config()` and change a few fields; this module imports no JAX, so reading a
config file is instant. Field names follow nanoGPT's train.py where it has one.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from typing import Any, TypeVar

import ml_collections

from jaxgpt.nn.config import GPTConfig

COMPILATION_CACHE_DIR = "~/.cache/jaxgpt/xla"
COMPILATION_CACHE_MIN_SECS = 0.5  # JAX's own default is 1 s; 0.5 s also catches the eval step of small models


def base_config() -> ml_collections.ConfigDict:
    """Every training setting with its default (nanoGPT's names); configs/*.py start here and change a few."""
    train_cfg = ml_collections.ConfigDict()

    # model: GPTConfig fields; vocab_size 0 takes the vocabulary size of the data
    train_cfg.model = ml_collections.ConfigDict(GPTConfig().to_dict())
    train_cfg.model.vocab_size = 0
    train_cfg.mixed_precision = False  # True: bfloat16 compute, float32 master weights

    # starting point: "scratch", "hf" (a Hugging Face GPT-2 directory or Hub name) or "run" (a jaxgpt workdir)
    train_cfg.init_from = "scratch"
    train_cfg.init_path = ""
    train_cfg.init_which = "latest"  # for init_from="run": "latest", "best" or a step number

    train_cfg.lora = lora_config()
    train_cfg.mesh = mesh_config()
    train_cfg.data = data_config()

    # optimisation (nanoGPT's names and defaults)
    train_cfg.seed = 1337
    train_cfg.batch_size = 12  # micro-batch
    train_cfg.grad_accum = 1  # micro-batches per step
    train_cfg.max_iters = 2000
    train_cfg.learning_rate = 1e-3
    train_cfg.decay_lr = True
    train_cfg.warmup_iters = 100
    train_cfg.lr_decay_iters = 2000
    train_cfg.min_lr = 1e-4
    train_cfg.weight_decay = 0.1
    train_cfg.beta1 = 0.9
    train_cfg.beta2 = 0.99
    train_cfg.eps = 1e-8
    train_cfg.grad_clip = 1.0  # 0 disables clipping
    # "adamw", or "muon": Muon (optax.contrib's update: Nesterov momentum, then 5 Newton-Schulz steps) on the 2-D
    # hidden matrices of the blocks, AdamW (the settings above) on embeddings, head, norms and biases
    # (jaxgpt.train.steps.make_optimizer). Muon's learning rate follows the same warmup + cosine, scaled by
    # muon_lr / learning_rate
    train_cfg.optimizer = "adamw"
    train_cfg.muon_lr = 0.02
    train_cfg.muon_momentum = 0.95
    train_cfg.muon_weight_decay = 0.0

    # evaluation, logging, checkpoints
    train_cfg.eval_interval = 250
    train_cfg.eval_iters = 20
    train_cfg.eval_at_start = False
    train_cfg.eval_hellaswag_every = 0  # > 0: HellaSwag accuracy beside val loss every N steps (jaxgpt.eval.hellaswag)
    train_cfg.hellaswag_path = ""  # the validation jsonl; empty: downloaded once (online) to the cache
    train_cfg.hellaswag_limit = 0  # > 0: the first N examples only (a faster, noisier estimate)
    train_cfg.log_interval = 10
    train_cfg.tensorboard = True  # TensorBoard event files in <workdir>/tensorboard beside metrics.jsonl
    train_cfg.wandb = ml_collections.ConfigDict(dict(project="", entity="", name=""))  # W&B when project is set
    train_cfg.profile_steps = ()  # (first, last): a jax.profiler trace of those steps in <workdir>/profile
    train_cfg.ckpt_interval = 250
    train_cfg.keep_checkpoints = 3  # the last k; the best by val loss is kept as well when keep_best
    train_cfg.keep_best = True
    train_cfg.async_checkpointing = False
    train_cfg.progress = True
    # keep freed host memory in the process (jaxgpt.train.host_memory): XLA:CPU's per-step buffers stop
    # page-faulting; the process keeps its peak host memory until exit
    train_cfg.retain_host_memory = True
    # JAX's persistent compilation cache (jaxgpt.train.compilation_cache), set by train.py: a rerun, resume or new seed
    # of the same shapes loads its compiled steps instead of compiling them ('' = off). On by default on
    # accelerators; on CPU only with compilation_cache_on_cpu (some hosts reject XLA:CPU's cached executables)
    train_cfg.compilation_cache_dir = COMPILATION_CACHE_DIR
    train_cfg.compilation_cache_min_secs = COMPILATION_CACHE_MIN_SECS
    train_cfg.compilation_cache_on_cpu = False

    # the sample written at the end (jaxgpt.decode.sample_text; the context slides past block_size)
    train_cfg.sample_tokens = 500
    train_cfg.sample_prompt = ""
    train_cfg.temperature = 0.8
    train_cfg.top_k = 200
    return train_cfg


def lora_config() -> ml_collections.ConfigDict:
    """LoRA fine-tuning of a loaded model (rank 0 = off): only the adapters are trained and checkpointed; at the
    end the adapters are saved to <workdir>/lora and merged into a Hugging Face export (<workdir>/hf)."""
    c = ml_collections.ConfigDict()
    c.rank = 0
    c.alpha = 16.0
    c.targets = ("attn/c_attn",)  # path patterns (jaxgpt.lora), e.g. ("attn/c_attn/q", "attn/c_attn/v")
    c.rank_stabilized = False  # True: RsLoRA scale alpha / sqrt(r) instead of alpha / r
    c.base_quantize = ""  # "int8" | "int4": quantize the frozen base's block kernels (QLoRA); "" keeps it as loaded
    c.export = True  # merged Hugging Face GPT-2 export at the end (GPT-2 architectures only)
    c.export_dir = ""  # empty: <workdir>/hf
    return c


def mesh_config() -> ml_collections.ConfigDict:
    """The device mesh (jaxgpt.sharding): data * fsdp = the device count (-1: all the rest); the batch rows are
    split over every device, parameters with >= min_shard_size elements over "fsdp"."""
    return ml_collections.ConfigDict(dict(data=-1, fsdp=1, min_shard_size=2**14))


def data_config() -> ml_collections.ConfigDict:
    """A prepared data directory: train.bin / val.bin (+ meta.json) of a small corpus, or llm.c token shards
    (python -m jaxgpt.data --dataset files|hf). An empty dir means <workdir>/data, prepared from `dataset`."""
    c = ml_collections.ConfigDict()
    c.dataset = "pydoc"  # pydoc (built in) | shakespeare (downloaded, or data.input) | text (data.input)
    c.tokenizer = "char"  # char | gpt2
    c.input = ""  # local text file (offline copy of a named dataset)
    c.bpe_path = ""  # local gpt2.tiktoken for offline GPT-2 BPE ($JAXGPT_GPT2_BPE also works)
    c.dir = ""
    c.val_fraction = 0.1
    return c


def validate(train_cfg: ml_collections.ConfigDict) -> None:
    """One-line errors for training settings that cannot work."""
    for name in ("batch_size", "grad_accum", "max_iters", "eval_interval", "eval_iters", "log_interval",
                 "ckpt_interval", "keep_checkpoints"):
        v = train_cfg[name]
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"config.{name}={v!r} is not valid; use a positive integer")
    if not float(train_cfg.learning_rate) > 0:
        raise ValueError(f"config.learning_rate={train_cfg.learning_rate} is not valid; use a value > 0")
    if not 0.0 <= float(train_cfg.beta1) < 1.0 or not 0.0 <= float(train_cfg.beta2) < 1.0:
        raise ValueError(f"config.beta1={train_cfg.beta1} / beta2={train_cfg.beta2} are not valid; "
                         "use values in [0, 1)")
    validate_optimizer(train_cfg)
    profile = tuple(train_cfg.profile_steps or ())
    if profile and (len(profile) != 2 or not 0 <= profile[0] <= profile[1]):
        raise ValueError(f"config.profile_steps={profile} is not valid; use (first, last) steps, e.g. (10, 12)")


OPTIMIZERS = ("adamw", "muon")


def validate_optimizer(train_cfg: ml_collections.ConfigDict) -> None:
    """One-line errors for the optimizer's settings: its name, Muon's values, and Muon with nothing to act on."""
    name = train_cfg.optimizer
    if name not in OPTIMIZERS:
        raise ValueError(f"config.optimizer={name!r} is not valid; use one of {', '.join(OPTIMIZERS)}")
    if name != "muon":
        return
    if not float(train_cfg.muon_lr) > 0:
        raise ValueError(f"config.muon_lr={train_cfg.muon_lr} is not valid; use a value > 0")
    if not 0.0 <= float(train_cfg.muon_momentum) < 1.0:
        raise ValueError(f"config.muon_momentum={train_cfg.muon_momentum} is not valid; use a value in [0, 1)")
    if not float(train_cfg.muon_weight_decay) >= 0:
        raise ValueError(f"config.muon_weight_decay={train_cfg.muon_weight_decay} is not valid; use a value >= 0")
    if int(train_cfg.lora.rank) > 0:
        raise ValueError("config.optimizer='muon' has no 2-D hidden matrix to act on in a LoRA run (only the "
                         "adapters are trained); use config.optimizer='adamw' with config.lora.rank > 0")


# ---------------------------------------------------------------------------------------------------------
# Typed parts: the ConfigDict is read once, at the entry (`parts`), into frozen parts that each component takes.
# Their defaults are base_config's.

P = TypeVar("P", bound="_Part")


class _Part:
    """A frozen part whose field names are config keys."""

    @classmethod
    def of(cls: type[P], cfg_dict: ml_collections.ConfigDict) -> P:
        return cls(**{f.name: cfg_dict[f.name] for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class OptimConfig(_Part):
    """AdamW (or Muon on the hidden matrices) and nanoGPT's warmup + cosine schedule
    (`jaxgpt.train.steps.make_optimizer`)."""

    learning_rate: float
    decay_lr: bool
    warmup_iters: int
    lr_decay_iters: int
    min_lr: float
    weight_decay: float
    beta1: float
    beta2: float
    eps: float
    grad_clip: float
    optimizer: str = "adamw"  # "adamw" | "muon"
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0


@dataclasses.dataclass(frozen=True)
class MeshConfig(_Part):
    """data * fsdp devices (-1: all the rest); parameters of >= min_shard_size elements split over "fsdp"."""

    data: int
    fsdp: int
    min_shard_size: int


@dataclasses.dataclass(frozen=True)
class DataConfig(_Part):
    """Where the tokens come from (`data_config`)."""

    dataset: str
    tokenizer: str
    input: str
    bpe_path: str
    dir: str
    val_fraction: float


@dataclasses.dataclass(frozen=True)
class LoopConfig(_Part):
    """The loop's shape: batches, steps, and when it logs, evaluates and saves."""

    seed: int
    batch_size: int
    grad_accum: int
    max_iters: int
    eval_interval: int
    eval_iters: int
    eval_at_start: bool
    log_interval: int
    ckpt_interval: int
    keep_checkpoints: int
    keep_best: bool
    async_checkpointing: bool
    progress: bool
    profile_steps: tuple
    eval_hellaswag_every: int
    hellaswag_path: str
    hellaswag_limit: int


@dataclasses.dataclass(frozen=True)
class SampleConfig(_Part):
    """The sample drawn at the end of a run."""

    sample_tokens: int
    sample_prompt: str
    temperature: float
    top_k: int


@dataclasses.dataclass(frozen=True)
class StartConfig(_Part):
    """The starting point: "scratch", "hf" (a Hugging Face GPT-2) or "run" (a jaxgpt workdir), and precision."""

    init_from: str
    init_path: str
    init_which: str
    mixed_precision: bool


@dataclasses.dataclass(frozen=True)
class LoraSettings(_Part):
    """config.lora (rank 0: full training)."""

    rank: int
    alpha: float
    targets: tuple
    rank_stabilized: bool
    base_quantize: str
    export: bool
    export_dir: str


@dataclasses.dataclass(frozen=True)
class Parts:
    """The training config read once into typed parts. `model` holds config.model's GPTConfig fields as a dict:
    some stay unset (0, "") until the data or the loaded model fixes them."""

    start: StartConfig
    model: dict
    lora: LoraSettings
    loop: LoopConfig
    optim: OptimConfig
    mesh: MeshConfig
    data: DataConfig
    sample: SampleConfig


def parts(train_cfg: ml_collections.ConfigDict) -> Parts:
    """The typed parts of a training config, validated (`validate`)."""
    validate(train_cfg)
    loop = dataclasses.replace(LoopConfig.of(train_cfg), profile_steps=tuple(train_cfg.profile_steps or ()))
    lc = train_cfg.lora
    lora = dataclasses.replace(LoraSettings.of(lc), targets=(lc.targets,) if isinstance(lc.targets, str)
                               else tuple(lc.targets))
    return Parts(start=StartConfig.of(train_cfg), model=train_cfg.model.to_dict(), lora=lora, loop=loop, optim=OptimConfig.of(train_cfg), mesh=MeshConfig.of(train_cfg.mesh),
                 data=DataConfig.of(train_cfg.data), sample=SampleConfig.of(train_cfg))


def config_keys(cfg_dict: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a (nested) ConfigDict: ["model.n_layer", "lora.rank", ...]."""
    keys = []
    for k, v in cfg_dict.items():
        keys.append(prefix + k)
        if isinstance(v, ml_collections.ConfigDict):
            keys.extend(config_keys(v, prefix + k + "."))
    return keys


def check_override_keys(train_cfg: ml_collections.ConfigDict, argv: list[str], flag: str = "config") -> None:
    """Refuse `--config.<key>=...` overrides of keys the config does not have, naming the nearest known ones."""
    known = config_keys(train_cfg)
    for arg in argv:
        if not arg.startswith(f"--{flag}."):
            continue
        key = arg[len(flag) + 3:].split("=", 1)[0]
        if key not in known:
            near = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(near)}?" if near else "see jaxgpt/train/config.py for the keys"
            raise ValueError(f"--{flag}.{key}: the config has no key {key!r}; {hint}")


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """`get_config()` of a config file, as `--config=path.py[:arg]` names it."""
    import importlib.util

    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_jaxgpt_config", path)
    if module_spec is None or not os.path.isfile(path):
        raise ValueError(f"--config={spec}: {path} is not a config file; pass a path such as configs/default.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def check_override_keys_in_argv(argv: list[str], default_config: str) -> None:
    """`check_override_keys` for a command line, loading the config file it names (or the default)."""
    if not any(a.startswith("--config.") for a in argv):
        return
    spec = default_config
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            spec = a.split("=", 1)[1]
        elif a == "--config" and i + 1 < len(argv):
            spec = argv[i + 1]
    check_override_keys(load_config_file(spec), argv)
