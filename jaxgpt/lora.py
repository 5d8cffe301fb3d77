"""LoRA and RsLoRA as pure transforms of the params pytree (Hu et al. 2021; Kalajdzievski 2023).

A frozen weight W [in, out] is adapted as W + scale * A @ B with A [in, r] and B [r, out]; scale is
alpha / r (LoRA) or alpha / sqrt(r) (rank-stabilized LoRA). The adapters live in their own pytree that
mirrors the params:

    {"h_0": {"attn": {"c_attn": {"A": [C, r], "B": [r, 3C]}}}}           # whole fused c_attn (as peft)
    {"h_0": {"attn": {"c_attn": {"q": {"A": [C, r], "B": [r, C]},         # q and v slices, each with
                                 "v": {"A": [C, r], "B": [r, C]}}}}}      # its own A and B

so a training loss is `loss(adapters, params, batch) = model.apply({"params": apply_lora(params, adapters,
cfg)}, ...)`, differentiated w.r.t. `adapters` only: the base is closed over and never enters the
optimizer. The model code knows nothing of LoRA.

Targets are path patterns over the params pytree, matched against each 2-D `kernel`'s module path such
as "h_3/attn/c_attn": a pattern matches when it equals the path or a trailing run of its segments, with
shell wildcards (`*`, `?`, `[..]`) allowed, so "c_proj" names both attn/c_proj and mlp/c_proj, "attn/c_proj"
only the first, "h_0/mlp/c_fc" one layer. A pattern ending in /q, /k or /v names that third of the fused
c_attn kernel (columns [0, C), [C, 2C), [2C, 3C)). "all" names every kernel inside the blocks.

Dropout on the adapter input (peft's lora_dropout) acts on activations, not weights, so it has no place
in a weight transform and is not offered.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt import atomic, weights
from jaxgpt.checkpoint import restore_pytree, save_pytree

SLICES = ("q", "k", "v")  # thirds of the fused attn/c_attn kernel, in GPT-2's order
ALL_TARGETS = ("h_*/attn/c_attn", "h_*/attn/c_proj", "h_*/mlp/c_fc", "h_*/mlp/c_proj")
META_FILE = "lora.json"
ADAPTER_DIR = "adapters"


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
    return [jax.random.uniform(k, s, dtype, -1.0 / math.sqrt(s[0]), 1.0 / math.sqrt(s[0])) for k, s in zip(keys, shapes)]


def _add_delta(params: Any, adapters: Any, cfg: LoraConfig, sign: float) -> dict:
    """params with W += sign * scale * A @ B at every adapter (the delta computed in float32)."""
    scale = lora_scale(cfg)
    out = params
    for apath, ab in _adapter_items(adapters):
        mpath, third = _split_adapter_path(apath)
        w = _get(out, mpath + ("kernel",))  # out: two slices of one kernel both land
        if not isinstance(w, (jax.Array, np.ndarray)):
            raise ValueError(f"{'/'.join(mpath)}/kernel is a {type(w).__name__}, not an array; LoRA needs a "
                             "dense base: apply LoRA before quantizing, or dequantize first")
        a, b = ab["A"], ab["B"]  # [in, r], [r, out]
        if a.ndim == 2 and a.shape[1] != cfg.rank:
            raise ValueError(f"adapter {'/'.join(apath)} has rank {a.shape[1]} but LoraConfig.rank is {cfg.rank}; "
                             "pass the LoraConfig the adapters were made with (its scale depends on the rank)")
        fan_out = w.shape[1] // 3 if third is not None else w.shape[1]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0] or (a.shape[0], b.shape[1]) != (w.shape[0], fan_out):
            raise ValueError(f"adapter {'/'.join(apath)} has A {tuple(a.shape)}, B {tuple(b.shape)}, which do not fit "
                             f"the weight [{w.shape[0]}, {fan_out}]; load adapters onto the base they were made for")
        delta = (sign * scale) * jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32),
                                         precision=jax.lax.Precision.HIGHEST)  # [in, out]
        w32 = jnp.asarray(w, jnp.float32)
        if third is None:
            new = w32 + delta
        else:
            new = w32.at[:, third * fan_out:(third + 1) * fan_out].add(delta)
        out = _set(out, mpath + ("kernel",), new.astype(w.dtype))
    return out


def apply_lora(params: Any, adapters: Any, cfg: LoraConfig) -> dict:
    """Effective params W + scale * A @ B for every adapted weight; everything else is passed through.

    Use inside the jitted loss with the base closed over, so gradients reach the adapters only.
    """
    return _add_delta(params, adapters, cfg, 1.0)


def merge(params: Any, adapters: Any, cfg: LoraConfig) -> dict:
    """Fold the adapters into the base for export or fast inference: the same numbers as apply_lora."""
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


def save_adapters(path: str | os.PathLike, adapters: Any, cfg: LoraConfig, *, force: bool = False) -> Path:
    """Write adapters (orbax, under path/adapters) plus path/lora.json (the LoraConfig and the base's kernel
    shapes). Everything is written to a temporary folder and renamed into place, so an interrupted save
    never leaves a half-written folder where a good one was."""
    path = Path(path).absolute()
    if path.exists() and not force:
        raise FileExistsError(f"{path} already exists; pick a new path or pass force=True to replace it")
    shapes = {}
    for apath, ab in _adapter_items(adapters):
        a, b = ab["A"], ab["B"]
        if a.shape[1] != cfg.rank or b.shape[0] != cfg.rank:
            raise ValueError(f"adapter {'/'.join(apath)} has rank {a.shape[1]}, the LoraConfig says {cfg.rank}; "
                             "save with the config the adapters were made with")
        mpath, third = _split_adapter_path(apath)
        fan_out = b.shape[1] * (3 if third is not None else 1)
        shapes["/".join(apath)] = {"kernel": "/".join(mpath) + "/kernel", "shape": [int(a.shape[0]), int(fan_out)],
                                   "dtype": str(jnp.dtype(a.dtype))}
    meta = {"format": "jaxgpt-lora-1", "lora": cfg.to_dict(), "base_kernels": shapes}
    with atomic.directory(path, force=force) as tmp:
        save_pytree(tmp / ADAPTER_DIR, jax.device_get(adapters))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    return path


def load_adapters(path: str | os.PathLike, params: Any) -> tuple[dict, LoraConfig]:
    """(adapters, LoraConfig) saved by save_adapters, after checking they fit `params` (the base)."""
    path = Path(path).absolute()
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
    adapters = restore_pytree(path / ADAPTER_DIR, target)
    return adapters, cfg
