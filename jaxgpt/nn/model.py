"""GPT-2 in Flax linen, with every architecture switch of `GPTConfig`.

Parameter names follow GPT-2 (wte, wpe, h_0 ... h_{L-1} with ln_1, attn.c_attn, attn.c_proj, ln_2,
mlp.c_fc, mlp.c_proj, then ln_f, and lm_head only when untied), so Hugging Face checkpoints map one to one.
Dense kernels are [in, out], exactly GPT-2's Conv1D layout. The modern switches add short names for new
roles: attn.c_q, attn.c_k, attn.c_v (fused_qkv=False), attn.q_norm, attn.k_norm (qk_norm: RMSNorm scales
[head_dim]) and mlp.c_gate (a gated MLP, whose c_fc is the up projection and c_proj the down one).

Shapes: B batch, T tokens, C n_embd, H query heads, Hkv key/value heads (n_kv_head; H = Hkv * G, query head h
reads kv head h // G), D head_dim, F the MLP width, V vocab_size.

The model knows nothing of LoRA or quantization: it multiplies weights through `jaxgpt.nn.weights` (`matmul`,
`embed`, `attend`), which hands any non-array weight leaf to that leaf's own method.
The KV cache is an argument and a return value: `apply(..., cache=c)` returns `(logits, new_cache)`.

Scale switches (they change memory and compile time, never the numbers): `config.remat` recomputes each
block's activations in the backward pass under a `jax.checkpoint` policy; `config.scan_layers` runs the blocks
as one `lax.scan` over their parameters stacked along a leading layer axis, so the block is traced and
compiled once, not n_layer times. The parameters stay in the unrolled layout (h_0 ... h_{L-1}) everywhere,
checkpoints and Hugging Face files included: the model stacks them inside the step (`jaxgpt.nn.stacking`), or
scans them as they come when they arrive stacked ({"h": [L, ...]}: a scanned run's train state).
Activations are pinned to the batch split of the device mesh (`jaxgpt.sharding.constrain_batch`).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgpt.nn import stacking
from jaxgpt.nn.config import GPTConfig
from jaxgpt.nn.dropout import dropout
from jaxgpt.nn.rope import apply_rope
from jaxgpt.nn.weights import attend, count_params, embed, is_array, matmul  # noqa: F401 (count_params re-exported)
from jaxgpt.sharding import constrain_batch


def _weight(module: nn.Module, name: str, init: Any, shape: tuple[int, ...], dtype: Any) -> Any:
    """A parameter; a non-array weight leaf (quantized, LoRA) is returned as it is, skipping flax's shape check."""
    if module.has_variable("params", name):
        w = module.get_variable("params", name)
        if not is_array(w):
            return w
    return module.param(name, init, shape, dtype)


# RMS of the sinusoidal codes as added to the embeddings: that of GPT-2's learned tables at init, N(0, 0.02).
# Unit-amplitude codes (Vaswani et al., whose embeddings are scaled up by sqrt(C) instead) would outweigh
# GPT-2-initialised token embeddings 35 to 1, and the model barely learns (see docs/design.md, positions).
SINUSOIDAL_RMS = 0.02


def sinusoidal_embedding(positions: jax.Array, dim: int, rms: float = 1.0 / math.sqrt(2.0)) -> jax.Array:
    """Fixed sin/cos position codes (Vaswani et al.) for integer positions [B, T] -> [B, T, dim] float32,
    scaled to root-mean-square `rms` (the default is the unscaled codes' own: amplitude 1)."""
    inv = 1.0 / (10000.0 ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))  # [dim/2]
    angles = positions.astype(jnp.float32)[..., None] * inv  # [B, T, dim/2]
    # interleave: even channels sin, odd channels cos
    codes = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(*positions.shape, dim)
    return codes * (rms * math.sqrt(2.0))


# ---------------------------------------------------------------------------------------------------------
# Modules


class Dense(nn.Module):
    """y = x @ kernel + bias, kernel [in, out] (GPT-2 Conv1D layout)."""

    features: int
    use_bias: bool
    dtype: Any
    param_dtype: Any
    std: float = 0.02

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = _weight(self, "kernel", nn.initializers.normal(self.std), (x.shape[-1], self.features),
                         self.param_dtype)
        y = matmul(x, kernel, self.dtype)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(self.dtype)
        return y


