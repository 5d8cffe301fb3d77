"""LoRA and RsLoRA as pure transforms of the params pytree (Hu et al. 2021; Kalajdzievski 2023).

A frozen weight W [in, out] is adapted as W + scale * A @ B with A [in, r] and B [r, out]; scale is
alpha / r (LoRA) or alpha / sqrt(r) (rank-stabilized LoRA). The adapters live in their own pytree that
mirrors the params:

    {"h_0": {"attn": {"c_attn": {"A": [C, r], "B": [r, 3C]}}}}           # whole fused c_attn (as peft)
    {"h_0": {"attn": {"c_attn": {"q": {"A": [C, r], "B": [r, C]},         # q and v slices, each with
                                 "v": {"A": [C, r], "B": [r, C]}}}}}      # its own A and B

Two ways to apply them, both pure functions of (params, adapters):

- `wrap` (training): every adapted kernel becomes a `LoraWeight` leaf whose product is computed in
  activation space, x @ W + scale * (x @ A) @ B, so W + A B is never formed: the backward pass computes no
  [in, out] gradient, and W may stay bfloat16 or be an int8/int4 `QuantizedArray` (QLoRA) while A and B
  are float32. A train step is `jax.value_and_grad(loss)(adapters, params, batch)` with
  `loss(adapters, params, batch) = f(model.apply({"params": wrap(params, adapters, cfg)}, ...))`.
- `apply_lora` / `merge` (export, and the reference the tests check `wrap` against): W + scale * A @ B
  in weight space, cast back to W's dtype; a quantized W is dequantized first.

The model code knows nothing of LoRA: it multiplies through `jaxgpt.nn.weights`, which hands a LoraWeight
to its own `matmul`.

Targets are path patterns over the params pytree, matched against each 2-D `kernel`'s module path such
as "h_3/attn/c_attn": a pattern matches when it equals the path or a trailing run of its segments, with
shell wildcards (`*`, `?`, `[..]`) allowed, so "c_proj" names both attn/c_proj and mlp/c_proj, "attn/c_proj"
only the first, "h_0/mlp/c_fc" one layer. A pattern ending in /q, /k or /v names that third of the fused
c_attn kernel (columns [0, C), [C, 2C), [2C, 3C)). "all" names every kernel inside the blocks. The modern
switches' kernels are targets like any other: attn/c_q, attn/c_k, attn/c_v (a model with fused_qkv=False; its
grouped-query k and v are narrower than q) and mlp/c_gate (a gated MLP). A grouped-query model's fused c_attn
has unequal q/k/v parts and is adapted whole only.

Adapters are saved alone (`save_adapters`) or in peft's format (`save_peft` / `load_peft`, for
`peft.PeftModel.from_pretrained` on a transformers GPT-2). Both gather arrays sharded over several
processes first (`host_arrays`, a collective: call them on every process); only process 0 writes.

Dropout on the adapter input (peft's lora_dropout) is not offered.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.io import atomic, paths
from jaxgpt.io.checkpoint import restore_pytree
from jaxgpt.nn import weights
from jaxgpt.quantize import QuantizedArray

SLICES = ("q", "k", "v")  # thirds of the fused attn/c_attn kernel, in GPT-2's order
ALL_TARGETS = ("h_*/attn/c_*", "h_*/mlp/c_*")  # c_attn (or c_q, c_k, c_v), c_proj; c_fc, c_gate, c_proj
META_FILE = "lora.json"
ADAPTER_FILE = "adapters.safetensors"
ADAPTER_DIR = "adapters"  # orbax folder of the first format ("jaxgpt-lora-1"), still read


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Which weights get adapters, their rank and alpha, and the scaling rule.

    rank: r, the inner dimension of A [in, r] and B [r, out].
    alpha: the numerator of the scale (keep it != rank in tests: a scale of 1 hides scaling bugs).
    targets: path patterns (see the module docstring), e.g. ("attn/c_attn/q", "attn/c_attn/v").
    rank_stabilized: False -> scale = alpha / r (LoRA); True -> alpha / sqrt(r) (RsLoRA).
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("attn/c_attn",)
    rank_stabilized: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", (self.targets,))
        object.__setattr__(self, "targets", tuple(self.targets))
        if not isinstance(self.rank, (int, np.integer)) or isinstance(self.rank, bool) or self.rank <= 0:
            raise ValueError(f"LoraConfig.rank={self.rank!r} is not valid; use a positive integer")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) \
                or self.alpha <= 0:
            raise ValueError(f"LoraConfig.alpha={self.alpha!r} is not valid; use a positive number")
        if not self.targets or not all(isinstance(t, str) and t.strip("/") for t in self.targets):
            raise ValueError(f"LoraConfig.targets={self.targets!r} is not valid; use non-empty path patterns "
                             "such as ('attn/c_attn',) or ('attn/c_attn/q', 'attn/c_attn/v')")
        if not isinstance(self.rank_stabilized, bool):
            raise ValueError(f"LoraConfig.rank_stabilized={self.rank_stabilized!r} is not valid; use True or False")

    def replace(self, **changes: Any) -> "LoraConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {"rank": int(self.rank), "alpha": float(self.alpha), "targets": list(self.targets),
                "rank_stabilized": self.rank_stabilized}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LoraConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"LoraConfig: unknown fields {unknown}; known fields are {sorted(names)}")
        return cls(**d)


def lora_scale(cfg: LoraConfig) -> float:
    """alpha / r for LoRA, alpha / sqrt(r) for RsLoRA (the same numbers as peft's LoraLayer.scaling)."""
    return cfg.alpha / math.sqrt(cfg.rank) if cfg.rank_stabilized else cfg.alpha / cfg.rank


# ---------------------------------------------------------------------------------------------------------
# Resolving targets


@dataclasses.dataclass(frozen=True)
class Target:
    """One adapted weight: the module path in params, an optional q/k/v slice, and its [in, out] shape."""

    path: tuple[str, ...]  # module path, e.g. ("h_0", "attn", "c_attn"); the weight is path + ("kernel",)
    part: str | None  # None (whole kernel) or "q" | "k" | "v"
    fan_in: int
    fan_out: int

    @property
    def name(self) -> str:
        return "/".join(self.path + ((self.part,) if self.part else ()))

    @property
    def adapter_path(self) -> tuple[str, ...]:
        return self.path + ((self.part,) if self.part else ())


def _kernels(params: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Module path -> shape of every 2-D `kernel` leaf (arrays, ShapeDtypeStructs or quantized leaves)."""
    out: dict[tuple[str, ...], tuple[int, ...]] = {}

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, path + (str(k),))
        elif path and path[-1] == "kernel" and len(getattr(node, "shape", ())) == 2:
            out[path[:-1]] = tuple(int(s) for s in node.shape)

    walk(params, ())
    return out


def _matches(pattern: str, name: str) -> bool:
    """Whole-path or trailing-segments glob match ("c_attn" matches "h_0/attn/c_attn")."""
    pattern = pattern.strip("/")
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*/" + pattern)


def resolve_targets(params: Any, cfg: LoraConfig) -> list[Target]:
    """The weights `cfg.targets` names in `params`, checked: every pattern matches, no weight is named twice
    as a whole and as a slice, and the rank fits each weight (r <= min(in, out))."""
    kernels = _kernels(params)
    if not kernels:
        raise ValueError("params hold no 2-D 'kernel' weights to adapt; pass a GPT params pytree")
    patterns = [p for t in cfg.targets for p in (ALL_TARGETS if t == "all" else (t,))]
    chosen: dict[tuple[tuple[str, ...], str | None], Target] = {}
    for pattern in patterns:
        is_slice = pattern.strip("/").split("/")[-1] in SLICES
        hits = []
        for path, (fan_in, fan_out) in kernels.items():
            name = "/".join(path)
            if not is_slice:
                if _matches(pattern, name):
                    hits.append(Target(path, None, fan_in, fan_out))
            elif path[-1] == "c_attn":
                q_width = kernels.get(path[:-1] + ("c_proj",), (fan_out // 3,))[0]  # attn/c_proj is [H D, C]
                if 3 * q_width != fan_out:
                    raise ValueError(f"{name}/kernel [{fan_in}, {fan_out}] holds q [{q_width}] and narrower "
                                     "grouped-query k and v, not three equal parts; target the whole kernel, or "
                                     "build the model with fused_qkv=False and target attn/c_q, attn/c_k, attn/c_v")
                if fan_out % 3:
                    raise ValueError(f"{name}/kernel has {fan_out} outputs, not 3 equal q/k/v parts; "
                                     f"target the whole kernel instead of {pattern!r}")
                for part in SLICES:
                    if _matches(pattern, f"{name}/{part}"):
                        hits.append(Target(path, part, fan_in, fan_out // 3))
        if not hits:
            known = sorted({"/".join(p[1:] if p[0].startswith("h_") else p) for p in kernels})
            raise ValueError(f"LoRA target {pattern!r} matches no weight; weights are "
                             f"{', '.join(known)} (in every h_i) and attn/c_attn/q|k|v; fix the pattern")
        for t in hits:
            chosen[(t.path, t.part)] = t
    for (path, part) in chosen:
        if part is not None and (path, None) in chosen:
            raise ValueError(f"LoRA targets name {'/'.join(path)} both whole and as its {part} slice; "
                             "target either the fused kernel or its q/k/v slices, not both")
    targets = sorted(chosen.values(), key=lambda t: (t.path, t.part or ""))
    for t in targets:
        if cfg.rank > min(t.fan_in, t.fan_out):
            raise ValueError(f"LoRA rank {cfg.rank} exceeds min(in, out) = {min(t.fan_in, t.fan_out)} of {t.name} "
                             f"[{t.fan_in}, {t.fan_out}]; use rank <= {min(t.fan_in, t.fan_out)}")
    return targets


# ---------------------------------------------------------------------------------------------------------
# Pytree helpers (nested dicts, rebuilt functionally)


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    try:
        return weights.get_path(tree, path)
    except KeyError as e:
        raise ValueError(f"params have no {e.args[0]}; these adapters were made for another model; load them "
                         "onto the base they were trained on") from None


_set = weights.set_path


def _adapter_items(adapters: Any) -> list[tuple[tuple[str, ...], Mapping]]:
    """(adapter path, {"A", "B"}) for every adapter in the tree."""
    out: list[tuple[tuple[str, ...], Mapping]] = []

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if not isinstance(node, Mapping):
            raise ValueError(f"adapters/{'/'.join(path)} is not a dict of {{'A', 'B'}}; pass the tree from init_lora")
        if "A" in node or "B" in node:
            if set(node) != {"A", "B"}:
                raise ValueError(f"adapters/{'/'.join(path)} has keys {sorted(node)}; expected exactly 'A' and 'B'")
            out.append((path, node))
            return
        for k, v in node.items():
            walk(v, path + (str(k),))

    walk(adapters, ())
    if not out:
        raise ValueError("the adapters tree holds no {'A', 'B'} pairs; build it with init_lora")
    return out


def _split_adapter_path(path: tuple[str, ...]) -> tuple[tuple[str, ...], int | None]:
    """Adapter path -> (module path of the kernel, index of the q/k/v third or None)."""
    if len(path) >= 2 and path[-1] in SLICES and path[-2] == "c_attn":
        return path[:-1], SLICES.index(path[-1])
    return path, None


# ---------------------------------------------------------------------------------------------------------
# The transform


def init_lora(rng: jax.Array | int, params: Any, cfg: LoraConfig, dtype: Any = jnp.float32) -> dict:
    """Fresh adapters for the weights `cfg.targets` names: A [in, r] ~ U(-1/sqrt(in), 1/sqrt(in)) (peft's
    default, kaiming_uniform with a=sqrt(5) on its [r, in] weight), B [r, out] = 0, so apply_lora(params,
    init_lora(...)) equals params exactly at the start of fine-tuning."""
    if isinstance(rng, int):
        rng = jax.random.PRNGKey(rng)
    targets = resolve_targets(params, cfg)
    shapes = tuple((t.fan_in, cfg.rank) for t in targets)
    a_list = _uniform_fan_in(rng, shapes, jnp.dtype(dtype).name)
    adapters: dict = {}
    for t, a in zip(targets, a_list):
        adapters = _set(adapters, t.adapter_path, {"A": a, "B": jnp.zeros((cfg.rank, t.fan_out), dtype)})
    return adapters


@functools.partial(jax.jit, static_argnums=(1, 2))
def _uniform_fan_in(rng: jax.Array, shapes: tuple[tuple[int, int], ...], dtype: str) -> list[jax.Array]:
    """One U(-1/sqrt(in), 1/sqrt(in)) draw per [in, r] shape, all in one compiled program."""
    keys = jax.random.split(rng, len(shapes))
    return [jax.random.uniform(k, s, dtype, -1.0 / math.sqrt(s[0]), 1.0 / math.sqrt(s[0]))
            for k, s in zip(keys, shapes)]


def _group(adapters: Any) -> dict[tuple[str, ...], list[tuple]]:
    """Module path -> [(third or None, A, B), ...] in q, k, v order (a whole kernel: one item, third None)."""
    groups: dict[tuple[str, ...], list[tuple]] = {}
    for apath, ab in _adapter_items(adapters):
        mpath, third = _split_adapter_path(apath)
        groups.setdefault(mpath, []).append((third, ab["A"], ab["B"]))
    for mpath, items in groups.items():
        items.sort(key=lambda item: -1 if item[0] is None else item[0])
        if len(items) > 1 and items[0][0] is None:
            raise ValueError(f"adapters name {'/'.join(mpath)} both whole and as q/k/v slices; keep one of them")
    return groups


def _kernel_groups(params: Any, adapters: Any, cfg: LoraConfig) -> dict[tuple[str, ...], list[tuple]]:
    """_group(adapters), every adapter checked against its weight in params: rank, shapes, and that the
    kernel is a plain array or a quantized Dense kernel."""
    groups = _group(adapters)
    for mpath, items in groups.items():
        w = _get(params, mpath + ("kernel",))
        if isinstance(w, LoraWeight):
            raise ValueError(f"{'/'.join(mpath)}/kernel already carries LoRA adapters; wrap or merge the base "
                             "params, not params returned by wrap")
        if not (weights.is_array(w) or isinstance(w, jax.ShapeDtypeStruct) or
                (isinstance(w, QuantizedArray) and w.transposed)):
            raise ValueError(f"{'/'.join(mpath)}/kernel is a {type(w).__name__}; LoRA adapts float arrays or "
                             "quantized Dense kernels (jaxgpt.quantize); dequantize it first")
        for third, a, b in items:  # [in, r], [r, out]
            name = "/".join(mpath + ((SLICES[third],) if third is not None else ()))
            if a.ndim == 2 and a.shape[1] != cfg.rank:
                raise ValueError(f"adapter {name} has rank {a.shape[1]} but LoraConfig.rank is {cfg.rank}; pass "
                                 "the LoraConfig the adapters were made with (its scale depends on the rank)")
            fan_out = w.shape[1] // 3 if third is not None else w.shape[1]
            if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0] or \
                    (a.shape[0], b.shape[1]) != (w.shape[0], fan_out):
                raise ValueError(f"adapter {name} has A {tuple(a.shape)}, B {tuple(b.shape)}, which do not fit the "
                                 f"weight [{w.shape[0]}, {fan_out}]; load adapters onto the base they were made for")
    return groups


def _delta(a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """scale * A @ B in float32 [in, out]."""
    return scale * jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)


def _add_parts(w: Any, parts: list[tuple], scale: float, dtype: Any | None = None) -> jax.Array:
    """The float weight W + scale * A @ B on each part's columns (a quantized W dequantized), in W's dtype
    (or `dtype`)."""
    w32 = jnp.asarray(weights.dense(w), jnp.float32)  # [in, out]
    for third, a, b in parts:
        d = _delta(a, b, scale)  # [in, out] or [in, out / 3]
        w32 = w32 + d if third is None else w32.at[:, third * d.shape[1]:(third + 1) * d.shape[1]].add(d)
    return w32.astype(dtype or w.dtype)


# ---------------------------------------------------------------------------------------------------------
# Activation space: the LoraWeight leaf


@flax.struct.dataclass
class LoraWeight:
    """A frozen Dense kernel W [in, out] with adapters, multiplied as x @ W + scale * (x @ A) @ B.

    base: a float array [in, out] or a quantized Dense kernel (`QuantizedArray`); it is multiplied through
      `jaxgpt.nn.weights.matmul`, so it is never copied, upcast whole or dequantized beyond what its own
      product does.
    A, B: one [in, r] and one [r, out_part] per adapted part; parts[i] is None (all columns) or 0/1/2, the
      q/k/v third of a fused c_attn, so several slices of one kernel live in one leaf.
    """

    base: Any
    A: tuple[jax.Array, ...]
    B: tuple[jax.Array, ...]
    scale: float = flax.struct.field(pytree_node=False)
    parts: tuple[int | None, ...] = flax.struct.field(pytree_node=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape)

    @property
    def dtype(self) -> Any:
        return jnp.dtype(self.base.dtype)

    @property
    def ndim(self) -> int:
        return 2

    def matmul(self, x: jax.Array, dtype: Any) -> jax.Array:
        """x [..., in] -> x @ W + scale * (x @ A) @ B [..., out], in `dtype`."""
        y = weights.matmul(x, self.base, dtype)  # [..., out]
        x2 = x.reshape(-1, x.shape[-1]).astype(dtype)  # [N, in]: plain GEMMs for the adapter gradients
        a = self.A[0] if len(self.A) == 1 else jnp.concatenate(self.A, axis=1)  # [in, n * r]
        h = jnp.dot(x2, a.astype(dtype)) * jnp.asarray(self.scale, dtype)  # [N, n * r]
        r = self.A[0].shape[1]
        outs = [jnp.dot(h[:, i * r:(i + 1) * r], b.astype(dtype)) for i, b in enumerate(self.B)]  # [N, out_part]
        if self.parts == (None,):
            delta = outs[0]  # [N, out]
        else:
            third = self.shape[1] // 3
            by_part = dict(zip(self.parts, outs))
            zeros = jnp.zeros((x2.shape[0], third), outs[0].dtype)
            delta = jnp.concatenate([by_part.get(k, zeros) for k in range(3)], axis=1)  # [N, out]
        return y + delta.reshape(*x.shape[:-1], -1).astype(y.dtype)

    def embed(self, ids: jax.Array, dtype: Any) -> jax.Array:
        raise ValueError("LoRA adapts Dense kernels, not embedding tables; remove the embedding from the targets")

    def attend(self, x: jax.Array, dtype: Any) -> jax.Array:
        raise ValueError("LoRA adapts Dense kernels, not embedding tables; remove the embedding from the targets")

    def dequantize(self, dtype: Any | None = None) -> jax.Array:
        """The merged float weight W + scale * A @ B [in, out] (in W's dtype, or `dtype`)."""
        return _add_parts(self.base, list(zip(self.parts, self.A, self.B)), self.scale, dtype)


def wrap(params: Any, adapters: Any, cfg: LoraConfig) -> dict:
    """params with every adapted kernel replaced by a LoraWeight (activation-space LoRA); nothing is copied.

    For training: `jax.value_and_grad(loss)(adapters, params, batch)` where the loss applies the model to
    `wrap(params, adapters, cfg)`; gradients reach A and B only and never form an [in, out] array. The base
    may hold float32/bfloat16 arrays or quantized kernels (QLoRA); A and B keep their own dtype (float32).
    """
    scale = lora_scale(cfg)
    out = params
    for mpath, items in _kernel_groups(params, adapters, cfg).items():
        w = _get(params, mpath + ("kernel",))
        leaf = LoraWeight(base=w, A=tuple(a for _, a, _ in items), B=tuple(b for _, _, b in items), scale=scale,
                          parts=tuple(third for third, _, _ in items))
        out = _set(out, mpath + ("kernel",), leaf)
    return out


def is_wrapped(params: Any) -> bool:
    """True when params hold LoraWeight leaves (from wrap)."""
    return any(isinstance(x, LoraWeight) for x in weights.leaves(params))


# ---------------------------------------------------------------------------------------------------------
# Weight space: merge, unmerge, the reference


def _add_delta(params: Any, adapters: Any, cfg: LoraConfig, sign: float) -> dict:
    """params with W += sign * scale * A @ B at every adapter (the delta computed in float32, the result cast
    back to W's dtype; a quantized W is dequantized)."""
    out = params
    for mpath, items in _kernel_groups(params, adapters, cfg).items():
        w = _get(params, mpath + ("kernel",))
        out = _set(out, mpath + ("kernel",), _add_parts(w, items, sign * lora_scale(cfg)))
    return out


def apply_lora(params: Any, adapters: Any, cfg: LoraConfig) -> dict:
    """Effective params W + scale * A @ B for every adapted weight (weight space); everything else is passed
    through. The reference for `wrap`; training through it computes a full [in, out] gradient per adapted
    weight and, on a bfloat16 W, rounds small updates away (see docs/lora_rank.md): train with `wrap`.
    """
    return _add_delta(params, adapters, cfg, 1.0)


def merge(params: Any, adapters: Any, cfg: LoraConfig) -> dict:
    """Fold the adapters into the base for export or fast inference: the same numbers as apply_lora. A
    quantized base is dequantized (the merged kernel is float, in the base's original dtype)."""
    return _add_delta(params, adapters, cfg, 1.0)


def unmerge(merged: Any, adapters: Any, cfg: LoraConfig) -> dict:
    """The base back from merged params: W - scale * A @ B (exact up to float rounding of the weights)."""
    return _add_delta(merged, adapters, cfg, -1.0)


def split(merged: Any, base: Any, cfg: LoraConfig) -> dict:
    """Adapters back from merged params and their base: the rank-r SVD of (merged - base) / scale.

    For params produced by merge() this recovers A @ B exactly (up to rounding; A and B themselves are
    only defined up to an invertible r x r factor); for any other pair (say a full fine-tune) it gives the
    best rank-r approximation of the difference (Eckart-Young), i.e. LoRA extraction.
    """
    scale = lora_scale(cfg)
    adapters: dict = {}
    for t in resolve_targets(base, cfg):
        w0 = np.asarray(_get(base, t.path + ("kernel",)), np.float64)
        w1 = np.asarray(_get(merged, t.path + ("kernel",)), np.float64)
        if w0.shape != w1.shape:
            raise ValueError(f"{t.name}: merged kernel {w1.shape} and base kernel {w0.shape} differ; "
                             "pass the base the merged params were made from")
        if t.part is not None:
            sl = slice(SLICES.index(t.part) * t.fan_out, (SLICES.index(t.part) + 1) * t.fan_out)
            w0, w1 = w0[:, sl], w1[:, sl]
        u, s, vt = np.linalg.svd((w1 - w0) / scale, full_matrices=False)
        root = np.sqrt(s[:cfg.rank])
        a = (u[:, :cfg.rank] * root).astype(np.float32)  # [in, r]
        b = (root[:, None] * vt[:cfg.rank]).astype(np.float32)  # [r, out]
        leaf = {"A": jnp.asarray(a), "B": jnp.asarray(b)}
        adapters = _set(adapters, t.adapter_path, leaf)
    return adapters


def lora_param_count(params: Any, cfg: LoraConfig) -> dict[str, Any]:
    """Trainable adapter scalars for `cfg` on `params` (arrays or jax.eval_shape structs) and their fraction
    of the base model: {"trainable", "total" (the base's parameters), "fraction", "per_target"}."""
    targets = resolve_targets(params, cfg)
    per_target = {t.name: cfg.rank * (t.fan_in + t.fan_out) for t in targets}
    trainable = sum(per_target.values())
    total = weights.count_params(params)
    return {"trainable": trainable, "total": total, "fraction": trainable / total, "per_target": per_target}


# ---------------------------------------------------------------------------------------------------------
# Saving adapters alone


def host_arrays(tree: Any) -> Any:
    """tree with every array as a NumPy array on this host, ready to write (`jaxgpt.sharding.gather_to_host`:
    arrays sharded over several processes are all-gathered, a collective every process must join)."""
    from jaxgpt.sharding import gather_to_host

    return gather_to_host(tree)


def _storable(x: np.ndarray) -> np.ndarray:
    """A contiguous array safetensors can hold (bfloat16 and other non-NumPy floats as float32)."""
    dtype = x.dtype if x.dtype in (np.float16, np.float32, np.float64) else np.float32
    return np.ascontiguousarray(x, dtype)


def save_adapters(path: str | os.PathLike, adapters: Any, cfg: LoraConfig, *, force: bool = False) -> Path:
    """Write adapters (path/adapters.safetensors, keys like "h_0/attn/c_attn/q/A") plus path/lora.json (the
    LoraConfig and the base's kernel shapes). Written to a temporary folder and renamed into place, so an
    interrupted save never leaves a half-written folder where a good one was. Multi-host: call on every
    process (sharded adapters are gathered); process 0 writes."""
    from safetensors.numpy import save_file

    path = paths.absolute(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} already exists; pick a new path or pass force=True to replace it")
    adapters = host_arrays(adapters)
    shapes, tensors = {}, {}
    for apath, ab in _adapter_items(adapters):
        a, b = ab["A"], ab["B"]
        if a.shape[1] != cfg.rank or b.shape[0] != cfg.rank:
            raise ValueError(f"adapter {'/'.join(apath)} has rank {a.shape[1]}, the LoraConfig says {cfg.rank}; "
                             "save with the config the adapters were made with")
        mpath, third = _split_adapter_path(apath)
        fan_out = b.shape[1] * (3 if third is not None else 1)
        name = "/".join(apath)
        shapes[name] = {"kernel": "/".join(mpath) + "/kernel", "shape": [int(a.shape[0]), int(fan_out)],
                        "dtype": str(jnp.dtype(a.dtype))}
        tensors[name + "/A"], tensors[name + "/B"] = _storable(a), _storable(b)
    meta = {"format": "jaxgpt-lora-2", "lora": cfg.to_dict(), "base_kernels": shapes}
    if jax.process_index() == 0:
        with atomic.directory(path, force=force) as tmp:
            save_file(tensors, str(tmp / ADAPTER_FILE))
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    return path


def _read_folder(path: str | os.PathLike, params: Any, read: Callable[[Path, Any], Any]) -> Any:
    """read(local folder, params) on `path`, a local folder or a bucket URL (read from a local copy; errors name
    the URL)."""
    from jaxgpt.io import paths

    with paths.local_folder(path) as local:
        try:
            return read(local, params)
        except (FileNotFoundError, ValueError) as e:
            if not paths.is_url(path):
                raise
            raise type(e)(str(e).replace(str(local), os.fspath(path))) from None


def load_adapters(path: str | os.PathLike, params: Any) -> tuple[dict, LoraConfig]:
    """(adapters, LoraConfig) saved by save_adapters, after checking they fit `params` (the base); `path` may be
    a bucket URL."""
    return _read_folder(path, params, _load_adapters)


def _load_adapters(path: Path, params: Any) -> tuple[dict, LoraConfig]:
    from safetensors.numpy import load_file

    meta_file = path / META_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(f"{meta_file} does not exist; pass a folder written by save_adapters")
    try:
        meta = json.loads(meta_file.read_text())
        cfg = LoraConfig.from_dict(meta["lora"])
        shapes = meta["base_kernels"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{meta_file} is not a LoRA adapter description ({e}); re-save the adapters") from e
    kernels = _kernels(params)
    target: dict = {}
    for name, info in shapes.items():
        apath = tuple(name.split("/"))
        mpath, third = _split_adapter_path(apath)
        want = tuple(info["shape"])
        have = kernels.get(mpath)
        if have != want:
            got = "no such weight" if have is None else f"{list(have)}"
            raise ValueError(f"adapters in {path} were made for a base whose {info['kernel']} is {list(want)}; this "
                             f"base has {got}; load them onto a base of the same shape")
        fan_out = want[1] // 3 if third is not None else want[1]
        dtype = jnp.dtype(info.get("dtype", "float32"))
        leaf = {"A": jax.ShapeDtypeStruct((want[0], cfg.rank), dtype),
                "B": jax.ShapeDtypeStruct((cfg.rank, fan_out), dtype)}
        target = _set(target, apath, leaf)
    if not (path / ADAPTER_FILE).is_file():  # the first format: an orbax folder
        return restore_pytree(path / ADAPTER_DIR, target), cfg
    stored = load_file(str(path / ADAPTER_FILE))

    def read(p: tuple[Any, ...], s: jax.ShapeDtypeStruct) -> jax.Array:
        key = weights.path_str(p)
        if key not in stored or stored[key].shape != s.shape:
            raise ValueError(f"{path / ADAPTER_FILE} lacks {key} {list(s.shape)} that {META_FILE} lists; "
                             "the folder is corrupt, re-save the adapters")
        return jnp.asarray(stored[key], s.dtype)

    return jax.tree_util.tree_map_with_path(read, target), cfg


# ---------------------------------------------------------------------------------------------------------
# peft's adapter format (PeftModel.from_pretrained on a transformers GPT2LMHeadModel)
#
# peft adapts a whole Conv1D module: lora_A.weight [r, in], lora_B.weight [out, r] (nn.Linear layout, the
# transposes of our A and B), scaling lora_alpha / r or / sqrt(r). A jaxgpt q/k/v-sliced c_attn is written
# exactly as one rank n*r adapter of the fused c_attn: A = [A_q | A_v], B block-diagonal with zero blocks for
# the columns no slice adapts, and its rank and alpha in rank_pattern / alpha_pattern so the scale is kept.

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
_HF_BLOCK_KERNELS = ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj")
_PEFT_KEY = re.compile(r"(?:base_model\.model\.)?transformer\.h\.(\d+)\.(attn|mlp)\.(c_attn|c_proj|c_fc)"
                       r"\.lora_([AB])(?:\.default)?\.weight")


def _hf_name(mpath: tuple[str, ...], family: str = "gpt2") -> str:
    """("h_0", "attn", "c_attn") -> "transformer.h.0.attn.c_attn"; refuses weights peft's GPT-2 lacks. Another
    family (llama, qwen2, qwen3) takes its names from jaxgpt.io.hf_families ("model.layers.0.self_attn.q_proj")."""
    if family != "gpt2":
        from jaxgpt.io import hf_families

        name = hf_families.peft_module_name(mpath)
        if name is None:
            raise ValueError(f"LoRA on {'/'.join(mpath)} has no peft equivalent on a transformers {family} (only "
                             f"h_i/{', h_i/'.join('/'.join(k) for k in hf_families.PEFT_NAMES)} map); drop it from "
                             "the targets to export to peft")
        return name
    m = re.fullmatch(r"h_(\d+)", mpath[0]) if len(mpath) == 3 else None
    if m is None or "/".join(mpath[1:]) not in _HF_BLOCK_KERNELS:
        raise ValueError(f"LoRA on {'/'.join(mpath)} has no peft equivalent on a transformers GPT-2 (its head is "
                         "tied to wte; only h_i/attn/c_attn|c_proj and h_i/mlp/c_fc|c_proj map); drop it from the "
                         "targets to export to peft")
    return f"transformer.h.{m.group(1)}.{mpath[1]}.{mpath[2]}"


def _peft_tensors(mpath: tuple[str, ...], items: list[tuple], cfg: LoraConfig) -> tuple[np.ndarray, np.ndarray]:
    """One kernel's adapters as peft's (A [in, n r], B [n r, out]): slices become one block-diagonal B."""
    if items[0][0] is None:
        return np.asarray(items[0][1], np.float32), np.asarray(items[0][2], np.float32)
    r, part = cfg.rank, items[0][2].shape[1]
    a = np.concatenate([np.asarray(a_i, np.float32) for _, a_i, _ in items], axis=1)  # [in, n r]
    b = np.zeros((len(items) * r, 3 * part), np.float32)  # [n r, 3 part]
    for i, (third, _, b_i) in enumerate(items):
        b[i * r:(i + 1) * r, third * part:(third + 1) * part] = np.asarray(b_i, np.float32)
    return a, b


def save_peft(path: str | os.PathLike, adapters: Any, cfg: LoraConfig, *, base_model_name_or_path: str | None = None,
              force: bool = False, family: str = "gpt2") -> Path:
    """Write adapter_model.safetensors + adapter_config.json that `peft.PeftModel.from_pretrained` loads onto a
    transformers GPT2LMHeadModel (the base exported with jaxgpt.io.hf.export_hf_gpt2) with the same
    logits. Every target maps, q/k/v slices included (see above); an untied lm_head does not and is refused.
    Multi-host: call on every process; process 0 writes. family "llama" (or "qwen2", "qwen3": the same
    names) writes peft's module names on a transformers Llama (q_proj, ..., down_proj) instead."""
    from safetensors.numpy import save_file

    path = paths.absolute(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} already exists; pick a new path or pass force=True to replace it")
    adapters = host_arrays(adapters)
    scale = lora_scale(cfg)
    tensors, rank_pattern, alpha_pattern = {}, {}, {}
    for mpath, items in _group(adapters).items():
        name = _hf_name(mpath, family)
        if any(a.shape[1] != cfg.rank for _, a, _ in items):
            raise ValueError(f"adapters of {'/'.join(mpath)} do not have LoraConfig.rank {cfg.rank}; save with the "
                             "config the adapters were made with")
        a, b = _peft_tensors(mpath, items, cfg)
        if a.shape[1] != cfg.rank:
            rank_pattern[name] = int(a.shape[1])
            alpha_pattern[name] = scale * (math.sqrt(a.shape[1]) if cfg.rank_stabilized else a.shape[1])
        tensors[f"base_model.model.{name}.lora_A.weight"] = np.ascontiguousarray(a.T)  # [n r, in]
        tensors[f"base_model.model.{name}.lora_B.weight"] = np.ascontiguousarray(b.T)  # [out, n r]
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": int(cfg.rank), "lora_alpha": float(cfg.alpha), "use_rslora": cfg.rank_stabilized,
        "target_modules": sorted(_hf_name(m, family) for m in _group(adapters)), "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern, "fan_in_fan_out": family == "gpt2", "lora_dropout": 0.0, "bias": "none",
        "use_dora": False, "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
    }
    if jax.process_index() == 0:
        with atomic.directory(path, force=force) as tmp:
            meta = {"format": "pt", "jaxgpt_lora": json.dumps(cfg.to_dict())}  # peft reads "format" only
            save_file(tensors, str(tmp / PEFT_WEIGHTS), metadata=meta)
            (tmp / PEFT_CONFIG).write_text(json.dumps(peft_config, indent=2, sort_keys=True))
    return path


def _read_peft_config(path: Path) -> dict[str, Any]:
    """adapter_config.json, refusing what jaxgpt's LoRA cannot represent."""
    f = path / PEFT_CONFIG
    if not f.is_file() or not (path / PEFT_WEIGHTS).is_file():
        raise FileNotFoundError(f"{path} lacks {PEFT_CONFIG} or {PEFT_WEIGHTS}; pass a folder written by peft's "
                                "save_pretrained or save_peft")
    conf = json.loads(f.read_text())
    refuse = [(conf.get("peft_type") != "LORA", f"peft_type {conf.get('peft_type')!r} (only LORA)"),
              (bool(conf.get("use_dora")), "use_dora=True (DoRA)"),
              (conf.get("bias", "none") != "none" or bool(conf.get("lora_bias")), "trained biases"),
              (bool(conf.get("modules_to_save")), f"modules_to_save={conf.get('modules_to_save')}"),
              (bool(conf.get("layer_replication")), "layer_replication")]
    for bad, what in refuse:
        if bad:
            raise ValueError(f"{f} uses {what}, which jaxgpt's LoRA does not support; export plain LoRA adapters")
    return conf


def _pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """peft's rank_pattern / alpha_pattern lookup: the first key that matches the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _read_peft_modules(path: Path) -> dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]]:
    """Module path -> (A [in, r], B [r, out]) from adapter_model.safetensors (peft on a GPT-2 or a Llama)."""
    from safetensors.numpy import load_file

    from jaxgpt.io.hf_families import peft_module_path

    found: dict[tuple[str, ...], dict[str, np.ndarray]] = {}
    for key, t in load_file(str(path / PEFT_WEIGHTS)).items():
        m, llama = _PEFT_KEY.fullmatch(key), peft_module_path(key)
        if m is None and llama is None:
            raise ValueError(f"{path / PEFT_WEIGHTS} holds {key!r}, which is not a LoRA adapter of a GPT-2 block "
                             "kernel (c_attn, c_proj, c_fc) or a Llama one (q/k/v/o_proj, gate/up/down_proj); jaxgpt "
                             "loads adapters of those only")
        mpath, ab = ((f"h_{m.group(1)}", m.group(2), m.group(3)), m.group(4)) if m else llama
        found.setdefault(mpath, {})[ab] = np.asarray(t, np.float32).T  # A [in, r], B [r, out]
    if any(set(ab) != {"A", "B"} for ab in found.values()) or not found:
        raise ValueError(f"{path / PEFT_WEIGHTS} lacks a lora_A or lora_B weight; the adapter file is incomplete")
    return {mpath: (ab["A"], ab["B"]) for mpath, ab in sorted(found.items())}


def _peft_as_slices(modules: dict, cfg: LoraConfig, params: Any) -> dict | None:
    """The adapters save_peft wrote for `cfg` (slices back out of block-diagonal B), or None when the
    tensors no longer have that exact layout (say trained further by peft, which fills the zero blocks)."""
    targets = resolve_targets(params, cfg)
    if {t.path for t in targets} != set(modules):
        return None
    adapters: dict = {}
    for t in targets:
        a, b = modules[t.path]
        parts = sorted(SLICES.index(u.part) for u in targets if u.path == t.path and u.part is not None)
        i = parts.index(SLICES.index(t.part)) if t.part is not None else 0
        r, n = cfg.rank, max(len(parts), 1)
        if a.shape[1] != n * r:
            return None
        k = SLICES.index(t.part) if t.part is not None else 0
        cols = slice(None) if t.part is None else slice(k * t.fan_out, (k + 1) * t.fan_out)
        rows_b = b[i * r:(i + 1) * r]
        if t.part is not None and np.any(np.delete(rows_b, np.arange(b.shape[1])[cols], axis=1)):
            return None
        adapters = _set(adapters, t.adapter_path, {"A": jnp.asarray(a[:, i * r:(i + 1) * r]),
                                                   "B": jnp.asarray(rows_b[:, cols])})
    return adapters


def _peft_as_whole(modules: dict, conf: Mapping[str, Any]) -> tuple[dict, LoraConfig]:
    """Whole-kernel adapters at one rank R (the largest) and scale: a module of rank r < R gets zero columns
    of A and rows of B, and its B is multiplied by its scale / the common one (exact up to one rounding)."""
    rs, alpha = bool(conf.get("use_rslora", False)), float(conf["lora_alpha"])
    scale_of = lambda r, al: al / (math.sqrt(r) if rs else r)  # noqa: E731
    rank = max(a.shape[1] for a, _ in modules.values())
    common = scale_of(rank, alpha)
    adapters: dict = {}
    family = "llama" if any(m[1:] in _LLAMA_ONLY for m in modules) or _is_llama_peft(conf) else "gpt2"
    for mpath, (a, b) in modules.items():
        r = a.shape[1]
        own = scale_of(r, float(_pattern_value(conf.get("alpha_pattern") or {}, _hf_name(mpath, family), alpha)))
        if own != common:
            b = (b.astype(np.float64) * (own / common)).astype(np.float32)
        a = np.pad(a, ((0, 0), (0, rank - r)))  # [in, R]
        b = np.pad(b, ((0, rank - r), (0, 0)))  # [R, out]
        adapters = _set(adapters, mpath, {"A": jnp.asarray(a), "B": jnp.asarray(b)})
    cfg = LoraConfig(rank=rank, alpha=alpha, targets=tuple("/".join(m) for m in modules), rank_stabilized=rs)
    return adapters, cfg


_LLAMA_ONLY = {("attn", "c_q"), ("attn", "c_k"), ("attn", "c_v"), ("mlp", "c_gate")}


def _is_llama_peft(conf: Mapping[str, Any]) -> bool:
    """Whether adapter_config.json names Llama modules (model.layers.i..., or bare q_proj, down_proj, ...)."""
    names = conf.get("target_modules") or []
    names = [names] if isinstance(names, str) else names
    return any(re.search(r"(^|\.)(model\.layers\.|(q|k|v|o|gate|up|down)_proj$)", n) for n in names)


def load_peft(path: str | os.PathLike, params: Any) -> tuple[dict, LoraConfig]:
    """(adapters, LoraConfig) from a peft LoRA folder for a GPT-2 (save_pretrained, or save_peft) that fit
    `params`: wrap(params, adapters, cfg) gives peft's logits. Folders save_peft wrote come back with their
    q/k/v slices; any other becomes whole-kernel adapters at the largest rank (see _peft_as_whole). `path` may
    be a bucket URL."""
    return _read_folder(path, params, _load_peft)


def _load_peft(path: Path, params: Any) -> tuple[dict, LoraConfig]:
    from safetensors import safe_open

    conf = _read_peft_config(path)
    modules = _read_peft_modules(path)
    with safe_open(str(path / PEFT_WEIGHTS), "np") as f:
        ours = (f.metadata() or {}).get("jaxgpt_lora")
    adapters = None
    if ours:
        cfg = LoraConfig.from_dict(json.loads(ours))
        adapters = _peft_as_slices(modules, cfg, params)
    if adapters is None:
        adapters, cfg = _peft_as_whole(modules, conf)
    resolve_targets(params, cfg)
    _kernel_groups(params, adapters, cfg)  # every adapter fits its weight, or a clear error
    return adapters, cfg
