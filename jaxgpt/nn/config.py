"""GPTConfig: one frozen, validated dataclass that holds every architecture switch.

Each switch is one of the choices that separate GPT-2 from later LLMs:
positions (learned | sinusoidal | rope | none), norm (layernorm | rmsnorm), norm placement (pre | post),
weight tying, biases, dropout and dtypes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

POS_EMBEDDINGS = ("learned", "sinusoidal", "rope", "none")
NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("xla", "cudnn", "manual")
REMATS = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Every architecture switch of the model. Defaults are GPT-2 124M."""

    vocab_size: int = 50257
    block_size: int = 1024  # maximum context length (learned positions have this many rows)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers and LayerNorm, as GPT-2
    pos_embedding: str = "learned"  # learned | sinusoidal | rope | none
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_position: str = "pre"  # pre (GPT-2) | post (original Transformer: x = LN(x + f(x)))
    tie_embeddings: bool = True  # lm_head shares wte
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-5
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # storage dtype of the parameters (master weights)
    attention: str = "xla"  # xla | cudnn (GPU) | manual (einsum + softmax, supports attention dropout)
    # How the step runs, not what it computes (the numbers are the same; see jaxgpt/nn/model.py):
    remat: str = "none"  # none | full | dots_saveable | dots_with_no_batch_dims_saveable (jax.checkpoint policy)
    scan_layers: bool = False  # the blocks as one lax.scan over stacked params: compile once, not n_layer times

    def __post_init__(self) -> None:
        def choice(field: str, allowed: tuple[str, ...]) -> None:
            value = getattr(self, field)
            if value not in allowed:
                raise ValueError(f"GPTConfig.{field}={value!r} is not valid; use one of {', '.join(allowed)}")

        def positive(field: str) -> None:
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPTConfig.{field}={value!r} is not valid; use a positive integer")

        for f in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            positive(f)
        choice("pos_embedding", POS_EMBEDDINGS)
        choice("norm", NORMS)
        choice("norm_position", NORM_POSITIONS)
        choice("dtype", DTYPES)
        choice("param_dtype", DTYPES)
        choice("attention", ATTENTION_IMPLS)
        choice("remat", REMATS)
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPTConfig.n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                "pick n_embd as a multiple of n_head"
            )
        if self.pos_embedding == "rope" and self.head_dim % 2:
            raise ValueError(f"GPTConfig: rope needs an even head_dim, got n_embd/n_head={self.head_dim}")
        if self.pos_embedding == "sinusoidal" and self.n_embd % 2:
            raise ValueError(f"GPTConfig: sinusoidal positions need an even n_embd, got {self.n_embd}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"GPTConfig.dropout={self.dropout!r} is not valid; use a value in [0, 1)")
        if not float(self.layer_norm_eps) > 0:
            raise ValueError(f"GPTConfig.layer_norm_eps={self.layer_norm_eps!r} is not valid; use a value > 0")
        if not float(self.rope_theta) > 0:
            raise ValueError(f"GPTConfig.rope_theta={self.rope_theta!r} is not valid; use a value > 0")
        for f in ("bias", "tie_embeddings", "scan_layers"):
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"GPTConfig.{f}={getattr(self, f)!r} is not valid; use True or False")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def compute_dtype(self) -> Any:
        import jax.numpy as jnp  # here, not at the top: configs/*.py read GPTConfig without loading JAX

        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self) -> Any:
        import jax.numpy as jnp

        return jnp.dtype(self.param_dtype)

    def replace(self, **changes: Any) -> "GPTConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GPTConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"GPTConfig: unknown fields {unknown}; known fields are {sorted(names)}")
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "GPTConfig":
        """A named shape ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "tiny", "nano") plus overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; use one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    # OpenAI's GPT-2 shapes.
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    # Small shapes for tests and CPU experiments.
    "tiny": dict(vocab_size=97, block_size=32, n_layer=2, n_head=2, n_embd=16),
    "nano": dict(vocab_size=256, block_size=64, n_layer=4, n_head=4, n_embd=64),
}


def param_count(model_cfg: GPTConfig) -> dict[str, int]:
    """Parameter counts computed from `model_cfg` alone, by part.

    Keys: token_embedding, positions, blocks, final_norm, head, total, tying_saves
    (tying_saves is what an untied head would add: vocab_size x n_embd; it is not part of total).
    """
    c, v = model_cfg.n_embd, model_cfg.vocab_size
    b = 1 if model_cfg.bias else 0

    def norm_params() -> int:
        if model_cfg.norm == "rmsnorm":
            return c
        return c + b * c

    per_block = (
        2 * norm_params()
        + (c * 3 * c + b * 3 * c)  # attn.c_attn
        + (c * c + b * c)  # attn.c_proj
        + (c * 4 * c + b * 4 * c)  # mlp.c_fc
        + (4 * c * c + b * c)  # mlp.c_proj
    )
    counts = {
        "token_embedding": v * c,
        "positions": model_cfg.block_size * c if model_cfg.pos_embedding == "learned" else 0,
        "blocks": model_cfg.n_layer * per_block,
        "final_norm": norm_params() if model_cfg.norm_position == "pre" else 0,
        "head": 0 if model_cfg.tie_embeddings else v * c,
    }
    counts["total"] = sum(counts.values())
    counts["tying_saves"] = v * c
    return counts
