"""GPTConfig: one frozen, validated dataclass that holds every architecture switch.

Each switch is one of the choices that separate GPT-2 from later LLMs:
positions (learned | sinusoidal | rope | none), norm (layernorm | rmsnorm), norm placement (pre | post),
weight tying, biases, dropout and dtypes; and the modern block: the MLP kind (gelu | swiglu | geglu | relu2)
and width, grouped-query attention (n_kv_head), the head width (head_size), QK-norm, logit soft-capping,
separate q/k/v projections (fused_qkv=False) and q/k/v biases (qkv_bias). Every one of them is off by default,
so the defaults are GPT-2 exactly; 0 means "the default" for the integer and float switches, which keeps them
JSON- and command-line-friendly (--config.model.n_kv_head=2). `GPTConfig.preset("gpt2", style="llama")`
(or "qwen3") turns on a whole modern recipe at a GPT-2 shape.
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
ROPE_SCALINGS = ("none", "llama3")
MLPS = ("gelu", "swiglu", "geglu", "relu2")
GATED_MLPS = ("swiglu", "geglu")  # three matrices: c_gate, c_fc (up), c_proj (down)
STYLES = ("gpt2", "llama", "qwen3")


def llama_mlp_hidden(n_embd: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """Llama's gated-MLP width: int(2 * 4C / 3), times ffn_dim_multiplier, rounded up to a multiple of multiple_of
    (it keeps a SwiGLU MLP's three matrices at about the parameters of GPT-2's two [C, 4C] ones)."""
    hidden = int(2 * 4 * n_embd / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def largest_divisor_at_most(n: int, limit: int) -> int:
    """The largest divisor of n that is <= limit (at least 1)."""
    return max(d for d in range(1, max(1, min(n, limit)) + 1) if n % d == 0)


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
    # Llama 3.1+'s rope frequency scaling ("none" | "llama3"): wavelengths longer than original_context /
    # low_freq_factor are divided by rope_factor, shorter than original_context / high_freq_factor kept, smoothed
    # between (jaxgpt.nn.rope.inverse_frequencies)
    rope_scaling: str = "none"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 0
    layer_norm_eps: float = 1e-5
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # storage dtype of the parameters (master weights)
    attention: str = "xla"  # xla | cudnn (GPU) | manual (einsum + softmax, supports attention dropout)
    # How the step runs, not what it computes (the numbers are the same; see jaxgpt/nn/model.py):
    remat: str = "none"  # none | full | dots_saveable | dots_with_no_batch_dims_saveable (jax.checkpoint policy)
    scan_layers: bool = False  # the blocks as one lax.scan over stacked params: compile once, not n_layer times
    # The modern block (each off by default: GPT-2 exactly; see docs/design.md):
    mlp: str = "gelu"  # gelu (GPT-2: tanh GELU, 2 matrices) | swiglu | geglu (gated, 3 matrices) | relu2 (ReLU^2)
    mlp_hidden: int = 0  # MLP hidden width; 0 means 4 * n_embd (llama_mlp_hidden gives Llama's rounding)
    n_kv_head: int = 0  # key/value heads (grouped-query attention; 1 is multi-query); 0 means n_head
    head_size: int = 0  # per-head width; 0 means n_embd // n_head (q is [C, n_head * head_dim])
    qk_norm: bool = False  # RMSNorm over head_dim on each head's q and k, before RoPE (Qwen3, modded-nanogpt)
    logit_softcap: float = 0.0  # 0 means off; else logits = cap * tanh(logits / cap) (Gemma 2)
    fused_qkv: bool = True  # one attn/c_attn Dense (GPT-2); False: attn/c_q, attn/c_k, attn/c_v
    qkv_bias: bool = False  # biases on the q/k/v projections even when bias is False (Qwen2)

    def __post_init__(self) -> None:
        def choice(field: str, allowed: tuple[str, ...]) -> None:
            value = getattr(self, field)
            if value not in allowed:
                raise ValueError(f"GPTConfig.{field}={value!r} is not valid; use one of {', '.join(allowed)}")

        def positive(field: str, zero_ok: bool = False) -> None:
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0 or (value == 0 and not zero_ok):
                fix = "a positive integer, or 0 for the default" if zero_ok else "a positive integer"
                raise ValueError(f"GPTConfig.{field}={value!r} is not valid; use {fix}")

        for f in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            positive(f)
        for f in ("mlp_hidden", "n_kv_head", "head_size"):
            positive(f, zero_ok=True)
        choice("pos_embedding", POS_EMBEDDINGS)
        choice("norm", NORMS)
        choice("norm_position", NORM_POSITIONS)
        choice("dtype", DTYPES)
        choice("param_dtype", DTYPES)
        choice("attention", ATTENTION_IMPLS)
        choice("remat", REMATS)
        choice("mlp", MLPS)
        if self.n_embd % self.n_head and not self.head_size:
            raise ValueError(
                f"GPTConfig.n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                "pick n_embd as a multiple of n_head, or set head_size"
            )
        if self.n_head % self.kv_heads:
            raise ValueError(f"GPTConfig.n_kv_head={self.n_kv_head} does not divide n_head={self.n_head}; use a "
                             f"divisor of n_head (1 .. {self.n_head}), or 0 for n_head")
        if self.pos_embedding == "rope" and self.head_dim % 2:
            raise ValueError(f"GPTConfig: rope needs an even head_dim, got head_dim={self.head_dim}; "
                             "pick an even head_size (or n_embd / n_head)")
        if self.pos_embedding == "sinusoidal" and self.n_embd % 2:
            raise ValueError(f"GPTConfig: sinusoidal positions need an even n_embd, got {self.n_embd}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"GPTConfig.dropout={self.dropout!r} is not valid; use a value in [0, 1)")
        if not float(self.layer_norm_eps) > 0:
            raise ValueError(f"GPTConfig.layer_norm_eps={self.layer_norm_eps!r} is not valid; use a value > 0")
        if not float(self.rope_theta) > 0:
            raise ValueError(f"GPTConfig.rope_theta={self.rope_theta!r} is not valid; use a value > 0")
        choice("rope_scaling", ROPE_SCALINGS)
        if self.rope_scaling == "llama3" and not (
                float(self.rope_factor) >= 1.0 and 0 < float(self.rope_low_freq_factor)
                < float(self.rope_high_freq_factor) and int(self.rope_original_context) > 0):
            raise ValueError("GPTConfig: rope_scaling='llama3' needs rope_factor >= 1, 0 < rope_low_freq_factor < "
                             "rope_high_freq_factor and rope_original_context > 0 (Llama 3.2: 32, 1, 4, 8192)")
        cap = self.logit_softcap
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not 0.0 <= cap < float("inf"):
            raise ValueError(f"GPTConfig.logit_softcap={cap!r} is not valid; use a cap > 0 (e.g. 30.0), or 0 for off")
        for f in ("bias", "tie_embeddings", "scan_layers", "qk_norm", "fused_qkv", "qkv_bias"):
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"GPTConfig.{f}={getattr(self, f)!r} is not valid; use True or False")

    @property
    def rope_scaling_params(self) -> tuple[float, float, float, int] | None:
        """(factor, low_freq_factor, high_freq_factor, original_context) of llama3 scaling, or None."""
        if self.rope_scaling == "none":
            return None
        return (float(self.rope_factor), float(self.rope_low_freq_factor), float(self.rope_high_freq_factor),
                int(self.rope_original_context))

    @property
    def head_dim(self) -> int:
        """Per-head width D: head_size, or n_embd // n_head when it is 0."""
        return self.head_size or self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """Key/value heads Hkv: n_kv_head, or n_head when it is 0."""
        return self.n_kv_head or self.n_head

    @property
    def mlp_width(self) -> int:
        """MLP hidden width: mlp_hidden, or 4 * n_embd when it is 0."""
        return self.mlp_hidden or 4 * self.n_embd

    @property
    def gated(self) -> bool:
        """Whether the MLP has a gate matrix (swiglu, geglu)."""
        return self.mlp in GATED_MLPS

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
    def preset(cls, name: str, style: str = "gpt2", **overrides: Any) -> "GPTConfig":
        """A named shape ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "tiny", "nano") in a block style,
        plus overrides.

        style "gpt2" is GPT-2's block; "llama" (and "qwen3") keep the shape and switch the block to
        `style_fields`: RoPE, RMSNorm, no biases, SwiGLU at Llama's width, n_head / 4 kv heads, an untied
        head, separate q/k/v; "qwen3" adds QK-norm and rope_theta 1e6. The names "llama-style" and
        "qwen3-style" are GPT-2 124M's shape in those styles.
        """
        if name in NAMED_STYLES:
            name, style = NAMED_STYLES[name]
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; use one of {', '.join([*PRESETS, *NAMED_STYLES])}")
        shape = {**PRESETS[name], **overrides}
        return cls(**{**shape, **style_fields(style, shape["n_embd"], shape["n_head"]), **overrides})


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
NAMED_STYLES = {"llama-style": ("gpt2", "llama"), "qwen3-style": ("gpt2", "qwen3")}