class Embed(nn.Module):
    """A table [num, features] read by id, and (tied head) multiplied by its transpose."""

    num: int
    features: int
    dtype: Any
    param_dtype: Any

    def setup(self) -> None:
        self.embedding = _weight(self, "embedding", nn.initializers.normal(0.02), (self.num, self.features),
                                 self.param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return embed(self.embedding, ids, self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        return attend(x, self.embedding, self.dtype)


def make_norm(model_cfg: GPTConfig, name: str) -> nn.Module:
    if model_cfg.norm == "rmsnorm":
        return nn.RMSNorm(epsilon=model_cfg.layer_norm_eps, dtype=model_cfg.compute_dtype,
                          param_dtype=model_cfg.params_dtype, name=name)
    return nn.LayerNorm(epsilon=model_cfg.layer_norm_eps, use_bias=model_cfg.bias, dtype=model_cfg.compute_dtype,
                        param_dtype=model_cfg.params_dtype, name=name)


# Query rows per block in the manual causal path: block i multiplies only the keys up to its last row, so
# at T = 256 the score and value GEMMs (and softmax, and dropout draws) do 3/4 of the full square's work.
ATTENTION_BLOCK = 128


def _softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, row0: int, full_shape: tuple,
                       dropout_rate: float, dropout_rng: jax.Array | None) -> jax.Array:
    """softmax(q k^T / sqrt(D), masked) v for q [B, H, t, D], k/v [B, Hkv, s, D] (rows row0.. of the full
    [B, H, T, S] scores).

    Grouped-query attention without repeating k and v: the G = H / Hkv query heads of one kv head are laid
    side by side as G * t rows ([B, Hkv, G * t, D], a free reshape), so both products stay single batched GEMMs.
    """
    B, H, t, D = q.shape
    Hkv, s = k.shape[1], k.shape[2]
    qg = q.reshape(B, Hkv, (H // Hkv) * t, D)  # [B, Hkv, G * t, D]
    scores = jnp.einsum("bhtd,bhsd->bhts", qg, k, preferred_element_type=jnp.float32)  # [B, Hkv, G * t, s]
    scores = scores.reshape(B, H, t, s)  # [B, H, t, s]
    scores = jnp.where(mask, scores / math.sqrt(D), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = dropout(probs, dropout_rate, dropout_rng, start=(0, 0, row0, 0), full_shape=full_shape)
    probs = probs.reshape(B, Hkv, (H // Hkv) * t, s).astype(v.dtype)  # [B, Hkv, G * t, s]
    return jnp.einsum("bhts,bhsd->bhtd", probs, v).reshape(B, H, t, D)  # [B, H, t, D]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, *,
                          impl: str = "xla", dropout_rate: float = 0.0,
                          dropout_rng: jax.Array | None = None) -> jax.Array:
    """Softmax attention. q [B, T, H, D], k/v [B, S, Hkv, D] (Hkv divides H: grouped-query attention),
    mask [B, 1, T, S] bool or None (causal).

    "manual" is einsum + float32 softmax and is the only path with attention dropout; causal (mask None) it
    runs in blocks of `ATTENTION_BLOCK` query rows that skip the keys after their last row. "xla" and "cudnn"
    call `jax.nn.dot_product_attention` with that implementation.
    """
    if impl == "manual" or (dropout_rate > 0.0 and dropout_rng is not None):
        B, T, H, _ = q.shape
        S = k.shape[1]
        # heads first ([B, H, T, D]): both products are then plain batched GEMMs (no transposed operands);
        # faster than the BTHD einsums on XLA:CPU (docs/benchmarks.md, "Tuning notes")
        q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))  # [B, H, T|S, D]
        full = (B, H, T, S)
        if mask is not None:
            y = _softmax_attention(q, k, v, mask, 0, full, dropout_rate, dropout_rng)
        else:
            blocks = []
            for r0 in range(0, T, ATTENTION_BLOCK):
                r1 = min(r0 + ATTENTION_BLOCK, T)
                causal = jnp.arange(r1)[None, :] <= jnp.arange(r0, r1)[:, None]  # [t, s]: key s <= query row
                blocks.append(_softmax_attention(q[:, :, r0:r1], k[:, :, :r1], v[:, :, :r1], causal, r0, full,
                                                 dropout_rate, dropout_rng))
            y = blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks, axis=2)
        return jnp.swapaxes(y, 1, 2)  # [B, T, H, D]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=mask is None, implementation=impl)


def _dropout(module: nn.Module, x: jax.Array, rate: float, deterministic: bool) -> jax.Array:
    """`jaxgpt.nn.dropout.dropout` with the module's "dropout" rng stream (what `nn.Dropout` would draw from)."""
    if deterministic or rate == 0.0:
        return x
    return dropout(x, rate, module.make_rng("dropout"))


def soft_cap(x: jax.Array, cap: float) -> jax.Array:
    """cap * tanh(x / cap): x for |x| << cap, smoothly bounded by +-cap (Gemma 2's logit soft-capping)."""
    return cap * jnp.tanh(x / cap)


def activation(kind: str, h: jax.Array) -> jax.Array:
    """The MLP's nonlinearity: tanh GELU (GPT-2's "gelu_new"; also GeGLU's gate), SiLU (SwiGLU's gate), ReLU^2."""
    if kind == "swiglu":
        return nn.silu(h)
    if kind == "relu2":
        return jnp.square(nn.relu(h))
    return nn.gelu(h, approximate=True)  # gelu, geglu


class CausalSelfAttention(nn.Module):
    config: GPTConfig

    def qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [B, T, C] -> q [B, T, H, D], k and v [B, T, Hkv, D]: one fused c_attn, or c_q, c_k and c_v."""
        cfg = self.config
        B, T, _ = x.shape
        H, Hkv, D = cfg.n_head, cfg.kv_heads, cfg.head_dim
        use_bias = cfg.bias or cfg.qkv_bias

        def dense(width: int, name: str) -> jax.Array:
            return Dense(width, use_bias, cfg.compute_dtype, cfg.params_dtype, name=name)(x)

        if cfg.fused_qkv:
            qkv = dense((H + 2 * Hkv) * D, "c_attn")  # [B, T, (H + 2 Hkv) D]: q, then k, then v
            q, k, v = jnp.split(qkv, [H * D, (H + Hkv) * D], axis=-1)
        else:
            q, k, v = dense(H * D, "c_q"), dense(Hkv * D, "c_k"), dense(Hkv * D, "c_v")
        return q.reshape(B, T, H, D), k.reshape(B, T, Hkv, D), v.reshape(B, T, Hkv, D)

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, layer_cache: Any,
                 deterministic: bool) -> tuple[jax.Array, Any]:
        cfg = self.config
        B, T, C = x.shape  # [B, T, C]
        q, k, v = self.qkv(x)  # [B, T, H, D], [B, T, Hkv, D], [B, T, Hkv, D]
        if cfg.qk_norm:  # each head's q and k to unit RMS (times a learned scale [D]), before the rotation
            q = nn.RMSNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
                           name="q_norm")(q)
            k = nn.RMSNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
                           name="k_norm")(k)
        if cfg.pos_embedding == "rope":
            q = apply_rope(q, positions, cfg.rope_theta, cfg.rope_scaling_params)
            k = apply_rope(k, positions, cfg.rope_theta, cfg.rope_scaling_params)
        q, k, v = constrain_batch(q), constrain_batch(k), constrain_batch(v)

        if layer_cache is None:
            mask = None  # plain causal over the T tokens
        else:
            layer_cache = layer_cache.write(k, v, positions[:, 0])
            k, v = layer_cache.read(cfg.compute_dtype)  # [B, S, Hkv, D]
            S = k.shape[1]
            # key j is visible to the query at position p iff j <= p; rows may sit at different offsets
            mask = jnp.arange(S)[None, None, None, :] <= positions[:, None, :, None]  # [B, 1, T, S]

        use_dropout = cfg.dropout > 0.0 and not deterministic
        y = dot_product_attention(
            q, k, v, mask, impl=cfg.attention, dropout_rate=cfg.dropout if use_dropout else 0.0,
            dropout_rng=self.make_rng("dropout") if use_dropout else None)  # [B, T, H, D]
        y = constrain_batch(y.reshape(B, T, cfg.n_head * cfg.head_dim))  # [B, T, H D]
        y = Dense(C, cfg.bias, cfg.compute_dtype, cfg.params_dtype, std=0.02 / math.sqrt(2 * cfg.n_layer),
                  name="c_proj")(y)  # [B, T, C]
        return _dropout(self, y, cfg.dropout, deterministic), layer_cache


class MLP(nn.Module):
    """GPT-2's act(x W_fc) W_proj (gelu, relu2), or a gated MLP (act(x W_gate) * (x W_fc)) W_proj (swiglu, geglu)."""

    config: GPTConfig

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.config
        F = cfg.mlp_width

        def dense(width: int, name: str, std: float = 0.02) -> Any:
            return Dense(width, cfg.bias, cfg.compute_dtype, cfg.params_dtype, std=std, name=name)

        h = dense(F, "c_fc")(x)  # [B, T, F]: GPT-2's c_fc; the up projection of a gated MLP
        if cfg.gated:
            h = activation(cfg.mlp, dense(F, "c_gate")(x)) * h  # [B, T, F]
        else:
            h = activation(cfg.mlp, h)  # [B, T, F]; GPT-2's tanh GELU ("gelu_new")
        h = constrain_batch(h)
        h = dense(cfg.n_embd, "c_proj", std=0.02 / math.sqrt(2 * cfg.n_layer))(h)  # [B, T, C]
        return _dropout(self, h, cfg.dropout, deterministic)


class Block(nn.Module):
    config: GPTConfig

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, layer_cache: Any,
                 deterministic: bool) -> tuple[jax.Array, Any]:
        cfg = self.config
        x = constrain_batch(x)  # [B, T, C]
        ln_1, ln_2 = make_norm(cfg, "ln_1"), make_norm(cfg, "ln_2")
        attn, mlp = CausalSelfAttention(cfg, name="attn"), MLP(cfg, name="mlp")
        if cfg.norm_position == "pre":  # GPT-2: x + f(LN(x))
            a, layer_cache = attn(ln_1(x), positions, layer_cache, deterministic)
            x = x + a
            x = x + mlp(ln_2(x), deterministic)
        else:  # original Transformer: LN(x + f(x))
            a, layer_cache = attn(x, positions, layer_cache, deterministic)
            x = ln_1(x + a)
            x = ln_2(x + mlp(x, deterministic))
        return constrain_batch(x), layer_cache


REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each block's input
    "dots_saveable": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs, recompute the rest
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # not scores
}


