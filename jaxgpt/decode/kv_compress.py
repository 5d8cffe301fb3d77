"""Compressed KV-cache layer entries: int8, TurboQuant and a plain uniform baseline.

Each entry is a flax.struct pytree with the two methods `kv_cache.KVCache` asks of a layer:
  write(k, v, starts) -> new entry    k, v: [B, T, H, D] new keys/values, starts: [B] int32 row offsets
  read(dtype) -> (k, v)               dense [B, S, H, D], decoded from the compressed buffers
(H here is the model's key/value heads, `GPTConfig.kv_heads`: a grouped-query model caches fewer heads)
so `GPT.apply(..., cache=new_cache(kind, ...))` compresses every write (prefill and decode) and
decodes on every read, with no change to the model. Buffers never change shape, so a lax.scan decode
loop compiles once. What is stored per (token, head) vector of D values:

- int8: D int8 values and one float16 scale = absmax/127 (8 + 16/D bits per value).
- turbo{b} (b = 1..4): TurboQuant_mse for keys and values: packed b-bit indices and one float16 norm
  (b + 16/D bits per value). Keys use TurboQuant_mse rather than TurboQuant_prod by default: `read()`
  must return dense keys, so the only gain of prod is an unbiased <q, k> in expectation over S, while at
  equal bits its error variance is about pi/2 * D_mse(b-1) / D_mse(b) = 5x larger (b = 3) than the MSE
  quantizer's, whose bias is only a uniform shrink of the scores by ~D_mse (3.4% at 3 bits).
- turbo{b}-prod: keys with TurboQuant_prod ((b-1)-bit MSE + 1-bit QJL signs + two float16 norms:
  b + 32/D bits per value), values with TurboQuant_mse as above.
- turbo{b}.5 (1.5, 2.5, 3.5): the paper's mixed precision by an outlier-channel split. Per row and head,
  the D/2 channels with the largest energy (sum of squares over the row's own tokens of its first write,
  the prefill, i.e. the write with start 0; right-padding excluded, see `set_prompt_lengths`) get b+1 bits
  and the other D/2 channels b bits, each half quantized by its own TurboQuant instance (its own rotation,
  codebook and norm). Indices average exactly b + 0.5 bits; with two float16 norms the true rate is
  b + 0.5 + 32/D bits per value (b + 1.0 at GPT-2's D = 64), plus the channel order (D int32 per row and
  head, not per token).
- uniform{b}, uniform{b}.5: the plain per-coordinate uniform quantizer, no rotation: 2^b levels evenly
  spaced on [-m, m] with m the vector's absmax stored as float16 (b + 16/D bits per value, the same
  budget as turbo{b}); mixed settings use the same channel split.

Norms and scales are float16 (clipped to its largest finite value, 65504): rounding changes a vector's
scale by at most 2^-11 (< 3e-7 in relative squared error, far below any quantization error here).
Rotations, QJL matrices and the channel order are part of the pytree and are counted by `KVCache.nbytes`.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.decode import turboquant as tq
from jaxgpt.decode.cache_kinds import DENSE, CacheKind, parse_kind
from jaxgpt.decode.kv_cache import KVCache, write_rows
from jaxgpt.nn.config import GPTConfig

SIDE_DTYPE = jnp.float16  # norms and scales
_SIDE_MAX = float(jnp.finfo(SIDE_DTYPE).max)
ALL_OWN = np.iinfo(np.int32).max  # CodedTensor.own when a write holds no padding


def _side(x: jax.Array) -> jax.Array:
    """Norms/scales to their stored dtype."""
    return jnp.minimum(x, _SIDE_MAX).astype(SIDE_DTYPE)


# ---------------------------------------------------------------------------------------------------------
# int8, per (token, head) absmax


def int8_quantize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [..., D] -> (int8 [..., D] in [-127, 127], float16 scale [...]) with x ~ q * scale."""
    x = x.astype(jnp.float32)
    scale = _side(jnp.max(jnp.abs(x), axis=-1) / 127.0)  # [...]
    s = scale.astype(jnp.float32)[..., None]
    q = jnp.where(s > 0, jnp.round(x / jnp.where(s > 0, s, 1.0)), 0.0)
    return jnp.clip(q, -127, 127).astype(jnp.int8), scale


