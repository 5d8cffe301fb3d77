"""Weight quantization as a map over the params pytree: int8 (or int4) weights, LayerNorm left in float.

`quantize(params, QuantConfig(...))` returns the same pytree in which every selected weight matrix is a
`QuantizedArray` (integer values + float scales, symmetric round-to-nearest) and every other leaf is the
very same array object. The model needs no fork: a QuantizedArray is a weight leaf of `jaxgpt.nn.weights`, whose
`matmul/embed/attend` hand it to its own `.matmul/.embed/.attend`, which dequantize inside the jitted forward.

Storage layout. Every quantized matrix is kept as [N, K]: N output channels (one scale each, or one per
group of K), K the contracted axis, contiguous. A Dense kernel [in, out] is stored transposed
(`transposed=True`, values [out, in]); an embedding table [V, C] is stored as it is (C is contracted by the
tied head, rows are looked up by `embed`). With K contiguous, XLA:CPU fuses the int8 -> float convert
into the batch-1 matrix-vector product (one loop that reads int8), instead of writing a float copy of the
weight and calling a GEMM on it, which is what the [in, out] layout gets. See docs/quantization.md.

Granularity: per_channel (one scale per output channel, default), per_tensor (one scale), group (one
scale per `group_size` consecutive values along K, as GPTQ/AWQ int4). int4 packs two values per byte.

Which leaves: by default every Dense "kernel" of the blocks; never norm scales/biases or biases.
`embeddings=True` adds wte/wpe, `lm_head=True` the untied head; `include`/`exclude` are fnmatch patterns
over "/"-joined paths ("h_0/attn/c_attn/kernel") that replace/subtract from that default.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxgpt.io import atomic
from jaxgpt.nn.weights import is_weight_leaf, path_str

BITS = (8, 4)
GRANULARITIES = ("per_channel", "per_tensor", "group")
FORMAT = "jaxgpt-quantized"
META_FILE = "quant.json"

# Up to this many rows, x @ W runs as one fused int8 matrix-vector product per row; beyond it the weight is
# dequantized once into a float buffer for a GEMM (measured on CPU in docs/quantization.md).
ROWWISE_MAX_ROWS = 64


# ---------------------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how. Defaults: int8, per output channel, every Dense kernel of the blocks."""

    bits: int = 8  # 8 | 4
    granularity: str = "per_channel"  # per_channel | per_tensor | group
    group_size: int = 128  # values per scale along the contracted axis (granularity="group")
    embeddings: bool = False  # also quantize wte (and wpe) tables
    lm_head: bool = False  # also quantize the untied lm_head kernel
    include: tuple[str, ...] = ()  # fnmatch patterns over paths; when given they replace the default choice
    exclude: tuple[str, ...] = ()  # fnmatch patterns over paths, removed from the choice

    def __post_init__(self) -> None:
        if self.bits not in BITS or isinstance(self.bits, bool):
            raise ValueError(f"QuantConfig.bits={self.bits!r} is not supported; use 8 or 4")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"QuantConfig.granularity={self.granularity!r} is not valid; use one of "
                             f"{', '.join(GRANULARITIES)}")
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size <= 0:
            raise ValueError(f"QuantConfig.group_size={self.group_size!r} is not valid; use a positive integer")
        if self.bits == 4 and self.granularity == "group" and self.group_size % 2:
            raise ValueError(f"QuantConfig.group_size={self.group_size} is odd; int4 packs pairs, use an even size")
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(p, str) for p in value):
                raise ValueError(f"QuantConfig.{name}={value!r} is not valid; use a tuple of pattern strings, "
                                 "e.g. ('h_*/mlp/*/kernel',)")
            object.__setattr__(self, name, tuple(value))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["include"], d["exclude"] = list(self.include), list(self.exclude)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"QuantConfig: unknown fields {unknown}; known fields are {sorted(names)}")
        d = dict(d)
        for name in ("include", "exclude"):
            if name in d:
                d[name] = tuple(d[name])
        return cls(**d)


# ---------------------------------------------------------------------------------------------------------
# The quantized leaf


def _qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1  # 127 for int8, 7 for int4 (symmetric: -8 is never used)


def pack_int4(q: jax.Array) -> jax.Array:
    """[..., K] int8 in [-8, 7] -> [..., K/2] int8, two values per byte (even index in the low nibble)."""
    lo, hi = q[..., 0::2], q[..., 1::2]
    return ((lo & 0xF) | (hi << 4)).astype(jnp.int8)


