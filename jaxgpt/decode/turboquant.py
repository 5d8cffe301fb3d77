"""TurboQuant: online vector quantization at 1-4 bits per coordinate (Zandieh et al., arXiv 2504.19874).

A codec with no model knowledge. Two quantizers of vectors x in R^d:

- TurboQuant_mse (`MSECodec`): store ||x||, rotate the unit vector u = x/||x|| by a random orthogonal
  matrix Pi (QR of a Gaussian matrix). Each coordinate of Pi u then follows the law of one coordinate of a
  uniform point on the sphere S^{d-1}, f_d(t) ∝ (1 - t^2)^((d-3)/2) on [-1, 1] (close to N(0, 1/d)), and
  coordinates are nearly independent, so a scalar Lloyd-Max codebook for f_d, applied per coordinate, is
  near-optimal. Indices are bit-packed; dequantization is codebook lookup, inverse rotation, times the norm.
  E||u - u_hat||^2 = d * (per-coordinate Lloyd-Max distortion): about 0.363, 0.117, 0.0345, 0.0095 at
  b = 1..4 (the paper rounds these to 0.36, 0.117, 0.03, 0.009).
- TurboQuant_prod (`ProdCodec`): the (b-1)-bit MSE quantizer, then a 1-bit QJL sketch of the residual
  r = u - u_hat: signs of S r with S a d x d standard Gaussian matrix, plus ||r||. Dequantized as
  u_hat + sqrt(pi/2)/d * ||r|| * S^T sign(S r), which makes <y, x_tilde> an unbiased estimate of <y, x>
  with variance (pi/2 ||r||^2 ||y||^2 - <r, y>^2)/d (the paper's Theorem 2 bounds it by
  sqrt(3) pi^2 ||y||^2 / (d 4^b)).

Codebooks are computed here by Lloyd iterations with Gauss-Legendre integration in float64 and cached per
(d, bits) with `functools.lru_cache` (pure results). Random matrices come from a seeded NumPy generator,
so a codec is a pure function of (d, bits, seed).
"""

from __future__ import annotations

import functools
import math
import statistics
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

MAX_BITS = 4


# ---------------------------------------------------------------------------------------------------------
# The coordinate law of a rotated unit vector and its Lloyd-Max codebook


def _check_dim_bits(d: int, bits: int, low: int = 1) -> None:
    if not isinstance(d, int) or d < 3:
        raise ValueError(f"turboquant: dimension d={d!r} is not supported; use an integer d >= 3")
    if not isinstance(bits, int) or not low <= bits <= MAX_BITS:
        raise ValueError(f"turboquant: bits={bits!r} is not supported; use an integer in {low}..{MAX_BITS}")


def coordinate_pdf(t: np.ndarray, d: int) -> np.ndarray:
    """Density of one coordinate of a uniform unit vector in R^d: Γ(d/2)/(√π Γ((d-1)/2)) (1-t²)^((d-3)/2)."""
    t = np.asarray(t, np.float64)
    log_c = math.lgamma(d / 2) - 0.5 * math.log(math.pi) - math.lgamma((d - 1) / 2)
    with np.errstate(divide="ignore"):
        return np.exp(log_c + 0.5 * (d - 3) * np.log1p(-t * t)) * (np.abs(t) < 1)


class Codebook(NamedTuple):
    """A symmetric scalar quantizer: sorted centroids, the thresholds between them, its distortion."""

    centroids: tuple[float, ...]  # 2^bits values, ascending
    thresholds: tuple[float, ...]  # 2^bits - 1 midpoints between neighbouring centroids
    distortion: float  # E||u - u_hat||^2 for a unit vector u: d x the per-coordinate mean squared error


