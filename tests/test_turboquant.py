"""TurboQuant codec against float64 NumPy references, closed forms and the paper's numbers."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from scipy import integrate

from jaxgpt.decode import turboquant as tq

# E||u - u_hat||^2 of TurboQuant_mse at b = 1..4 as the paper reports them (0.36, 0.117, 0.03, 0.009); the
# paper's 0.03 is rounded: the Gaussian Lloyd-Max value is 0.0345, used here. Tolerance: 5% relative
# (finite-d values sit 0.3-3.5% under the Gaussian limit at d = 64, 128).
PAPER_MSE = {1: 0.36, 2: 0.117, 3: 0.0345, 4: 0.009}
# Max (1960), Lloyd-Max quantizer of N(0, 1): distortion and positive levels.
GAUSS_LLOYD_MAX = {
    1: (0.3634, (0.7979,)),
    2: (0.1175, (0.4528, 1.510)),
    3: (0.03454, (0.2451, 0.7560, 1.344, 2.152)),
    4: (0.009497, (0.1284, 0.3881, 0.6568, 0.9424, 1.256, 1.618, 2.069, 2.733)),
}


def unit_vectors(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=-1, keepdims=True)  # [n, d] float64


def ref_mse(codec: tq.MSECodec, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 TurboQuant_mse with the codec's own rotation: (indices, distance to nearest threshold, x_hat)."""
    rot = np.asarray(codec.rotation, np.float64)
    cb = tq.lloyd_max_codebook(codec.d, codec.bits)
    thr, cen = np.array(cb.thresholds), np.array(cb.centroids)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    y = (x / norms) @ rot.T
    idx = np.searchsorted(thr, y)  # number of thresholds strictly below y
    margin = np.min(np.abs(y[..., None] - thr), axis=-1)
    return idx, margin, (cen[idx] @ rot) * norms