def unpack_int4(p: jax.Array) -> jax.Array:
    """[..., K/2] packed int8 -> [..., K] int8 (arithmetic shifts sign-extend each nibble)."""
    lo = (p << 4) >> 4
    hi = p >> 4
    return jnp.stack([lo, hi], axis=-1).reshape(*p.shape[:-1], 2 * p.shape[-1])


@flax.struct.dataclass
class QuantizedArray:
    """A weight matrix as integers + float scales, stored [N, K] (K contracted; see the module docstring).

    values: int8 [N, K] (bits=8) or packed int8 [N, K/2] (bits=4).
    scales: float32 [N, 1] (per_channel), [1, 1] (per_tensor) or [N, K/group_size] (group).
    """

    values: jax.Array
    scales: jax.Array
    bits: int = flax.struct.field(pytree_node=False)
    granularity: str = flax.struct.field(pytree_node=False)
    group_size: int = flax.struct.field(pytree_node=False)  # 0 unless granularity == "group"
    orig_shape: tuple[int, ...] = flax.struct.field(pytree_node=False)  # the float weight's shape
    transposed: bool = flax.struct.field(pytree_node=False)  # True: orig is [K, N] (a Dense kernel)
    orig_dtype: str = flax.struct.field(pytree_node=False)  # dtype dequantize returns

    @property
    def shape(self) -> tuple[int, ...]:
        return self.orig_shape

    @property
    def dtype(self) -> Any:
        return jnp.dtype(self.orig_dtype)

    @property
    def ndim(self) -> int:
        return len(self.orig_shape)

    @property
    def size(self) -> int:
        return math.prod(self.orig_shape)

    @property
    def nbytes(self) -> int:
        """Bytes held in memory: integer values + scales."""
        return int(self.values.nbytes + self.scales.nbytes)

    def int_values(self) -> jax.Array:
        """The integers, unpacked: int8 [N, K]."""
        return unpack_int4(self.values) if self.bits == 4 else self.values

    def _scaled(self, q: jax.Array, scales: jax.Array, dtype: Any) -> jax.Array:
        """q [R, K] ints, scales [R, S] -> float [R, K] = q * scale of its group."""
        w = q.astype(dtype)
        if self.granularity == "group":
            R, K = w.shape
            g = self.group_size
            return (w.reshape(R, K // g, g) * scales.astype(dtype)[:, :, None]).reshape(R, K)
        return w * scales.astype(dtype)

    def dequantize_nk(self, dtype: Any | None = None) -> jax.Array:
        """The float weight in storage layout [N, K]."""
        return self._scaled(self.int_values(), self.scales, dtype or self.dtype)

    def dequantize(self, dtype: Any | None = None) -> jax.Array:
        """The float weight in its original layout and dtype (or `dtype`)."""
        w = self.dequantize_nk(dtype)
        return w.T if self.transposed else w

    def _gemv(self, x: jax.Array, dtype: Any) -> jax.Array:
        """x [1, K] -> [1, N]: dequantization fused into a matrix-vector product that reads the integers."""
        # Tie the weight to x so that XLA cannot hoist the dequantization out of a decode loop
        # (loop-invariant code motion would write a float copy of every weight before the loop).
        me, x = lax.optimization_barrier((self, x))
        if me.granularity == "group":
            return jnp.dot(x, me.dequantize_nk(dtype).T)
        return jnp.dot(x, me.int_values().astype(dtype).T) * me.scales.astype(dtype).reshape(-1)

    def _contract(self, x: jax.Array, dtype: Any) -> jax.Array:
        """x [..., K] -> [..., N] = x @ W_nk.T with W dequantized inside the computation.

        Few rows (decode): one fused matrix-vector product per row, reading int8 (or packed int4) weights.
        Many rows (prefill, evaluation): dequantize once into a float [N, K] buffer and run one GEMM.
        """
        lead, K = x.shape[:-1], x.shape[-1]
        x2 = x.astype(dtype).reshape(-1, K)  # [M, K]
        M = x2.shape[0]
        if M == 1:
            y = self._gemv(x2, dtype)
        elif M <= ROWWISE_MAX_ROWS:
            y = lax.map(lambda xi: self._gemv(xi[None], dtype)[0], x2)  # [M, N]
        else:
            w = lax.optimization_barrier(self.dequantize_nk(dtype))  # [N, K]
            y = jnp.dot(x2, w.T)
        return y.reshape(*lead, -1)

    def matmul(self, x: jax.Array, dtype: Any) -> jax.Array:
        """x [..., in] @ W [in, out] -> [..., out] for a quantized Dense kernel."""
        if not self.transposed:
            raise ValueError("this QuantizedArray is an embedding table, not a Dense kernel; use attend/embed")
        return self._contract(x, dtype)

    def attend(self, x: jax.Array, dtype: Any) -> jax.Array:
        """x [..., C] @ E.T -> [..., V] for a quantized embedding table E [V, C] (the tied head)."""
        if self.transposed:
            raise ValueError("this QuantizedArray is a Dense kernel, not an embedding table; use matmul")
        return self._contract(x, dtype)

    def embed(self, ids: jax.Array, dtype: Any) -> jax.Array:
        """Rows of the table E [V, C] for ids [...] -> [..., C]; only the gathered rows are dequantized."""
        if self.transposed:
            raise ValueError("this QuantizedArray is a Dense kernel, not an embedding table; use matmul")
        flat = ids.reshape(-1)
        q = jnp.take(self.values, flat, axis=0)  # [n, K] or packed [n, K/2]
        if self.bits == 4:
            q = unpack_int4(q)
        s = self.scales if self.granularity == "per_tensor" else jnp.take(self.scales, flat, axis=0)
        return self._scaled(q, s, dtype).reshape(*ids.shape, self.orig_shape[-1])


def _is_q(x: Any) -> bool:
    return isinstance(x, QuantizedArray)


# ---------------------------------------------------------------------------------------------------------
# Pure functions on one array


def quantize_array(w: jax.Array, bits: int = 8, granularity: str = "per_channel", group_size: int = 128,
                   transposed: bool = True) -> QuantizedArray:
    """Symmetric round-to-nearest quantization of a matrix.

    w: [K, N] with transposed=True (a Dense kernel [in, out]) or [N, K] with transposed=False (a table).
    Each scale is max|w| / qmax over its group, so every value is within half a step of w.
    """
    if bits not in BITS:
        raise ValueError(f"bits={bits!r} is not supported; use 8 or 4")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r} is not valid; use one of {', '.join(GRANULARITIES)}")
    if w.ndim != 2:
        raise ValueError(f"can only quantize 2-D weight matrices, got shape {tuple(w.shape)}")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"can only quantize float weights, got dtype {w.dtype}")
    orig_shape, orig_dtype = tuple(int(d) for d in w.shape), jnp.dtype(w.dtype).name
    wn = (w.T if transposed else w).astype(jnp.float32)  # [N, K]
    N, K = wn.shape
    if granularity == "group":
        if K % group_size:
            raise ValueError(f"group_size={group_size} does not divide the contracted size {K} of a weight of "
                             f"shape {orig_shape}; pick a group_size that divides it, or exclude this weight")
        groups = wn.reshape(N, K // group_size, group_size)
        amax = jnp.max(jnp.abs(groups), axis=-1)  # [N, K/g]
    elif granularity == "per_channel":
        amax = jnp.max(jnp.abs(wn), axis=-1, keepdims=True)  # [N, 1]
    else:
        amax = jnp.max(jnp.abs(wn)).reshape(1, 1)  # [1, 1]
    if bits == 4 and K % 2:
        raise ValueError(f"int4 packs pairs along the contracted axis, whose size {K} is odd (shape {orig_shape}); "
                         "use bits=8 for this weight or exclude it")
    qmax = _qmax(bits)
    scales = jnp.where(amax > 0, amax / qmax, 1.0).astype(jnp.float32)  # all-zero group: any scale works
    per_value = (jnp.repeat(scales, group_size, axis=-1) if granularity == "group"
                 else jnp.broadcast_to(scales, (N, 1)))
    q = jnp.clip(jnp.round(wn / per_value), -qmax, qmax).astype(jnp.int8)  # [N, K]
    values = pack_int4(q) if bits == 4 else q
    return QuantizedArray(values=values, scales=scales, bits=bits, granularity=granularity,
                          group_size=group_size if granularity == "group" else 0, orig_shape=orig_shape,
                          transposed=transposed, orig_dtype=orig_dtype)


_quantize_array_jit = jax.jit(quantize_array, static_argnums=(1, 2, 3, 4))  # one compile per shape and setting


def fake_quantize_array(x: jax.Array, bits: int = 8, granularity: str = "per_tensor",
                        group_size: int = 128) -> jax.Array:
    """quantize -> dequantize of any float array, same shape and dtype (simulates storing it in `bits`).

    A 1-D vector (a norm scale or bias) is one channel, so per_channel equals per_tensor for it.
    Matrices use the Dense-kernel convention (columns are channels).
    """
    if x.ndim == 2:
        return quantize_array(x, bits, granularity, group_size, transposed=True).dequantize()
    flat = x.reshape(-1, 1)  # [n, 1] as a kernel: one output channel over all n values
    return quantize_array(flat, bits, granularity, group_size, transposed=True).dequantize().reshape(x.shape)


# ---------------------------------------------------------------------------------------------------------
# The pytree map


def _default_choice(path: str, leaf: Any, qcfg: QuantConfig) -> bool:
    parts = path.split("/")
    if getattr(leaf, "ndim", 0) != 2:
        return False
    if parts[-1] == "kernel":
        return qcfg.lm_head if "lm_head" in parts else True
    if parts[-1] == "embedding":
        return qcfg.embeddings
    return False


def is_selected(path: str, leaf: Any, qcfg: QuantConfig) -> bool:
    """Whether `qcfg` picks the leaf at `path`: the default rule or `include`, minus `exclude`."""
    if qcfg.include:
        chosen = any(fnmatch.fnmatchcase(path, p) for p in qcfg.include)
    else:
        chosen = _default_choice(path, leaf, qcfg)
    return chosen and not any(fnmatch.fnmatchcase(path, p) for p in qcfg.exclude)


def selected_paths(params: Any, qcfg: QuantConfig) -> list[str]:
    """Paths of the leaves `qcfg` selects."""
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_q)[0]
    return [path_str(p) for p, leaf in flat if not _is_q(leaf) and is_selected(path_str(p), leaf, qcfg)]