@functools.lru_cache(maxsize=None)
def lloyd_max_codebook(d: int, bits: int) -> Codebook:
    """The Lloyd-Max codebook at `bits` bits for `coordinate_pdf(., d)`, by Lloyd iterations in float64.

    Each interval integral uses 128-point Gauss-Legendre quadrature; the domain is cut at
    min(1, 14/sqrt(d)), beyond which the mass is below 1e-40. Iterates until centroids move < 1e-13.
    """
    _check_dim_bits(d, bits)
    n = 2**bits
    limit = min(1.0, 14.0 / math.sqrt(d))
    nodes, weights = np.polynomial.legendre.leggauss(128)

    def moments(edges: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        half = 0.5 * (edges[1:] - edges[:-1])  # [n]
        mid = 0.5 * (edges[1:] + edges[:-1])
        t = mid[:, None] + half[:, None] * nodes[None, :]  # [n, 128]
        w = half[:, None] * weights[None, :] * coordinate_pdf(t, d)
        return w.sum(1), (w * t).sum(1), (w * t * t).sum(1)

    # start from the quantiles of the Gaussian approximation N(0, 1/d)
    gauss = statistics.NormalDist(0.0, 1.0 / math.sqrt(d))
    c = np.clip([gauss.inv_cdf((i + 0.5) / n) for i in range(n)], -0.99 * limit, 0.99 * limit)
    for _ in range(100_000):
        edges = np.concatenate([[-limit], 0.5 * (c[1:] + c[:-1]), [limit]])
        m0, m1, _m2 = moments(edges)
        new = m1 / m0
        new = 0.5 * (new - new[::-1])  # the law is symmetric; keep the codebook exactly symmetric
        moved = np.max(np.abs(new - c))
        c = new
        if moved < 1e-13:
            break
    else:  # pragma: no cover - Lloyd converges for these log-concave laws
        raise RuntimeError(f"lloyd_max_codebook(d={d}, bits={bits}) did not converge")
    edges = np.concatenate([[-limit], 0.5 * (c[1:] + c[:-1]), [limit]])
    m0, m1, m2 = moments(edges)
    mse = float(np.sum(m2 - 2 * c * m1 + c * c * m0))  # per coordinate
    return Codebook(tuple(float(x) for x in c), tuple(float(x) for x in edges[1:-1]), d * mse)


# ---------------------------------------------------------------------------------------------------------
# Bit packing: b-bit indices as a little-endian bit stream in uint8 bytes


def _groups(bits: int) -> tuple[int, int]:
    """(values, bytes) per packing group: the smallest run of b-bit values that fills whole bytes."""
    g = math.gcd(bits, 8)
    return 8 // g, bits // g


def packed_size(n: int, bits: int) -> int:
    """Bytes that `pack_bits` uses for n values of `bits` bits: ceil(n*bits/8) when 8 divides n."""
    vals, nbytes = _groups(bits)
    return -(-n // vals) * nbytes


def pack_bits(idx: jax.Array, bits: int) -> jax.Array:
    """Pack integers in [0, 2^bits) along the last axis: [..., n] -> uint8 [..., packed_size(n, bits)].

    Value i occupies bits [i*bits, (i+1)*bits) of the stream, least significant bit first (the layout of
    `np.packbits(..., bitorder="little")` applied to each value's little-endian bits).
    """
    if not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"pack_bits: bits={bits!r} is not supported; use 1..{MAX_BITS}")
    idx = jnp.asarray(idx)
    *lead, n = idx.shape
    vals, nbytes = _groups(bits)
    groups = -(-n // vals)
    x = jnp.pad(idx.astype(jnp.uint32), [(0, 0)] * len(lead) + [(0, groups * vals - n)])
    x = x.reshape(*lead, groups, vals)  # [..., G, vals]
    word = jnp.sum(x << (bits * jnp.arange(vals, dtype=jnp.uint32)), axis=-1, dtype=jnp.uint32)  # [..., G]
    out = (word[..., None] >> (8 * jnp.arange(nbytes, dtype=jnp.uint32))) & 0xFF  # [..., G, nbytes]
    return out.reshape(*lead, groups * nbytes).astype(jnp.uint8)


def unpack_bits(packed: jax.Array, bits: int, n: int) -> jax.Array:
    """Inverse of `pack_bits`: uint8 [..., packed_size(n, bits)] -> uint8 [..., n]."""
    if not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"unpack_bits: bits={bits!r} is not supported; use 1..{MAX_BITS}")
    packed = jnp.asarray(packed)
    *lead, m = packed.shape
    if m != packed_size(n, bits):
        raise ValueError(f"unpack_bits: last axis has {m} bytes but {n} values of {bits} bits take "
                         f"{packed_size(n, bits)}; pass the n used when packing")
    vals, nbytes = _groups(bits)
    groups = m // nbytes
    b = packed.astype(jnp.uint32).reshape(*lead, groups, nbytes)
    word = jnp.sum(b << (8 * jnp.arange(nbytes, dtype=jnp.uint32)), axis=-1, dtype=jnp.uint32)  # [..., G]
    x = (word[..., None] >> (bits * jnp.arange(vals, dtype=jnp.uint32))) & (2**bits - 1)  # [..., G, vals]
    return x.reshape(*lead, groups * vals)[..., :n].astype(jnp.uint8)


# ---------------------------------------------------------------------------------------------------------
# Random matrices (seeded NumPy, so codecs are reproducible outside any JAX key plumbing)


def random_rotation(d: int, seed: int | np.random.SeedSequence) -> np.ndarray:
    """A Haar-random orthogonal [d, d] float64 matrix: Q of the QR of a Gaussian matrix, signs fixed by R."""
    g = np.random.default_rng(seed).standard_normal((d, d))
    q, r = np.linalg.qr(g)
    return q * np.sign(np.diag(r))[None, :]


def gaussian_sketch(d: int, seed: int | np.random.SeedSequence) -> np.ndarray:
    """The QJL matrix S [d, d] with i.i.d. N(0, 1) entries, float64."""
    return np.random.default_rng(seed).standard_normal((d, d))


def _matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.matmul(x, w, precision=lax.Precision.HIGHEST)


def _norms(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(||x|| [...], x/||x|| [..., d]); the zero vector stays zero."""
    norms = jnp.sqrt(jnp.sum(x * x, axis=-1))
    return norms, x / jnp.where(norms > 0, norms, 1.0)[..., None]


# ---------------------------------------------------------------------------------------------------------
# TurboQuant_mse


@flax.struct.dataclass
class MSECodec:
    """TurboQuant_mse for vectors of size d at `bits` bits per coordinate.

    x [..., d] -> (codes uint8 [..., packed_size(d, bits)], norms float32 [...]) and back.
    """

    rotation: jax.Array  # [d, d] orthogonal, y = Pi u is computed as u @ Pi.T
    bits: int = flax.struct.field(pytree_node=False)

    @property
    def d(self) -> int:
        return self.rotation.shape[-1]

    @property
    def codebook(self) -> Codebook:
        return lloyd_max_codebook(self.d, self.bits)

    def encode_unit(self, u: jax.Array) -> jax.Array:
        """Unit vectors [..., d] -> indices uint8 [..., d] of the nearest centroid of each rotated coordinate."""
        y = _matmul(u, self.rotation.T)  # [..., d]
        thresholds = jnp.asarray(self.codebook.thresholds, jnp.float32)
        return jnp.sum(y[..., None] > thresholds, axis=-1).astype(jnp.uint8)

    def decode_unit(self, idx: jax.Array) -> jax.Array:
        """Indices [..., d] -> the reconstructed unit vector Pi^T c[idx], float32 [..., d]."""
        centroids = jnp.asarray(self.codebook.centroids, jnp.float32)
        return _matmul(centroids[idx.astype(jnp.int32)], self.rotation)

    def quantize(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        norms, u = _norms(x.astype(jnp.float32))
        return pack_bits(self.encode_unit(u), self.bits), norms

    def dequantize(self, codes: jax.Array, norms: jax.Array) -> jax.Array:
        idx = unpack_bits(codes, self.bits, self.d)
        return self.decode_unit(idx) * norms[..., None].astype(jnp.float32)


def mse_codec(d: int, bits: int, seed: int | np.random.SeedSequence = 0) -> MSECodec:
    """A TurboQuant_mse codec with its rotation drawn from `seed`."""
    _check_dim_bits(d, bits)
    lloyd_max_codebook(d, bits)  # compute (and cache) outside any trace
    return MSECodec(rotation=jnp.asarray(random_rotation(d, seed), jnp.float32), bits=bits)


# ---------------------------------------------------------------------------------------------------------
# TurboQuant_prod


class ProdCode(NamedTuple):
    """What TurboQuant_prod stores per vector."""

    codes: jax.Array  # uint8 [..., packed_size(d, bits-1)] MSE indices (empty at bits=1)
    signs: jax.Array  # uint8 [..., packed_size(d, 1)] QJL signs of S r
    norms: jax.Array  # [...] ||x||
    rnorms: jax.Array  # [...] ||x|| * ||r||, the residual's norm at the vector's scale


@flax.struct.dataclass
class ProdCodec:
    """TurboQuant_prod at `bits` bits per coordinate: (bits-1)-bit TurboQuant_mse + 1-bit QJL of the residual."""

    sketch: jax.Array  # [d, d] Gaussian S
    mse: MSECodec | None  # None at bits=1 (QJL alone)
    bits: int = flax.struct.field(pytree_node=False)

    @property
    def d(self) -> int:
        return self.sketch.shape[-1]

    def quantize(self, x: jax.Array) -> ProdCode:
        norms, u = _norms(x.astype(jnp.float32))  # [...], [..., d]
        if self.mse is None:
            codes, u_hat = jnp.zeros((*u.shape[:-1], 0), jnp.uint8), jnp.zeros_like(u)
        else:
            idx = self.mse.encode_unit(u)
            codes, u_hat = pack_bits(idx, self.mse.bits), self.mse.decode_unit(idx)
        r = u - u_hat  # [..., d]
        signs = (_matmul(r, self.sketch.T) >= 0).astype(jnp.uint8)  # sign(S r) as bits, [..., d]
        return ProdCode(codes, pack_bits(signs, 1), norms, norms * jnp.sqrt(jnp.sum(r * r, axis=-1)))

    def dequantize(self, code: ProdCode) -> jax.Array:
        """x_tilde = ||x|| u_hat + sqrt(pi/2)/d * ||x|| ||r|| * S^T z, z = sign(S r) in {-1, +1}. [..., d]"""
        norms = code.norms[..., None].astype(jnp.float32)
        z = 2.0 * unpack_bits(code.signs, 1, self.d).astype(jnp.float32) - 1.0  # [..., d]
        qjl = _matmul(z, self.sketch) * (math.sqrt(math.pi / 2) / self.d)
        out = qjl * code.rnorms[..., None].astype(jnp.float32)
        if self.mse is not None:
            out = out + self.mse.decode_unit(unpack_bits(code.codes, self.mse.bits, self.d)) * norms
        return out


def prod_codec(d: int, bits: int, seed: int | np.random.SeedSequence = 0) -> ProdCodec:
    """A TurboQuant_prod codec; its rotation and QJL matrix come from independent streams of `seed`."""
    _check_dim_bits(d, bits)
    ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    # two independent child streams, derived without spawn() (which would advance the caller's SeedSequence)
    rot_seed, sketch_seed = (np.random.SeedSequence(ss.entropy, spawn_key=(*ss.spawn_key, i)) for i in (0, 1))
    mse = mse_codec(d, bits - 1, rot_seed) if bits > 1 else None
    return ProdCodec(sketch=jnp.asarray(gaussian_sketch(d, sketch_seed), jnp.float32), mse=mse, bits=bits)


def prod_variance(d: int, bits: int) -> float:
    """E over x, S of (<y, x_tilde> - <y, x>)^2 for unit x and an independent uniform unit y.

    Var given r is (pi/2 ||r||^2 - <r, y>^2)/d, and E<r, y>^2 = E||r||^2/d for uniform y, so this is
    (pi/2 - 1/d) E||r||^2 / d with E||r||^2 the (bits-1)-bit MSE distortion (1 at bits=1).
    """
    _check_dim_bits(d, bits)
    residual = lloyd_max_codebook(d, bits - 1).distortion if bits > 1 else 1.0
    return (math.pi / 2 - 1 / d) * residual / d


def prod_variance_bound(d: int, bits: int) -> float:
    """The paper's Theorem 2 bound for ||y|| = 1: D_prod <= sqrt(3) pi^2 / d * 4^-bits."""
    return math.sqrt(3) * math.pi**2 / d / 4**bits