@flax.struct.dataclass
class Int8LayerKV:
    """int8 keys and values [B, S, H, D] with a float16 scale per (token, head) [B, S, H]."""

    k: jax.Array
    v: jax.Array
    k_scale: jax.Array
    v_scale: jax.Array

    def write(self, k: jax.Array, v: jax.Array, starts: jax.Array) -> "Int8LayerKV":
        (qk, sk), (qv, sv) = int8_quantize(k), int8_quantize(v)
        return Int8LayerKV(k=write_rows(self.k, qk, starts), v=write_rows(self.v, qv, starts),
                           k_scale=write_rows(self.k_scale, sk, starts),
                           v_scale=write_rows(self.v_scale, sv, starts))

    def read(self, dtype: Any) -> tuple[jax.Array, jax.Array]:
        k = self.k.astype(jnp.float32) * self.k_scale.astype(jnp.float32)[..., None]
        v = self.v.astype(jnp.float32) * self.v_scale.astype(jnp.float32)[..., None]
        return k.astype(dtype), v.astype(dtype)


# ---------------------------------------------------------------------------------------------------------
# The uniform baseline codec (no rotation)


@flax.struct.dataclass
class UniformCodec:
    """Per-coordinate uniform quantizer: 2^bits levels evenly spaced on [-m, m], m = absmax of the vector."""

    d: int = flax.struct.field(pytree_node=False)
    bits: int = flax.struct.field(pytree_node=False)

    def quantize(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [..., d] -> (codes uint8 [..., packed_size(d, bits)], absmax [...])."""
        x = x.astype(jnp.float32)
        m = jnp.max(jnp.abs(x), axis=-1)  # [...]
        top = 2**self.bits - 1
        t = x / jnp.where(m > 0, m, 1.0)[..., None]  # in [-1, 1]
        idx = jnp.clip(jnp.round((t + 1.0) * (top / 2)), 0, top).astype(jnp.uint8)
        return tq.pack_bits(idx, self.bits), m

    def dequantize(self, codes: jax.Array, m: jax.Array) -> jax.Array:
        top = 2**self.bits - 1
        idx = tq.unpack_bits(codes, self.bits, self.d).astype(jnp.float32)
        return (idx * (2.0 / top) - 1.0) * m[..., None].astype(jnp.float32)


# ---------------------------------------------------------------------------------------------------------
# Coded tensors: keys or values of one layer, split into channel parts, one codec per part


@flax.struct.dataclass
class PartCode:
    """Buffers of one channel part, [B, S, H, ...]."""

    codes: jax.Array  # uint8 [B, S, H, bytes] packed indices (MSE or uniform levels)
    norms: jax.Array  # float16 [B, S, H] vector norm (TurboQuant) or absmax (uniform)
    signs: jax.Array | None = None  # uint8 [B, S, H, d/8] QJL signs (TurboQuant_prod only)
    rnorms: jax.Array | None = None  # float16 [B, S, H] residual norm (TurboQuant_prod only)


Codec = Any  # tq.MSECodec | tq.ProdCodec | UniformCodec


def _codec_dim(codec: Codec) -> int:
    return codec.d


def _encode(codec: Codec, x: jax.Array) -> PartCode:
    if isinstance(codec, tq.ProdCodec):
        c = codec.quantize(x)
        return PartCode(c.codes, _side(c.norms), c.signs, _side(c.rnorms))
    codes, norms = codec.quantize(x)
    return PartCode(codes, _side(norms))


def _decode(codec: Codec, part: PartCode) -> jax.Array:
    if isinstance(codec, tq.ProdCodec):
        return codec.dequantize(tq.ProdCode(part.codes, part.signs, part.norms, part.rnorms))
    return codec.dequantize(part.codes, part.norms)


def outlier_order(x: jax.Array, n_hi: int, own: jax.Array | None = None) -> jax.Array:
    """Channel order [B, H, D] int32: the n_hi channels of largest energy over T, then the rest (each ascending).

    x: [B, T, H, D]; own: [B] count of each row's own leading tokens (None: all T). Right-padding past a
    row's own tokens is left out, so a row's channels never depend on the other rows of its batch.
    """
    sq = jnp.square(x.astype(jnp.float32))  # [B, T, H, D]
    if own is not None:
        sq = jnp.where((jnp.arange(x.shape[1])[None, :] < own[:, None])[:, :, None, None], sq, 0.0)
    energy = jnp.sum(sq, axis=1)  # [B, H, D]
    order = jnp.argsort(-energy, axis=-1, stable=True)
    return jnp.concatenate([jnp.sort(order[..., :n_hi], axis=-1), jnp.sort(order[..., n_hi:], axis=-1)],
                           axis=-1).astype(jnp.int32)


@flax.struct.dataclass
class CodedTensor:
    """Keys (or values) of one layer: per-part buffers, the parts' codecs and, when split, the channel order."""

    parts: tuple[PartCode, ...]
    codecs: tuple[Codec, ...]
    perm: jax.Array | None = None  # [B, H, D] int32: channel order, first part first (mixed settings)
    own: jax.Array | None = None  # [B] int32: the row's own tokens in the next start-0 write (mixed settings)

    def write(self, x: jax.Array, starts: jax.Array) -> "CodedTensor":
        """x [B, T, H, D] written at rows' offsets starts [B].

        A write at start 0 begins a row's sequence and re-picks its outlier channels from the row's own
        tokens (the first `own` of the write; see `set_prompt_lengths`); positions of an earlier sequence
        past the new one keep their old coding, which is harmless: they lie past the row's length, where
        attention is masked, and are rewritten before they are read.
        """
        x = x.astype(jnp.float32)
        perm, own = self.perm, self.own
        if perm is not None:
            fresh = outlier_order(x, _codec_dim(self.codecs[0]), own)
            perm = jnp.where((starts == 0)[:, None, None], fresh, perm)
            own = jnp.full_like(own, ALL_OWN)  # later writes hold no padding
            x = jnp.take_along_axis(x, perm[:, None], axis=-1)
        parts, lo = [], 0
        for codec, part in zip(self.codecs, self.parts):
            hi = lo + _codec_dim(codec)
            new = _encode(codec, x[..., lo:hi])
            parts.append(jax.tree.map(lambda buf, n: write_rows(buf, n, starts), part, new))
            lo = hi
        return self.replace(parts=tuple(parts), perm=perm, own=own)

    def read(self) -> jax.Array:
        """Dense float32 [B, S, H, D]."""
        x = jnp.concatenate([_decode(c, p) for c, p in zip(self.codecs, self.parts)], axis=-1)
        if self.perm is not None:
            x = jnp.take_along_axis(x, jnp.argsort(self.perm, axis=-1)[:, None], axis=-1)
        return x


def set_prompt_lengths(cache: KVCache, lengths: jax.Array) -> KVCache:
    """Mark the next start-0 write (a prefill of right-padded prompts) as holding lengths [B] own tokens per
    row, so that mixed settings pick each row's outlier channels from its own tokens, not its padding."""

    def mark(x: Any) -> Any:
        if isinstance(x, CodedTensor) and x.own is not None:
            return x.replace(own=jnp.asarray(lengths, jnp.int32))
        return x

    return jax.tree.map(mark, cache, is_leaf=lambda x: isinstance(x, CodedTensor))


class _CodedKV:
    """write/read for entries holding two CodedTensors `k` and `v`."""

    def write(self, k: jax.Array, v: jax.Array, starts: jax.Array) -> Any:
        return self.replace(k=self.k.write(k, starts), v=self.v.write(v, starts))

    def read(self, dtype: Any) -> tuple[jax.Array, jax.Array]:
        return self.k.read().astype(dtype), self.v.read().astype(dtype)


@flax.struct.dataclass
class TurboLayerKV(_CodedKV):
    """TurboQuant keys and values (see the module docstring for what is stored)."""

    k: CodedTensor
    v: CodedTensor


@flax.struct.dataclass
class UniformLayerKV(_CodedKV):
    """Uniform-quantized keys and values: the baseline without rotation."""

    k: CodedTensor
    v: CodedTensor


# ---------------------------------------------------------------------------------------------------------
# Construction and bytes (kind strings are read by `jaxgpt.decode.cache_kinds`)


def _part_plan(bits: float, d: int) -> list[tuple[int, int]]:
    """[(channels, bits)] per part: one part, or for b.5 the high half at b+1 bits then the rest at b."""
    if bits == int(bits):
        return [(d, int(bits))]
    if d % 2:
        raise ValueError(f"mixed {bits}-bit KV cache splits head_dim in half; head_dim={d} is odd, "
                         "use an integer bit width or an even head_dim")
    return [(d // 2, int(bits) + 1), (d // 2, int(bits))]


def _codec_for(family: str, prod: bool, d: int, bits: int, seed: np.random.SeedSequence) -> Codec:
    if family == "uniform":
        return UniformCodec(d=d, bits=bits)
    return tq.prod_codec(d, bits, seed) if prod else tq.mse_codec(d, bits, seed)


def _empty_part(codec: Codec, lead: tuple[int, int, int]) -> PartCode:
    d = _codec_dim(codec)
    if isinstance(codec, tq.ProdCodec):
        mse_bits = codec.bits - 1
        codes = jnp.zeros((*lead, tq.packed_size(d, mse_bits) if mse_bits else 0), jnp.uint8)
        return PartCode(codes, jnp.zeros(lead, SIDE_DTYPE), jnp.zeros((*lead, tq.packed_size(d, 1)), jnp.uint8),
                        jnp.zeros(lead, SIDE_DTYPE))
    return PartCode(jnp.zeros((*lead, tq.packed_size(d, codec.bits)), jnp.uint8), jnp.zeros(lead, SIDE_DTYPE))


def init_compressed_cache(model_cfg: GPTConfig, batch: int, max_len: int, spec: CacheKind,
                          seed: int = 0) -> KVCache:
    """An empty `KVCache` of a parsed int8 / turbo / uniform kind for `batch` rows of `max_len` positions
    (`jaxgpt.decode.cache_kinds.new_cache` builds any kind from its string).

    Rotations and QJL matrices are drawn per (layer, keys/values, part) from `seed`.
    """
    B, S, H, D = batch, max_len, model_cfg.kv_heads, model_cfg.head_dim
    if spec.family == "int8":
        layers = tuple(Int8LayerKV(k=jnp.zeros((B, S, H, D), jnp.int8), v=jnp.zeros((B, S, H, D), jnp.int8),
                                   k_scale=jnp.zeros((B, S, H), SIDE_DTYPE), v_scale=jnp.zeros((B, S, H), SIDE_DTYPE))
                       for _ in range(model_cfg.n_layer))
        return KVCache(layers=layers, lengths=jnp.zeros((B,), jnp.int32))
    if spec.family not in ("turbo", "uniform"):
        raise ValueError(f"init_compressed_cache builds int8, turbo and uniform caches, not {spec}; use new_cache")
    plan = _part_plan(spec.bits, D)
    entry = TurboLayerKV if spec.family == "turbo" else UniformLayerKV
    layers = []
    for layer in range(model_cfg.n_layer):
        tensors = []
        for role in (0, 1):  # keys, values
            prod = spec.prod and role == 0
            codecs = tuple(_codec_for(spec.family, prod, d, b, np.random.SeedSequence([seed, layer, role, i]))
                           for i, (d, b) in enumerate(plan))
            perm = own = None
            if len(plan) > 1:
                perm = jnp.broadcast_to(jnp.arange(D, dtype=jnp.int32), (B, H, D))
                own = jnp.full((B,), ALL_OWN, jnp.int32)
            tensors.append(CodedTensor(parts=tuple(_empty_part(c, (B, S, H)) for c in codecs), codecs=codecs,
                                       perm=perm, own=own))
        layers.append(entry(k=tensors[0], v=tensors[1]))
    return KVCache(layers=tuple(layers), lengths=jnp.zeros((B,), jnp.int32))


def _part_bytes(family: str, prod: bool, d: int, bits: int) -> tuple[int, int]:
    """(bytes per (token, head) vector, bytes of constants) for one part."""
    side = jnp.dtype(SIDE_DTYPE).itemsize
    if family == "uniform":
        return tq.packed_size(d, bits) + side, 0
    if not prod:
        return tq.packed_size(d, bits) + side, 4 * d * d  # indices + norm; rotation
    mse = tq.packed_size(d, bits - 1) if bits > 1 else 0
    rotation = 4 * d * d if bits > 1 else 0
    return mse + tq.packed_size(d, 1) + 2 * side, rotation + 4 * d * d  # + signs, norms; + QJL matrix


def compressed_cache_bytes(model_cfg: GPTConfig, batch: int, max_len: int, kind: str) -> int:
    """Bytes `new_cache(kind, ...).nbytes` holds, from the shapes alone (everything counted: indices, norms,
    scales, QJL signs, channel orders, rotations, QJL matrices and the [B] lengths)."""
    spec = parse_kind(kind)
    B, S, H, D, L = batch, max_len, model_cfg.kv_heads, model_cfg.head_dim, model_cfg.n_layer
    lengths = 4 * B
    if spec.family == DENSE:
        return L * 2 * B * S * H * D * jnp.dtype(spec.dtype or model_cfg.compute_dtype).itemsize + lengths
    if spec.family == "int8":
        return L * 2 * B * S * H * (D + jnp.dtype(SIDE_DTYPE).itemsize) + lengths
    plan = _part_plan(spec.bits, D)
    total = 0
    for role in (0, 1):
        prod = spec.prod and role == 0
        for d, b in plan:
            per_vec, const = _part_bytes(spec.family, prod, d, b)
            total += B * S * H * per_vec + const
        if len(plan) > 1:
            total += 4 * B * H * D + 4 * B  # channel order, own-token counts
    return L * total + lengths


def bits_per_value(model_cfg: GPTConfig, kind: str) -> float:
    """Stored bits per cached key/value scalar, counting indices, norms, scales and QJL signs per token
    (not the per-layer constants or the per-row channel order, which do not grow with the context)."""
    spec = parse_kind(kind)
    D = model_cfg.head_dim
    if spec.family == DENSE:
        return 8.0 * jnp.dtype(spec.dtype or model_cfg.compute_dtype).itemsize
    if spec.family == "int8":
        return 8.0 + 8.0 * jnp.dtype(SIDE_DTYPE).itemsize / D
    plan = _part_plan(spec.bits, D)
    per_token = 0
    for role in (0, 1):
        per_token += sum(_part_bytes(spec.family, spec.prod and role == 0, d, b)[0] for d, b in plan)
    return 8.0 * per_token / (2 * D)


__all__ = [
    "CodedTensor", "Int8LayerKV", "PartCode", "TurboLayerKV", "UniformCodec", "UniformLayerKV", "bits_per_value",
    "compressed_cache_bytes", "init_compressed_cache", "int8_quantize", "outlier_order", "set_prompt_lengths",
]