def _map_selected(params: Any, qcfg: QuantConfig, fn: Callable[[str, Any], Any], *,
                  allow_quantized: bool = False) -> Any:
    if not allow_quantized and is_quantized(params):
        raise ValueError("params are already quantized; dequantize them first or quantize the float params")
    if any(is_weight_leaf(x) and not _is_q(x) for x in jax.tree.leaves(params, is_leaf=is_weight_leaf)):
        raise ValueError("params hold LoRA-wrapped weights (lora.wrap); quantize the base params, then wrap them")
    hits: list[str] = []

    def one(path: tuple[Any, ...], leaf: Any) -> Any:
        p = path_str(path)
        if _is_q(leaf) or not is_selected(p, leaf, qcfg):
            return leaf
        if not jnp.issubdtype(getattr(leaf, "dtype", np.dtype(object)), jnp.floating):
            raise ValueError(f"QuantConfig selects {p!r}, which is not a float array; narrow the include patterns")
        hits.append(p)
        return fn(p, leaf)

    out = jax.tree_util.tree_map_with_path(one, params, is_leaf=_is_q)
    if not hits:
        raise ValueError(f"QuantConfig selects no weights (include={qcfg.include}, exclude={qcfg.exclude}, "
                         f"embeddings={qcfg.embeddings}, lm_head={qcfg.lm_head}); patterns match paths like "
                         "'h_0/attn/c_attn/kernel'")
    return out