def ref_pack(idx: np.ndarray, bits: int) -> np.ndarray:
    """Little-endian bit stream with np.packbits, padded to pack_bits' group size."""
    n = idx.shape[-1]
    stream = ((idx[..., None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(*idx.shape[:-1], n * bits)
    packed = np.packbits(stream, axis=-1, bitorder="little")
    extra = tq.packed_size(n, bits) - packed.shape[-1]
    return np.pad(packed, [(0, 0)] * (idx.ndim - 1) + [(0, extra)])


# ---------------------------------------------------------------------------------------------------------
# Codebooks


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_codebook_d3_is_the_uniform_quantizer(bits):
    # In d = 3 a coordinate of a uniform unit vector is uniform on [-1, 1] (Archimedes), so Lloyd-Max is the
    # uniform quantizer: centroids -1 + (2i+1)/2^b, per-coordinate MSE step^2/12.
    cb = tq.lloyd_max_codebook(3, bits)
    n = 2**bits
    np.testing.assert_allclose(cb.centroids, -1 + (2 * np.arange(n) + 1) / n, atol=1e-9)
    np.testing.assert_allclose(cb.distortion, 3 * (2 / n) ** 2 / 12, rtol=1e-9)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_codebook_large_d_is_gaussian_lloyd_max(bits):
    # sqrt(d) * coordinate -> N(0, 1): the codebook and d * MSE tend to Max's Gaussian table (4 digits).
    d = 4096
    cb = tq.lloyd_max_codebook(d, bits)
    dist, levels = GAUSS_LLOYD_MAX[bits]
    np.testing.assert_allclose(np.array(cb.centroids[2 ** (bits - 1):]) * math.sqrt(d), levels, atol=2e-3)
    np.testing.assert_allclose(cb.distortion, dist, rtol=2e-3)


@pytest.mark.parametrize("d,bits", [(64, 2), (64, 4), (128, 3)])
def test_codebook_is_a_lloyd_fixed_point(d, bits):
    # Independent integration (adaptive quad): each centroid is its cell's conditional mean, each threshold a
    # midpoint, and the distortion is the integral of (t - c)^2 f(t).
    cb = tq.lloyd_max_codebook(d, bits)
    c, t = np.array(cb.centroids), np.array(cb.thresholds)
    np.testing.assert_allclose(t, 0.5 * (c[1:] + c[:-1]), atol=1e-15)
    edges = np.concatenate([[-1.0], t, [1.0]])
    f = lambda x: tq.coordinate_pdf(x, d)  # noqa: E731
    mse = 0.0
    for i in range(len(c)):
        m0 = integrate.quad(f, edges[i], edges[i + 1], epsabs=0, epsrel=1e-12, limit=200)[0]
        m1 = integrate.quad(lambda x: x * f(x), edges[i], edges[i + 1], epsabs=0, epsrel=1e-12, limit=200)[0]
        mse += integrate.quad(lambda x: (x - c[i]) ** 2 * f(x), edges[i], edges[i + 1], epsabs=0,
                              epsrel=1e-12, limit=200)[0]
        np.testing.assert_allclose(c[i], m1 / m0, rtol=1e-8)
    np.testing.assert_allclose(cb.distortion, d * mse, rtol=1e-8)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="bits"):
        tq.lloyd_max_codebook(64, 5)
    with pytest.raises(ValueError, match="d >= 3"):
        tq.mse_codec(2, 2)
    with pytest.raises(ValueError, match="bits"):
        tq.pack_bits(np.ones((4,), np.uint8), 0)
    with pytest.raises(ValueError, match="pass the n"):
        tq.unpack_bits(np.ones((5,), np.uint8), 3, 8)


# ---------------------------------------------------------------------------------------------------------
# Packing and the MSE codec, jitted and not


class CodecTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(1, 2, 3, 4)
    def test_pack_round_trip_matches_numpy_packbits(self, bits):
        rng = np.random.default_rng(100 + bits)
        for n in (64, 13):
            idx = rng.integers(0, 2**bits, size=(3, 5, n)).astype(np.uint8)
            packed = self.variant(lambda i: tq.pack_bits(i, bits))(idx)
            chex.assert_shape(packed, (3, 5, tq.packed_size(n, bits)))
            assert packed.dtype == jnp.uint8
            np.testing.assert_array_equal(packed, ref_pack(idx, bits))
            np.testing.assert_array_equal(self.variant(lambda p: tq.unpack_bits(p, bits, n))(packed), idx)
        assert tq.packed_size(64, bits) == 8 * bits  # 64 values take exactly 64*bits/8 bytes

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters((64, 1), (64, 3), (128, 4))
    def test_mse_matches_float64_reference(self, d, bits):
        codec = tq.mse_codec(d, bits, seed=7)
        x = np.random.default_rng(d * 10 + bits).standard_normal((256, d)) * 3.0  # not unit: norms stored
        codes, norms = self.variant(lambda c, v: c.quantize(v))(codec, x.astype(np.float32))
        chex.assert_shape(codes, (256, d * bits // 8))
        idx = np.asarray(tq.unpack_bits(codes, bits, d))
        ref_idx, margin, ref_hat = ref_mse(codec, x)
        clear = margin > 1e-5  # float32 may round the other way within 1e-5 of a threshold
        assert clear.mean() > 0.99
        np.testing.assert_array_equal(idx[clear], ref_idx[clear])
        np.testing.assert_allclose(norms, np.linalg.norm(x, axis=-1), rtol=1e-6)
        x_hat = self.variant(lambda c, a, b: c.dequantize(a, b))(codec, codes, norms)
        # dequantize exactly the indices the codec chose, in float64
        cen = np.array(tq.lloyd_max_codebook(d, bits).centroids)
        expect = (cen[idx] @ np.asarray(codec.rotation, np.float64)) * np.linalg.norm(x, axis=-1)[:, None]
        np.testing.assert_allclose(x_hat, expect, atol=2e-5 * np.abs(expect).max())
        rows = np.all(clear, axis=-1)
        np.testing.assert_allclose(np.asarray(x_hat)[rows], ref_hat[rows], atol=2e-5 * np.abs(expect).max())


@pytest.mark.parametrize("d", [64, 128])
def test_mse_distortion_matches_paper(d):
    n = 4096
    for bits in (1, 2, 3, 4):
        u = unit_vectors(np.random.default_rng(1000 * d + bits), n, d)  # fresh vectors per bit width
        codec = tq.mse_codec(d, bits, seed=bits)
        u_hat = jax.jit(lambda c, v: c.dequantize(*c.quantize(v)))(codec, u.astype(np.float32))
        err = np.sum((np.asarray(u_hat, np.float64) - u) ** 2, axis=-1)
        mean, se = err.mean(), err.std() / math.sqrt(n)
        theory = tq.lloyd_max_codebook(d, bits).distortion
        assert abs(mean - theory) < 5 * se, (bits, mean, theory, se)  # Monte Carlo vs the integral
        assert abs(mean - PAPER_MSE[bits]) < 0.05 * PAPER_MSE[bits], (bits, mean, PAPER_MSE[bits])
        _, _, ref_hat = ref_mse(codec, u)  # the float64 reference reaches the same distortion
        np.testing.assert_allclose(mean, np.sum((ref_hat - u) ** 2, axis=-1).mean(), rtol=1e-3)


# ---------------------------------------------------------------------------------------------------------
# TurboQuant_prod


def test_prod_matches_float64_reference():
    d, bits = 64, 3
    codec = tq.prod_codec(d, bits, seed=3)
    x = np.random.default_rng(5).standard_normal((128, d)) * 2.0
    code = jax.jit(lambda c, v: c.quantize(v))(codec, x.astype(np.float32))
    x_tilde = np.asarray(jax.jit(lambda c, k: c.dequantize(k))(codec, code))
    # float64 reference: MSE part with bits-1, residual, QJL signs and dequantization
    idx, margin, mse_hat = ref_mse(codec.mse, x)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    r = x / norms - mse_hat / norms
    s_mat = np.asarray(codec.sketch, np.float64)
    proj = r @ s_mat.T
    z = np.where(proj >= 0, 1.0, -1.0)
    ref = mse_hat + math.sqrt(math.pi / 2) / d * norms * np.linalg.norm(r, axis=-1, keepdims=True) * (z @ s_mat)
    rows = np.all(margin > 1e-5, axis=-1) & np.all(np.abs(proj) > 1e-5, axis=-1)
    assert rows.mean() > 0.7
    np.testing.assert_allclose(x_tilde[rows], ref[rows], atol=1e-4 * np.abs(ref).max())
    np.testing.assert_array_equal(np.asarray(tq.unpack_bits(code.codes, bits - 1, d))[rows], idx[rows])


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_prod_is_unbiased_with_variance_of_theorem_2(d, bits):
    # Unbiasedness is over the QJL matrix S: E_S <y, x_tilde> = <y, x> for every x and rotation. So keep one
    # rotation, draw many S, and average over fixed pairs (x, y).
    n_sketch, n_pairs = 128, 64
    rng = np.random.default_rng(7 * d + bits)
    x = unit_vectors(rng, n_pairs, d)
    w = unit_vectors(rng, n_pairs, d)
    w = w - np.sum(w * x, -1, keepdims=True) * x
    y_corr = 0.8 * x + 0.6 * w / np.linalg.norm(w, axis=-1, keepdims=True)  # <x, y> = 0.8, ||y|| = 1
    y_free = unit_vectors(rng, n_pairs, d)  # independent y: the setting of the variance formula
    base = tq.prod_codec(d, bits, seed=int(rng.integers(1 << 31)))
    sketches = jnp.asarray(rng.standard_normal((n_sketch, d, d)), jnp.float32)
    xs = jnp.asarray(x, jnp.float32)

    @jax.jit
    def dequantized(s):  # [M, P, d]
        return jax.vmap(lambda s1: base.replace(sketch=s1).dequantize(base.replace(sketch=s1).quantize(xs)))(s)

    x_prod = np.asarray(dequantized(sketches), np.float64)
    err = np.sum((x_prod - x) * y_corr, -1).ravel()  # <y, x_tilde> - <y, x>
    z = err.mean() / (err.std() / math.sqrt(err.size))
    assert abs(z) < 4.5, f"prod looks biased: mean {err.mean():.2e}, z = {z:.1f}"
    # control: TurboQuant_mse at the same bits shrinks <y, x> by about D_mse (E<x, x_hat> = 1 - D), and this
    # test sees it
    mse = tq.mse_codec(d, bits, seed=int(rng.integers(1 << 31)))
    x_mse = np.asarray(jax.jit(lambda v: mse.dequantize(*mse.quantize(v)))(xs), np.float64)
    err_mse = np.sum((x_mse - x) * y_corr, -1)
    np.testing.assert_allclose(err_mse.mean(), -0.8 * tq.lloyd_max_codebook(d, bits).distortion, rtol=0.3)
    assert err_mse.mean() < err.mean() - 5 * err.std() / math.sqrt(err.size)

    var = np.mean(np.sum((x_prod - x) * y_free, -1) ** 2)
    theory = tq.prod_variance(d, bits)
    np.testing.assert_allclose(var, theory, rtol=0.08)  # 8k samples: statistical error ~2%
    assert var <= tq.prod_variance_bound(d, bits)
