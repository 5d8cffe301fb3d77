"""Per-layer trees stacked along a leading layer axis, and back.

The params layout is the unrolled one everywhere (h_0 ... h_{L-1}: checkpoints, Hugging Face files, LoRA
targets such as "h_3/attn/c_attn", quantization paths): one layout, so nothing that names layers needs to
know whether the model scans. `GPTConfig.scan_layers` stacks the blocks inside the step (`stack`), runs them
as one `lax.scan`, and the gradient flows back to each h_i. The same functions stack per-layer KV-cache
entries for the scan and split them again.

`stack_layers` / `unstack_layers` convert a whole params tree to and from the stacked layout ({"h": [L, ...]});
`stack_tree` / `unstack_tree` convert every params-shaped dict inside any tree (a whole train state: params
and AdamW's moments). The trainer holds a scanned model's train state stacked between the checkpoint edges,
so the optimizer updates one [L, ...] array per block weight, not L arrays (jaxgpt.train.steps.StateLayout); the
model scans params that arrive stacked without stacking them again.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

STACKED = "h"  # the stacked layout's key for the blocks
_LAYER = re.compile(r"h_(\d+)$")


def same_structure(trees: Sequence[Any]) -> bool:
    """True when every tree is present and they have one structure and one shape per leaf (stackable).

    False e.g. when LoRA wraps the weights of some layers only: the model then runs them unrolled.
    """
    if not trees or any(t is None for t in trees):
        return False
    first = jax.tree.structure(trees[0])
    shapes = [jnp.shape(x) for x in jax.tree.leaves(trees[0])]
    return all(jax.tree.structure(t) == first and [jnp.shape(x) for x in jax.tree.leaves(t)] == shapes
               for t in trees[1:])


def stack(trees: Sequence[Any]) -> Any:
    """Trees of one structure -> one tree whose leaves gain a leading axis of len(trees)."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree: Any, n: int) -> tuple[Any, ...]:
    """The inverse of `stack`: a tree with leading axis n -> a tuple of n trees."""
    return tuple(jax.tree.map(lambda x, i=i: x[i], tree) for i in range(n))


def layer_count(params: Mapping[str, Any]) -> int:
    """How many blocks an unrolled params tree holds (h_0 ... h_{L-1}); 0 if none."""
    return len([k for k in params if _LAYER.match(k)])


def stack_layers(params: Mapping[str, Any]) -> dict[str, Any]:
    """Unrolled params {h_0, ..., h_{L-1}, rest} -> {"h": stacked blocks [L, ...], rest}."""
    n = layer_count(params)
    if STACKED in params or n == 0:
        raise ValueError(f"stack_layers needs unrolled params with keys h_0 ... h_{{L-1}}; got keys "
                         f"{sorted(params)[:6]}; pass the params of an unrolled model")
    blocks = [params[f"h_{i}"] for i in range(n)]
    if not same_structure(blocks):
        raise ValueError("stack_layers: the blocks h_0 ... h_{L-1} differ in structure or shapes (e.g. LoRA on "
                         "some layers only); stack params whose blocks all look alike")
    rest = {k: v for k, v in params.items() if not _LAYER.match(k)}
    return {**rest, STACKED: stack(blocks)}


def is_unrolled(tree: Any) -> bool:
    """A dict in the unrolled layout: it holds blocks h_0 ... h_{L-1}."""
    return isinstance(tree, Mapping) and layer_count(tree) > 0


def is_stacked(tree: Any) -> bool:
    """A dict in the stacked layout: it holds the blocks under "h"."""
    return isinstance(tree, Mapping) and STACKED in tree


def in_stacked(path: Sequence[Any]) -> bool:
    """Whether a leaf's key path (jax.tree_util) runs through stacked blocks: its leading axis is the layer."""
    return any(getattr(k, "key", None) == STACKED for k in path)


def stack_tree(tree: Any) -> Any:
    """Every unrolled params dict inside `tree` (params, an optax state, a train state) -> the stacked layout."""
    return jax.tree.map(lambda x: stack_layers(x) if is_unrolled(x) else x, tree, is_leaf=is_unrolled)


def unstack_tree(tree: Any) -> Any:
    """The inverse of `stack_tree`: every stacked params dict inside `tree` -> the unrolled layout."""
    return jax.tree.map(lambda x: unstack_layers(x) if is_stacked(x) else x, tree, is_leaf=is_stacked)


def unstack_layers(params: Mapping[str, Any]) -> dict[str, Any]:
    """Stacked params {"h": [L, ...], rest} -> the unrolled layout {h_0, ..., h_{L-1}, rest}."""
    if STACKED not in params:
        raise ValueError(f"unstack_layers needs stacked params with key {STACKED!r}; got keys {sorted(params)[:6]}")
    n = jax.tree.leaves(params[STACKED])[0].shape[0]
    rest = {k: v for k, v in params.items() if k != STACKED}
    return {**rest, **{f"h_{i}": b for i, b in enumerate(unstack(params[STACKED], n))}}