def quantize(params: Any, qcfg: QuantConfig | None = None) -> Any:
    """The params pytree with every selected weight matrix replaced by a QuantizedArray.

    Unselected leaves (norms, biases, ...) are returned as the same objects, untouched.
    """
    qcfg = qcfg or QuantConfig()

    def one(p: str, leaf: Any) -> QuantizedArray:
        if leaf.ndim != 2:
            raise ValueError(f"QuantConfig selects {p!r} of shape {tuple(leaf.shape)}, but only 2-D weight "
                             "matrices can be quantized (the model multiplies by them); narrow the include "
                             "patterns, or use fake_quantize to study quantizing vectors")
        transposed = p.split("/")[-1] != "embedding"  # kernels are [in, out]; tables [V, C]
        try:
            return _quantize_array_jit(leaf, qcfg.bits, qcfg.granularity, qcfg.group_size, transposed)
        except ValueError as e:
            raise ValueError(f"{p}: {e}") from None

    return _map_selected(params, qcfg, one)


def fake_quantize(params: Any, qcfg: QuantConfig) -> Any:
    """params where every selected float leaf (any shape: norm scales too) went through quantize -> dequantize.

    QuantizedArray leaves pass through, so norms can be fake-quantized on top of quantized matrices.
    """

    def one(p: str, leaf: Any) -> jax.Array:
        try:
            return fake_quantize_array(leaf, qcfg.bits, qcfg.granularity, qcfg.group_size)
        except ValueError as e:
            raise ValueError(f"{p}: {e}") from None

    return _map_selected(params, qcfg, one, allow_quantized=True)