def style_fields(style: str, n_embd: int, n_head: int) -> dict[str, Any]:
    """The GPTConfig fields of a block style at width n_embd with n_head heads (see GPTConfig.preset)."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; use one of {', '.join(STYLES)}")
    if style == "gpt2":
        return {}
    fields = {"pos_embedding": "rope", "norm": "rmsnorm", "bias": False, "tie_embeddings": False, "mlp": "swiglu",
              "mlp_hidden": llama_mlp_hidden(n_embd, multiple_of=min(256, n_embd)),
              "n_kv_head": largest_divisor_at_most(n_head, max(1, n_head // 4)), "fused_qkv": False}
    if style == "qwen3":
        fields.update(qk_norm=True, rope_theta=1e6)
    return fields


def param_count(model_cfg: GPTConfig) -> dict[str, int]:
    """Parameter counts computed from `model_cfg` alone, by part.

    Keys: token_embedding, positions, blocks, final_norm, head, total, tying_saves
    (tying_saves is what an untied head would add: vocab_size x n_embd; it is not part of total).
    """
    c, v = model_cfg.n_embd, model_cfg.vocab_size
    b = 1 if model_cfg.bias else 0
    qkv_b = 1 if model_cfg.bias or model_cfg.qkv_bias else 0
    q, kv, f = model_cfg.n_head * model_cfg.head_dim, model_cfg.kv_heads * model_cfg.head_dim, model_cfg.mlp_width

    def norm_params() -> int:
        if model_cfg.norm == "rmsnorm":
            return c
        return c + b * c

    per_block = (
        2 * norm_params()
        + (c + qkv_b) * (q + 2 * kv)  # attn.c_attn, or attn.c_q, c_k, c_v
        + (2 * model_cfg.head_dim if model_cfg.qk_norm else 0)  # attn.q_norm, attn.k_norm
        + (q * c + b * c)  # attn.c_proj
        + (c * f + b * f) * (2 if model_cfg.gated else 1)  # mlp.c_fc (and mlp.c_gate)
        + (f * c + b * c)  # mlp.c_proj
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