def block_class(model_cfg: GPTConfig) -> Any:
    """Block, under `nn.remat` with `model_cfg.remat`'s policy unless it is "none"."""
    if model_cfg.remat == "none":
        return Block
    return nn.remat(Block, policy=REMAT_POLICIES[model_cfg.remat], static_argnums=(4,))  # 4: deterministic


def scan_blocks(model_cfg: GPTConfig, blocks: Any, x: jax.Array, positions: jax.Array, layers: Any,
                deterministic: bool, dropout_rng: jax.Array | None) -> tuple[jax.Array, Any]:
    """Run the blocks as one lax.scan over their stacked params `blocks` (leading axis n_layer).

    layers: the per-layer caches stacked the same way, or None. Layer i draws its dropout masks from
    fold_in(dropout_rng, i). Returns (x, new stacked caches).
    """
    block = Block(model_cfg, parent=None)

    def body(x: jax.Array, inp: tuple) -> tuple[jax.Array, Any]:
        i, params, layer_cache = inp
        rngs = {} if dropout_rng is None else {"dropout": jax.random.fold_in(dropout_rng, i)}
        return block.apply({"params": params}, x, positions, layer_cache, deterministic, rngs=rngs)

    if model_cfg.remat != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[model_cfg.remat], prevent_cse=False)
    return jax.lax.scan(body, x, (jnp.arange(model_cfg.n_layer), blocks, layers))