def dequantize(params: Any) -> Any:
    """Float params: every QuantizedArray back to a float array in its original layout and dtype."""
    return jax.tree.map(lambda x: x.dequantize() if _is_q(x) else x, params, is_leaf=_is_q)


def is_quantized(params: Any) -> bool:
    return any(_is_q(x) for x in jax.tree.leaves(params, is_leaf=_is_q))


def size_report(params: Any) -> dict[str, Any]:
    """Bytes of params as they are vs the same params in float.

    quantized_bytes / quantized_float_bytes is the ratio over the quantized weights alone;
    total_bytes / float_total_bytes over the whole model (norms, biases, unquantized tables included).
    """
    q_bytes = q_float = other = n_q = 0
    for leaf in jax.tree.leaves(params, is_leaf=_is_q):
        if _is_q(leaf):
            n_q += 1
            q_bytes += leaf.nbytes
            q_float += leaf.size * leaf.dtype.itemsize
        else:
            other += int(np.asarray(leaf).nbytes) if not hasattr(leaf, "nbytes") else int(leaf.nbytes)
    total, float_total = q_bytes + other, q_float + other
    return {
        "n_quantized": n_q, "quantized_bytes": q_bytes, "quantized_float_bytes": q_float, "other_bytes": other,
        "total_bytes": total, "float_total_bytes": float_total,
        "quantized_ratio": q_bytes / q_float if q_float else 1.0,
        "total_ratio": total / float_total if float_total else 1.0,
    }


# ---------------------------------------------------------------------------------------------------------
# Save / load (orbax arrays + a JSON describing every leaf)


