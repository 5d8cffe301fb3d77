"""The one protocol for weight leaves that are not arrays, and path helpers for params pytrees.

A params pytree holds plain arrays, or objects that stand in for a weight matrix: a quantized weight
(`jaxgpt.quantize.QuantizedArray`), a LoRA-wrapped weight. Such a leaf brings its own products:

  leaf.matmul(x, dtype)  x [..., in] @ W [in, out]      (a Dense kernel)
  leaf.embed(ids, dtype) rows of a table E [V, C]        (an embedding)
  leaf.attend(x, dtype)  x [..., C] @ E.T                (the tied head)
  leaf.shape, leaf.dtype, leaf.dequantize(dtype=None)   (the float weight it stands for)

The model calls `matmul` / `embed` / `attend` below and never asks what a leaf is; every module that walks
params (quantize, lora, sharding, checkpoint) uses `is_weight_leaf` as `is_leaf` and `path_str` for names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np


@runtime_checkable
class WeightLeaf(Protocol):
    """What a non-array weight leaf provides (see the module docstring)."""

    shape: tuple[int, ...]

    def matmul(self, x: jax.Array, dtype: Any) -> jax.Array: ...

    def embed(self, ids: jax.Array, dtype: Any) -> jax.Array: ...

    def attend(self, x: jax.Array, dtype: Any) -> jax.Array: ...

    def dequantize(self, dtype: Any | None = None) -> jax.Array: ...


def is_array(w: Any) -> bool:
    return isinstance(w, (jax.Array, np.ndarray))


def is_weight_leaf(x: Any) -> bool:
    """True for a non-array weight leaf (use as `is_leaf=` when walking params, so it is not split open)."""
    return not is_array(x) and isinstance(x, WeightLeaf)


def matmul(x: jax.Array, w: Any, dtype: Any) -> jax.Array:
    """x [..., in] @ w [in, out] in `dtype`.

    x is flattened to [N, in] first: the weight gradient is then one plain [in, N] @ [N, out] GEMM, where a
    contraction over (B, T) makes XLA:CPU write transposed copies of the activations.
    """
    if is_array(w):
        lead = x.shape[:-1]
        y = jnp.dot(x.reshape(-1, x.shape[-1]).astype(dtype), w.astype(dtype))  # [N, out]
        return y.reshape(*lead, w.shape[-1])
    return w.matmul(x, dtype)


def embed(w: Any, ids: jax.Array, dtype: Any) -> jax.Array:
    """Rows of w [V, C] for ids [...] -> [..., C]."""
    if is_array(w):
        return jnp.take(w, ids, axis=0).astype(dtype)
    return w.embed(ids, dtype)


def attend(x: jax.Array, w: Any, dtype: Any) -> jax.Array:
    """x [..., C] @ w.T for an embedding table w [V, C] (the tied head)."""
    if is_array(w):
        return jnp.dot(x.astype(dtype), w.astype(dtype).T)
    return w.attend(x, dtype)


def dense(w: Any, dtype: Any | None = None) -> Any:
    """The float array a leaf stands for (arrays pass through)."""
    return w.dequantize(dtype) if is_weight_leaf(w) else w


def leaves(params: Any) -> list[Any]:
    """Every leaf of params, weight leaves whole."""
    return jax.tree.leaves(params, is_leaf=is_weight_leaf)


def count_params(params: Any) -> int:
    """Number of scalars in a params pytree (a weight leaf counts its weight's elements)."""
    return sum(int(np.prod(getattr(x, "shape", ()))) for x in leaves(params))


def path_str(path: tuple[Any, ...]) -> str:
    """A jax key path (or a tuple of names) as 'h_0/attn/c_attn/kernel'."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def flatten_with_paths(params: Any) -> list[tuple[str, Any]]:
    """[("h_0/attn/c_attn/kernel", leaf), ...] with weight leaves whole."""
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_weight_leaf)[0]
    return [(path_str(p), leaf) for p, leaf in flat]


def get_path(tree: Any, path: tuple[str, ...]) -> Any:
    """tree[path[0]][path[1]]...; KeyError naming the first missing part."""
    node = tree
    for i, k in enumerate(path):
        if not isinstance(node, Mapping) or k not in node:
            raise KeyError("/".join(path[:i + 1]))
        node = node[k]
    return node


def set_path(tree: Mapping, path: tuple[str, ...], value: Any) -> dict:
    """A copy of tree with tree[path] = value (only the dicts along the path are copied)."""
    out = dict(tree)
    out[path[0]] = value if len(path) == 1 else set_path(tree.get(path[0], {}), path[1:], value)
    return out