class GPT(nn.Module):
    """tokens [B, T] -> logits [B, T, V] (float32); with a cache, (logits, new cache)."""

    config: GPTConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, cache: Any = None,
                 deterministic: bool = True, logits_at: jax.Array | None = None) -> Any:
        cfg = self.config
        B, T = tokens.shape
        if positions is None:
            positions = jnp.arange(T, dtype=jnp.int32)[None, :]
            if cache is not None:
                positions = positions + cache.lengths[:, None]
            elif cfg.pos_embedding == "learned" and T > cfg.block_size:
                raise ValueError(f"sequence length {T} exceeds block_size {cfg.block_size} (learned positions); "
                                 "crop the input or raise block_size")
        positions = jnp.broadcast_to(positions, (B, T)).astype(jnp.int32)  # [B, T]

        wte = Embed(cfg.vocab_size, cfg.n_embd, cfg.compute_dtype, cfg.params_dtype, name="wte")
        x = wte(tokens)  # [B, T, C]
        if cfg.pos_embedding == "learned":
            x = x + Embed(cfg.block_size, cfg.n_embd, cfg.compute_dtype, cfg.params_dtype, name="wpe")(positions)
        elif cfg.pos_embedding == "sinusoidal":
            x = x + sinusoidal_embedding(positions, cfg.n_embd, SINUSOIDAL_RMS).astype(cfg.compute_dtype)
        x = constrain_batch(_dropout(self, x, cfg.dropout, deterministic))  # [B, T, C]
        x, new_layers = self.blocks(x, positions, cache, deterministic)

        if logits_at is not None:  # [B] -> logits [B, V]; [B, K] -> [B, K, V]: the head reads only these rows
            at = jnp.asarray(logits_at, jnp.int32).reshape(B, -1)  # [B, K]
            x = jnp.take_along_axis(x, at[:, :, None], axis=1)  # [B, K, C]
        if cfg.norm_position == "pre":
            x = make_norm(cfg, "ln_f")(x)
        if cfg.tie_embeddings:
            logits = wte.attend(x)
        else:
            logits = Dense(cfg.vocab_size, False, cfg.compute_dtype, cfg.params_dtype, name="lm_head")(x)
        logits = logits.astype(jnp.float32)  # [B, T, V]
        if cfg.logit_softcap:
            logits = soft_cap(logits, cfg.logit_softcap)
        logits = constrain_batch(logits)  # [B, T, V]
        if logits_at is not None and jnp.ndim(logits_at) == 1:
            logits = logits[:, 0]  # [B, V]
        if cache is None:
            return logits
        return logits, cache.replace(layers=tuple(new_layers), lengths=positions[:, -1] + 1)


    def blocks(self, x: jax.Array, positions: jax.Array, cache: Any, deterministic: bool) -> tuple[jax.Array, Any]:
        """The n_layer blocks h_0 ... h_{L-1}: unrolled, or one scan over their stacked params."""
        cfg = self.config
        params = self.variables.get("params", {})
        blocks = [params.get(f"h_{i}") for i in range(cfg.n_layer)]
        stacked = params.get(stacking.STACKED)  # params held stacked already (a scanned run's train state)
        if stacked is None and cfg.scan_layers and not self.is_initializing() and stacking.same_structure(blocks):
            stacked = stacking.stack(blocks)
        if stacked is not None:
            stacked_cache = None if cache is None else stacking.stack(cache.layers)
            dropout_rng = None if deterministic or cfg.dropout == 0.0 else self.make_rng("dropout")
            x, stacked_cache = scan_blocks(cfg, stacked, x, positions, stacked_cache, deterministic, dropout_rng)
            return x, None if cache is None else stacking.unstack(stacked_cache, cfg.n_layer)
        new_layers = []  # unrolled (and always at init, so both layouts start from the same numbers)
        for i in range(cfg.n_layer):
            layer_cache = None if cache is None else cache.layers[i]
            x, layer_cache = block_class(cfg)(cfg, name=f"h_{i}")(x, positions, layer_cache, deterministic)
            new_layers.append(layer_cache)
        return x, tuple(new_layers)


def init_params(model_cfg: GPTConfig, rng: jax.Array | int = 0) -> Any:
    """Freshly initialised parameters (GPT-2's init: N(0, 0.02), residual projections scaled by 1/sqrt(2L))."""
    if isinstance(rng, int):
        rng = jax.random.PRNGKey(rng)
    tokens = jnp.zeros((1, min(8, model_cfg.block_size)), jnp.int32)
    return jax.jit(lambda r: GPT(model_cfg).init(r, tokens)["params"])(rng)