def _to_storage(params: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Nested dict of plain arrays for orbax, and per-leaf JSON metadata keyed by path."""
    leaves_meta: dict[str, Any] = {}
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_q)[0]
    arrays: dict[str, Any] = {}
    for path, leaf in flat:
        p = path_str(path)
        if _is_q(leaf):
            arrays[p] = {"q_values": leaf.values, "q_scales": leaf.scales}
            leaves_meta[p] = {
                "kind": "quantized", "bits": leaf.bits, "granularity": leaf.granularity,
                "group_size": leaf.group_size, "shape": list(leaf.orig_shape), "transposed": leaf.transposed,
                "dtype": leaf.orig_dtype, "values": [list(leaf.values.shape), jnp.dtype(leaf.values.dtype).name],
                "scales": [list(leaf.scales.shape), jnp.dtype(leaf.scales.dtype).name],
            }
        else:
            arrays[p] = leaf
            leaves_meta[p] = {"kind": "array", "shape": list(np.shape(leaf)), "dtype": jnp.dtype(leaf.dtype).name}
    return _nest(arrays), leaves_meta


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p, v in flat.items():
        node = out
        keys = p.split("/")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = v
    return out


def save_quantized(path: str | os.PathLike, params: Any, qcfg: QuantConfig | None = None, *,
                   force: bool = False) -> int:
    """Save quantized params (integers stay integers on disk) + quant.json; returns bytes on disk.

    Written to a temporary folder and renamed into place, so an existing checkpoint is never half replaced.
    """
    from jaxgpt.io.checkpoint import pytree_bytes_on_disk, save_pytree

    if not is_quantized(params):
        raise ValueError("params hold no QuantizedArray; save float params with jaxgpt.io.checkpoint.save_pytree, "
                         "or quantize them first")
    path = Path(path).absolute()
    if path.exists() and not force:
        raise FileExistsError(f"{path} already exists; pick a new path or pass force=True to replace it")
    tree, leaves_meta = _to_storage(params)
    with atomic.directory(path, force=force) as tmp:
        save_pytree(tmp, tree, force=True)  # tmp is the empty folder made for it
        meta = {"format": FORMAT, "version": 1, "quant_config": qcfg.to_dict() if qcfg else None,
                "leaves": leaves_meta}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
    return pytree_bytes_on_disk(path)


def read_quant_meta(path: str | os.PathLike) -> dict[str, Any] | None:
    """The quant.json of a checkpoint folder, or None when the folder holds a float checkpoint."""
    f = Path(path) / META_FILE
    if not f.is_file():
        return None
    try:
        meta = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f} is not valid JSON ({e}); the quantized checkpoint is corrupt, re-save it") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"{f} is not a {FORMAT} description; re-save the checkpoint with save_quantized")
    return meta


def check_float_checkpoint(path: str | os.PathLike) -> None:
    """Raise a clear error when `path` holds quantized params (for loaders that expect float params)."""
    if read_quant_meta(path) is not None:
        raise ValueError(f"{path} holds quantized params; load it with jaxgpt.quantize.load_quantized "
                         "(and dequantize() if you need float weights)")


def load_quantized(path: str | os.PathLike) -> Any:
    """Restore params saved by `save_quantized`, with their QuantizedArray leaves."""
    from jaxgpt.io.checkpoint import restore_pytree

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist; check the path")
    meta = read_quant_meta(path)
    if meta is None:
        raise ValueError(f"{path} holds float params (no {META_FILE}); load it with "
                         "jaxgpt.io.checkpoint.restore_pytree, then quantize() it")
    target: dict[str, Any] = {}
    for p, m in meta["leaves"].items():
        if m["kind"] == "quantized":
            target[p] = {"q_values": jax.ShapeDtypeStruct(tuple(m["values"][0]), jnp.dtype(m["values"][1])),
                         "q_scales": jax.ShapeDtypeStruct(tuple(m["scales"][0]), jnp.dtype(m["scales"][1]))}
        else:
            target[p] = jax.ShapeDtypeStruct(tuple(m["shape"]), jnp.dtype(m["dtype"]))
    restored = restore_pytree(path, _nest(target))
    flat = {}
    for p, m in meta["leaves"].items():
        node = restored
        for k in p.split("/"):
            node = node[k]
        if m["kind"] == "quantized":
            node = QuantizedArray(values=node["q_values"], scales=node["q_scales"], bits=m["bits"],
                                  granularity=m["granularity"], group_size=m["group_size"],
                                  orig_shape=tuple(m["shape"]), transposed=m["transposed"], orig_dtype=m["dtype"])
        flat[p] = node
    return _nest(flat)


# ---------------------------------------------------------------------------------------------------------
# Inspecting what XLA emits


def hlo_float_buffers(hlo_text: str) -> list[tuple[str, tuple[int, ...], bool]]:
    """(opcode, shape, in_loop) of every float array an optimized HLO module writes to memory.

    Only instructions of non-fused computations (the entry, loop bodies) get buffers; what happens inside a
    fusion stays in registers. A float buffer with a weight's shape means a dequantized copy of that weight:
    in_loop=True, written at every step of a while loop (a decode scan); False, written once per call (for
    example hoisted out of the loop, where it doubles the memory instead). Pass `jit(f).lower(..).compile().as_text()`.
    """
    import re

    called = set(re.findall(r"(?:calls|to_apply|condition)=(%[\w.\-]+)", hlo_text))
    bodies = set(re.findall(r"body=(%[\w.\-]+)", hlo_text))
    out: list[tuple[str, tuple[int, ...], bool]] = []
    skip = {"parameter", "get-tuple-element", "bitcast", "tuple", "constant"}
    for block in hlo_text.split("\n\n"):
        lines = block.strip().splitlines()
        if not lines:
            continue
        head = lines[0]
        name = head.split()[0]
        if not (head.startswith("%") or head.startswith("ENTRY")) or name in called:
            continue
        for line in lines[1:]:
            m = re.match(r"\s*(?:ROOT )?%\S+ = (bf16|f16|f32|f64)\[([\d,]*)\]\S* ([\w\-]+)\(", line)
            if m and m.group(3) not in skip:
                out.append((m.group(3), tuple(int(d) for d in m.group(2).split(",") if d), name in bodies))
    return out
