"""Iterative reconstruction (tonno_fast.reconstruct): the operator pair and its weighting, convergence to the
weighted least-squares solution on dense float64 problems, every backend against the reference, non-negativity
and total variation, score calibration, no host synchronisation in the loop, the pipeline and the CLI."""
import math

import nibabel as nib
import numpy as np
import pytest
import scipy.optimize
import torch

import tonno_fast as tf
from conftest import PHANTOM_BLOBS, gaussian_blobs
from tonno_fast import reconstruction as R
from tonno_fast.cli import main


def _available(name):
    return tf.backends().get(name) == "available"


BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(not _available(b), reason=f"backend {b} unavailable"))
            for b in ("cpu", "triton")]
ITERATIVE = ("sirt", "cgls", "fista")


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _dense(geometry, backend="cpu"):
    """The plane transform as a dense float64 matrix ``(N·S, D·H·W)``: radon of every unit voxel."""
    D, H, W = geometry.volume_shape
    n = D * H * W
    eye = torch.eye(n, dtype=torch.float64).reshape(n, 1, D, H, W)
    return tf.radon(eye, geometry, backend=backend).reshape(n, -1).T


def _weighted_system(geometry, p):
    """``(W^½ A, W^½ p)`` as NumPy arrays: the least-squares system ``min ‖A x − p‖²_W``."""
    sw = geometry.weights.repeat_interleave(geometry.n_slices).sqrt()
    return (sw[:, None] * _dense(geometry)).numpy(), (sw * p.reshape(-1)).numpy()


@pytest.fixture(scope="module")
def small_problem():
    """12 unknowns, 12 directions with unequal quadrature weights, anisotropic voxels: an overdetermined,
    full-rank weighted least-squares problem (condition number 16)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.rand(12, dtype=torch.float64, generator=gen) * 2 + 0.5
    g = tf.make_geometry((2, 3, 2), spacing=(1.2, 1.0, 0.9), n_directions=12, weights=w)
    p = torch.randn(1, 1, 12, g.n_slices, dtype=torch.float64, generator=gen)
    return g, p


# ------------------------------------------------------------------------------------------------------------
# The operator pair
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_exact_adjoint_pairing(backend):
    """<A x, W y> = <x, AᵀW y> to rounding, with unequal weights and anisotropic spacing."""
    gen = torch.Generator().manual_seed(1)
    g = tf.make_geometry((4, 5, 3), spacing=(1.5, 1.0, 0.8), n_directions=3,
                         weights=torch.tensor([0.5, 2.0, 1.3], dtype=torch.float64), slice_size=6, n_slices=5)
    op = R.PlaneTransform(g, (1, 2), dtype=torch.float64, backend=backend)
    x = torch.randn(op.shape, dtype=torch.float64, generator=gen)
    y = torch.randn(1, 2, 3, 5, dtype=torch.float64, generator=gen)
    lhs = float((op.forward(x) * op.weights * y).sum())
    rhs = float((x * op.weighted_adjoint(y)).sum())
    assert abs(lhs - rhs) <= 1e-12 * abs(lhs)


@pytest.mark.parametrize("shape, spacing, kw", [
    ((24, 24, 24), (1.0, 1.0, 1.0), {}),                                  # v/Δs = 1
    ((12, 13, 14), (2.0, 1.0, 1.5), {}),                                  # v/Δs = 3
    ((12, 13, 14), (1.0, 1.0, 1.0), dict(pixel_spacing=0.7, slice_spacing=1.3)),  # v/Δs = 0.77
])
def test_backproject_is_the_adjoint_up_to_voxel_volume_over_slice_spacing(shape, spacing, kw):
    """backproject(y, weights=w) ≈ (Δs/v) AᵀW y on smooth fields (δ² cancels). Not exact: the two ops use
    different interpolation kernels (see the module docstring), so only smooth x, y pair this well."""
    g = tf.make_geometry(shape, spacing=spacing, n_directions=7, **kw)
    x = gaussian_blobs(shape, spacing, [((1.0, -1.0, 0.5), 3.0, 1.0)])[None, None]
    s = g.offsets
    gen = torch.Generator().manual_seed(2)
    y = (torch.exp(-(s - 0.7) ** 2 / (2 * 4.0 ** 2))[None, :] * torch.rand(7, 1, dtype=torch.float64, generator=gen))
    y = y[None, None]
    v = spacing[0] * spacing[1] * spacing[2]
    lhs = float((tf.radon(x, g) * g.weights[:, None] * y).sum())
    rhs = v / g.slice_spacing * float((x * tf.backproject(y, g)).sum())
    assert lhs / rhs == pytest.approx(1.0, abs=1e-2)


def test_operator_norm_is_the_largest_eigenvalue(small_problem):
    g, _ = small_problem
    M, _ = _weighted_system(g, torch.zeros(g.n_directions * g.n_slices, dtype=torch.float64))
    top = np.linalg.eigvalsh(M.T @ M)[-1]
    lam = R.plane_transform_norm(g, dtype=torch.float64, backend="cpu")
    assert float(lam) == pytest.approx(top, rel=1e-9)
    assert R.plane_transform_norm(g, dtype=torch.float64, backend="cpu") is lam  # cached per geometry


# ------------------------------------------------------------------------------------------------------------
# Convergence to the weighted least-squares solution (dense float64 problems)
# ------------------------------------------------------------------------------------------------------------
def test_cgls_and_fista_converge_to_weighted_lstsq(small_problem):
    g, p = small_problem
    M, b = _weighted_system(g, p)
    x_ls = np.linalg.lstsq(M, b, rcond=None)[0]
    x_unweighted = np.linalg.lstsq(_dense(g).numpy(), p.reshape(-1).numpy(), rcond=None)[0]
    assert np.linalg.norm(x_ls - x_unweighted) > 0.1 * np.linalg.norm(x_ls)  # the weights matter here
    cgls = tf.reconstruct(p, g, "cgls", iterations=40, x0="zeros", backend="cpu").reshape(-1).numpy()
    np.testing.assert_allclose(cgls, x_ls, rtol=0, atol=1e-10 * np.abs(x_ls).max())
    fista = tf.reconstruct(p, g, "fista", iterations=500, x0="zeros", nonneg=False, tv=0.0, backend="cpu")
    np.testing.assert_allclose(fista.reshape(-1).numpy(), x_ls, rtol=0, atol=1e-7 * np.abs(x_ls).max())


def test_sirt_fixed_point_is_the_weighted_lstsq_solution(small_problem):
    """SIRT with row weights W (not 1/row sums) stays at the W-weighted LS solution and descends towards it."""
    g, p = small_problem
    M, b = _weighted_system(g, p)
    x_ls = torch.from_numpy(np.linalg.lstsq(M, b, rcond=None)[0]).reshape(1, 1, *g.volume_shape)
    kept = tf.reconstruct(p, g, "sirt", iterations=20, x0=x_ls, nonneg=False, backend="cpu")
    torch.testing.assert_close(kept, x_ls, rtol=0, atol=1e-11 * float(x_ls.abs().max()))
    errs = [_rel(tf.reconstruct(p, g, "sirt", iterations=n, x0="zeros", nonneg=False, backend="cpu"), x_ls)
            for n in (10, 100, 400)]
    assert errs[0] > errs[1] > errs[2]


@pytest.mark.parametrize("method, kw", [("sirt", dict(iterations=800, relaxation=1.9)),
                                        ("fista", dict(iterations=300, tv=0.0))])
def test_nonneg_converges_to_nnls(method, kw):
    gen = torch.Generator().manual_seed(3)
    g = tf.make_geometry((2, 3, 2), spacing=(1.2, 1.0, 0.9), n_directions=12,
                         weights=torch.rand(12, dtype=torch.float64, generator=gen) * 2 + 0.5)
    truth = torch.rand(1, 1, *g.volume_shape, dtype=torch.float64, generator=gen) * 1.5 - 0.5
    p = tf.radon(truth, g) + 0.1 * torch.randn(1, 1, 12, g.n_slices, dtype=torch.float64, generator=gen)
    M, b = _weighted_system(g, p)
    x_nn = scipy.optimize.nnls(M, b)[0]
    assert 0 < int((x_nn == 0).sum()) < x_nn.size  # some constraints active, some not
    x = tf.reconstruct(p, g, method, x0="zeros", backend="cpu", **kw).reshape(-1).numpy()
    assert x.min() >= 0
    np.testing.assert_allclose(x, x_nn, rtol=0, atol=1e-9 * np.abs(x_nn).max())


def test_cgls_from_zero_gives_the_minimum_norm_solution():
    """Underdetermined (27 unknowns, 4 directions): CGLS from zero stays in the range of Aᵀ → pinv solution."""
    g = tf.make_geometry((3, 3, 3), n_directions=4)
    p = torch.randn(1, 1, 4, g.n_slices, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    M, b = _weighted_system(g, p)
    assert np.linalg.matrix_rank(M) < M.shape[1]
    x_mn = np.linalg.pinv(M) @ b
    x = tf.reconstruct(p, g, "cgls", iterations=60, x0="zeros", backend="cpu").reshape(-1).numpy()
    np.testing.assert_allclose(x, x_mn, rtol=0, atol=1e-9 * np.abs(x_mn).max())


def test_exact_plane_integrals_few_directions():
    """The identity phantom (exact plane integrals A f) from 16 directions: every iterative method, with its
    defaults, at most half of FBP's relative error (measured: FBP 0.90; SIRT, CGLS, FISTA 0.16–0.45)."""
    vol = gaussian_blobs((48, 48, 48), blobs=PHANTOM_BLOBS).float()[None, None]
    g = tf.make_geometry((48, 48, 48), n_directions=16)
    p = tf.radon(vol, g)
    fbp = _rel(tf.reconstruct(p, g), vol)
    for method in ITERATIVE:
        info = {}
        err = _rel(tf.reconstruct(p, g, method, info=info), vol)
        assert err <= 0.5 * fbp, (method, err, fbp)
        assert info["iterations"] == 50 and info["residual"].shape == (50, 1, 1)
    # The residual of the exact data falls (CGLS: monotone by construction).
    res = info["residual"][:, 0, 0]
    assert float(res[-1]) < 0.01 * float(res[0])


def test_exact_plane_integrals_many_directions():
    """64 directions: FISTA (20 iterations) no worse than FBP (measured 0.051 against 0.212)."""
    vol = gaussian_blobs((48, 48, 48), blobs=PHANTOM_BLOBS).float()[None, None]
    g = tf.make_geometry((48, 48, 48), n_directions=64)
    p = tf.radon(vol, g)
    assert _rel(tf.reconstruct(p, g, "fista", iterations=20), vol) <= _rel(tf.reconstruct(p, g), vol)


# ------------------------------------------------------------------------------------------------------------
# Backends
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method, kw", [("sirt", {}), ("cgls", {}), ("fista", dict(tv=0.05)),
                                        ("fista", dict(adjoint="backproject"))])
def test_each_backend_matches_reference(backend, method, kw):
    gen = torch.Generator().manual_seed(5)
    g = tf.make_geometry((4, 5, 3), spacing=(1.5, 1.0, 0.8), n_directions=2, slice_size=6, n_slices=5)
    p = torch.randn(1, 2, 2, 5, dtype=torch.float64, generator=gen)
    ref = tf.reconstruct(p, g, method, iterations=3, x0="zeros", backend="reference", **kw)
    out = tf.reconstruct(p, g, method, iterations=3, x0="zeros", backend=backend, **kw)
    assert out.dtype == torch.float64 and out.shape == (1, 2, 4, 5, 3)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10 * float(ref.abs().max()))


@pytest.mark.parametrize("method", ITERATIVE)
def test_float32_matches_float64(method):
    g = tf.make_geometry((8, 9, 7), n_directions=5)
    p = tf.radon(gaussian_blobs((8, 9, 7), blobs=[((0.5, 1.0, -0.5), 2.0, 1.0)])[None, None], g)
    info64, info32 = {}, {}
    a = tf.reconstruct(p, g, method, iterations=10, info=info64)
    b = tf.reconstruct(p.float(), g, method, iterations=10, info=info32)
    assert b.dtype == torch.float32
    if method == "cgls":
        # Conjugate gradients lose conjugacy in float32 and take a slightly different path (3e-3 relative after
        # 10 iterations here, relative residual 3.0e-3 against 2.5e-3); they still converge.
        assert _rel(b.double(), a) < 1e-2
        assert float(info32["residual"][-1]) < 1.5 * float(info64["residual"][-1])
        assert float(info32["residual"][-1]) < 0.05 * float(info32["residual"][0])  # from FBP's 0.145
    else:
        assert _rel(b.double(), a) < 1e-5  # measured 4e-7


def test_problems_in_a_batch_are_independent():
    gen = torch.Generator().manual_seed(6)
    g = tf.make_geometry((6, 5, 7), n_directions=4)
    p = torch.randn(2, 3, 4, g.n_slices, dtype=torch.float64, generator=gen)
    for method in ITERATIVE:
        whole = tf.reconstruct(p, g, method, iterations=8, tv=0.01 if method == "fista" else 0.0)
        one = tf.reconstruct(p[1:2, 2:3], g, method, iterations=8, tv=0.01 if method == "fista" else 0.0)
        torch.testing.assert_close(whole[1:2, 2:3], one, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------------------
# Non-negativity and total variation
# ------------------------------------------------------------------------------------------------------------
def test_nonneg_default_and_effect():
    p = torch.randn(1, 1, 5, 15, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    g = tf.make_geometry((8, 8, 8), n_directions=5)
    for method in ("sirt", "fista"):
        assert float(tf.reconstruct(p, g, method, iterations=5).min()) >= 0.0  # on by default
        assert float(tf.reconstruct(p, g, method, iterations=5, nonneg=False).min()) < 0.0
    assert float(tf.reconstruct(p, g, "cgls", iterations=5).min()) < 0.0  # cgls is unconstrained


def test_gradient_pair_is_adjoint():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 1, 5, 6, 4, dtype=torch.float64, generator=gen)
    q = torch.randn(2, 1, 3, 5, 6, 4, dtype=torch.float64, generator=gen)
    spacing = (2.0, 1.0, 0.5)
    lhs = float((R._grad(x, spacing) * q).sum())
    rhs = float((x * R._grad_adjoint(q, spacing)).sum())
    assert lhs == pytest.approx(rhs, rel=1e-12)
    # Forward differences per mm: a ramp of 3 per mm along x has gradient 3 except at the last column.
    ramp = torch.arange(4, dtype=torch.float64).expand(5, 6, 4) * 0.5 * 3.0
    gx = R._grad(ramp, spacing)[2]
    assert torch.all(gx[..., :-1] == 3.0) and torch.all(gx[..., -1] == 0.0)


def test_tv_prox_limits():
    gen = torch.Generator().manual_seed(9)
    v = torch.rand(1, 1, 6, 7, 5, dtype=torch.float64, generator=gen)
    spacing = (1.0, 1.0, 1.0)
    mu = lambda m: torch.full((1, 1, 1, 1, 1), m, dtype=torch.float64)  # noqa: E731
    q = lambda: torch.zeros(1, 1, 3, 6, 7, 5, dtype=torch.float64)  # noqa: E731
    # Without the constraint the dual step only adds a divergence: the mean is kept exactly.
    x = R._tv_prox(v, mu(0.05), q(), spacing, False, 20)
    assert float(x.mean()) == pytest.approx(float(v.mean()), rel=1e-12)
    assert 0 < float((x - v).norm()) and float(x.std()) < float(v.std())
    # A huge weight flattens to the mean; a tiny one changes nothing.
    flat = R._tv_prox(v, mu(1e3), q(), spacing, False, 200)
    assert float(flat.std()) < 1e-3 * float(v.std())
    torch.testing.assert_close(R._tv_prox(v, mu(1e-12), q(), spacing, False, 5), v, rtol=0, atol=1e-10)
    assert float(R._tv_prox(v - 0.5, mu(0.05), q(), spacing, True, 20).min()) >= 0


def test_tv_lowers_total_variation_and_helps_noisy_data():
    """A cube from 12 directions with 5 % noise: TV(f) falls as tv grows; a moderate tv beats tv = 0
    (60 iterations, measured relative error 0.52 at tv = 0, 0.37 at tv = 0.01, 0.47 at tv = 0.1)."""
    shape = (16, 16, 16)
    truth = torch.zeros(1, 1, *shape, dtype=torch.float64)
    truth[..., 4:11, 5:12, 3:10] = 1.0
    g = tf.make_geometry(shape, n_directions=12)
    clean = tf.radon(truth, g)
    p = clean + 0.05 * float(clean.abs().max()) * torch.randn(clean.shape, dtype=torch.float64,
                                                             generator=torch.Generator().manual_seed(10))

    def total_variation(x):
        return float((R._grad(x, g.spacing) ** 2).sum(-4).sqrt().sum())

    results = {tv: tf.reconstruct(p, g, "fista", tv=tv, iterations=60) for tv in (0.0, 1e-3, 1e-2, 1e-1)}
    tvs = [total_variation(x) for x in results.values()]
    assert tvs == sorted(tvs, reverse=True)
    assert _rel(results[1e-2], truth) < 0.8 * _rel(results[0.0], truth)


def test_fista_tv_decreases_its_objective():
    g = tf.make_geometry((10, 10, 10), n_directions=8)
    p = torch.rand(1, 1, 8, g.n_slices, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    op = R.PlaneTransform(g, dtype=torch.float64)
    lam = 0.02 * min(g.spacing) * float(op.weighted_adjoint(p).abs().max())

    def objective(x):
        r = op.forward(x) - p
        return float(0.5 * (op.weights * r * r).sum() + lam * (R._grad(x, g.spacing) ** 2).sum(-4).sqrt().sum())

    f = [objective(tf.reconstruct(p, g, "fista", tv=0.02, iterations=n, x0="zeros")) for n in (5, 30, 150)]
    assert f[0] > f[1] > f[2]
    unregularised = tf.reconstruct(p, g, "fista", iterations=150, x0="zeros", tv=0.0)
    assert f[2] < objective(unregularised)


# ------------------------------------------------------------------------------------------------------------
# Score calibration
# ------------------------------------------------------------------------------------------------------------
def test_calibrate_scores():
    gen = torch.Generator().manual_seed(12)
    z = torch.randn(2, 1, 3, 11, dtype=torch.float64, generator=gen) * 3
    torch.testing.assert_close(tf.calibrate_scores(z, transform="sigmoid"), 1 / (1 + torch.exp(-z)))
    torch.testing.assert_close(tf.calibrate_scores(z, transform="softplus"), torch.log1p(torch.exp(z)))
    torch.testing.assert_close(tf.calibrate_scores(z, transform=lambda s: 2 * s), 2 * z)
    med = tf.calibrate_scores(z, baseline="median")
    torch.testing.assert_close(med.median(dim=-1).values, torch.zeros(2, 1, 3, dtype=torch.float64))
    low = tf.calibrate_scores(z, baseline=0.0)
    torch.testing.assert_close(low.amin(dim=-1), torch.zeros(2, 1, 3, dtype=torch.float64))
    # Monotone map first, then the baseline measured on the mapped scores.
    both = tf.calibrate_scores(z, transform="sigmoid", baseline=0.5)
    torch.testing.assert_close(both, torch.sigmoid(z) - torch.sigmoid(z).quantile(0.5, dim=-1, keepdim=True))
    assert tf.calibrate_scores(z) is z


@pytest.mark.parametrize("kw, exc, msg", [
    (dict(transform="exp"), ValueError, "transform must be None, one of"),
    (dict(baseline="mean"), ValueError, "baseline must be None, 'median' or a quantile"),
    (dict(baseline=1.5), ValueError, "baseline must be"),
    (dict(baseline=True), ValueError, "baseline must be"),
    (dict(transform=lambda s: s[..., :1]), ValueError, "transform must return a tensor of the sinogram's shape"),
])
def test_calibrate_scores_bad_inputs(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        tf.calibrate_scores(torch.zeros(1, 1, 2, 5), **kw)


def test_baseline_removes_a_per_direction_offset():
    """An encoder with a per-direction bias: FBP (ramp2) ignores it; least squares does not, unless the
    baseline is removed: the minimum (quantile 0) of each direction is the bias plus the plane integral of the
    outermost slice, which misses the object up to the blob's tail (~1e-7 here)."""
    vol = gaussian_blobs((12, 12, 12), blobs=[((1.0, 0.0, -1.0), 2.0, 1.0)])[None, None]
    g = tf.make_geometry((12, 12, 12), n_directions=6)
    p = tf.radon(vol, g)
    biased = p + torch.linspace(1.0, 3.0, 6, dtype=torch.float64)[:, None]
    torch.testing.assert_close(tf.reconstruct(biased, g), tf.reconstruct(p, g), rtol=0, atol=1e-9)
    clean = tf.reconstruct(p, g, "fista", iterations=20)
    assert _rel(tf.reconstruct(biased, g, "fista", iterations=20), clean) > 0.1  # measured 0.29
    calibrated = tf.reconstruct(biased, g, "fista", iterations=20, score_baseline=0.0)
    torch.testing.assert_close(calibrated, tf.reconstruct(p, g, "fista", iterations=20, score_baseline=0.0),
                               rtol=0, atol=1e-9 * float(clean.abs().max()))
    assert _rel(calibrated, clean) < 1e-5


# ------------------------------------------------------------------------------------------------------------
# Host synchronisation and stopping
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture
def sync_counter(monkeypatch):
    """Counts every way a tensor's value reaches the host from Python (item, bool, float, int, tolist)."""
    calls = []
    for name in ("item", "__bool__", "__float__", "__int__", "__index__", "tolist"):
        orig = getattr(torch.Tensor, name)

        def wrapped(self, *a, _orig=orig, _name=name, **k):
            calls.append(_name)
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, wrapped)
    return calls


@pytest.mark.parametrize("method", ITERATIVE)
def test_no_host_synchronisation_in_the_loop(method, sync_counter):
    g = tf.make_geometry((6, 7, 5), n_directions=4)
    p = torch.rand(2, 1, 4, g.n_slices, generator=torch.Generator().manual_seed(13))
    kw = dict(tv=0.01) if method == "fista" else {}
    R.plane_transform_norm(g)  # cache the step size, as a second call on the same geometry would
    tf.reconstruct(p, g, method, iterations=20, x0="zeros", **kw)
    assert sync_counter == []
    # With tol, exactly one check every check_every iterations (tol 0 is never reached here).
    tf.reconstruct(p, g, method, iterations=20, x0="zeros", tol=0.0, check_every=5, **kw)
    assert sync_counter == ["__bool__"] * 4
    # Starting from FBP synchronises in the setup only: the count does not grow with the iterations.
    del sync_counter[:]
    tf.reconstruct(p, g, method, iterations=3, **kw)
    n_setup = len(sync_counter)
    del sync_counter[:]
    tf.reconstruct(p, g, method, iterations=30, **kw)
    assert len(sync_counter) == n_setup


def test_tol_freezes_each_problem_at_its_iterate():
    """Problem 0 (exact data) reaches tol early and is frozen there; problem 1 (noise) keeps iterating."""
    g = tf.make_geometry((8, 8, 8), n_directions=6)
    vol = gaussian_blobs((8, 8, 8), blobs=[((0.5, 0.0, -0.5), 2.0, 1.0)])[None, None]
    p = torch.cat([tf.radon(vol, g), torch.rand(1, 1, 6, g.n_slices, dtype=torch.float64,
                                                generator=torch.Generator().manual_seed(14))], dim=1)
    for method in ITERATIVE:
        info = {}
        tf.reconstruct(p[:, :1], g, method, iterations=40, x0="zeros", info=info)
        res = info["residual"][:, 0, 0]
        k = 12
        tol = float(res[k] + res[k - 1]) / 2 if float(res[k]) < float(res[k - 1]) else float(res[k])
        first = int(torch.nonzero(res <= tol)[0])  # the first iterate at or below tol
        info = {}
        out = tf.reconstruct(p, g, method, iterations=40, x0="zeros", tol=tol, check_every=3, info=info)
        alone = tf.reconstruct(p[:, :1], g, method, iterations=first, x0="zeros")
        torch.testing.assert_close(out[:, :1], alone, rtol=1e-9, atol=1e-12)
        full = tf.reconstruct(p[:, 1:], g, method, iterations=40, x0="zeros")
        torch.testing.assert_close(out[:, 1:], full, rtol=1e-9, atol=1e-12)
        assert info["iterations"] == 40  # problem 1 never reaches tol
        # Alone, problem 0 stops at the first host check after it converged.
        info = {}
        tf.reconstruct(p[:, :1], g, method, iterations=40, x0="zeros", tol=tol, check_every=3, info=info)
        assert info["iterations"] == 3 * math.ceil((first + 1) / 3)


def test_inference_mode_and_requires_grad_inputs():
    g = tf.make_geometry((6, 6, 6), n_directions=3)
    p = torch.rand(1, 1, 3, g.n_slices, requires_grad=True)
    ref = tf.reconstruct(p.detach(), g, "fista", iterations=4)
    with torch.inference_mode():
        out = tf.reconstruct(p.detach(), g, "fista", iterations=4)
    torch.testing.assert_close(out, ref)
    assert not tf.reconstruct(p, g, "sirt", iterations=2).requires_grad
    assert tf.reconstruct(p, g).requires_grad  # FBP stays differentiable


@pytest.mark.parametrize("method, kw, exc, msg", [
    ("art", {}, ValueError, "method must be one of"),
    ("fbp", dict(tv=0.1), ValueError, "tv applies to the iterative methods"),
    ("fbp", dict(nonneg=True), ValueError, "nonneg applies to the iterative methods"),
    ("sirt", dict(tv=0.1), ValueError, "tv > 0 needs method='fista'"),
    ("cgls", dict(nonneg=True), ValueError, "nonneg=True is not available with method='cgls'"),
    ("cgls", dict(adjoint="backproject"), ValueError, "method='cgls' needs adjoint='exact'"),
    ("fista", dict(adjoint="transpose"), ValueError, "adjoint must be one of"),
    ("fista", dict(iterations=0), ValueError, "iterations must be a positive integer"),
    ("fista", dict(tol=-1.0), ValueError, "tol must be None or a non-negative number"),
    ("fista", dict(tv=-0.1), ValueError, "tv must be None or a non-negative number"),
    ("sirt", dict(relaxation=2.0), ValueError, "relaxation must be in"),
    ("fista", dict(x0="ones"), ValueError, "x0 must be 'fbp', 'zeros' or a tensor"),
    ("fista", dict(x0=torch.zeros(2, 2, 2)), ValueError, "x0 must have shape"),
    ("fista", dict(nonneg=1), TypeError, "nonneg must be None or a bool"),
    ("fista", dict(score_baseline="low"), ValueError, "baseline must be None"),
])
def test_bad_arguments(method, kw, exc, msg):
    g = tf.make_geometry((4, 4, 4), n_directions=2)
    with pytest.raises(exc, match=msg):
        tf.reconstruct(torch.zeros(1, 1, 2, g.n_slices), g, method, **kw)


def test_bad_sinogram():
    g = tf.make_geometry((4, 4, 4), n_directions=2)
    with pytest.raises(ValueError, match=r"sinogram must have shape \(B, K, N, S\) with \(N, S\)"):
        tf.reconstruct(torch.zeros(1, 1, 3, g.n_slices), g, "sirt")
    with pytest.raises(TypeError, match="sinogram must be float32 or float64"):
        tf.reconstruct(torch.zeros(1, 1, 2, g.n_slices, dtype=torch.int64), g, "sirt")
    with pytest.raises(TypeError, match="geometry must be a tonno_fast.Geometry"):
        tf.reconstruct(torch.zeros(1, 1, 2, g.n_slices), "geometry", "sirt")


# ------------------------------------------------------------------------------------------------------------
# Pipeline and CLI
# ------------------------------------------------------------------------------------------------------------
def _counting_sum_encoder(pixel_area, calls):
    def enc(x):
        calls.append(x.shape[0])
        return x.sum(dim=(-3, -2, -1)) * pixel_area
    return enc


def test_pipeline_reconstruction_and_kept_sinogram():
    vol = gaussian_blobs((12, 12, 12), blobs=[((1.0, 0.0, -1.0), 2.5, 1.0)])
    g = tf.make_geometry(vol.shape, n_directions=6)
    calls = []
    enc = _counting_sum_encoder(g.pixel_area, calls)
    options = dict(iterations=7, tv=0.01)
    res = tf.tomographic_heatmap(vol, enc, spacing=1.0, n_directions=6, reconstruction="fista",
                                 reconstruction_options=options, return_sinogram=True)
    assert isinstance(res, tf.pipeline.HeatmapResult) and res.heatmap.shape == vol.shape
    assert sum(calls) == 6 * g.n_slices
    sino = tf.encode_slices(vol[None, None], g, enc)
    torch.testing.assert_close(res.sinogram, sino)
    torch.testing.assert_close(res.heatmap, tf.reconstruct(sino, g, "fista", **options)[0, 0])
    # Reconstruct again from the kept scores: no encoder call.
    del calls[:]
    again = tf.reconstruct(res.sinogram, res.geometry, "cgls", iterations=7)
    assert calls == []
    torch.testing.assert_close(again[0, 0], tf.tomographic_heatmap(vol, enc, spacing=1.0, n_directions=6,
                                                                     reconstruction="cgls",
                                                                     reconstruction_options=dict(iterations=7)))
    # Calibration options reach the reconstruction.
    heat = tf.tomographic_heatmap(vol, lambda x: torch.sigmoid(enc(x) - 1.0), spacing=1.0, n_directions=6,
                                  reconstruction="sirt", score_transform="softplus", score_baseline=0.2,
                                  reconstruction_options=dict(iterations=5))
    expect = tf.reconstruct(torch.sigmoid(sino - 1.0), g, "sirt", iterations=5, score_transform="softplus",
                            score_baseline=0.2)
    torch.testing.assert_close(heat, expect[0, 0])
    assert _rel(heat, tf.reconstruct(torch.sigmoid(sino - 1.0), g, "sirt", iterations=5)[0, 0]) > 0.1


@pytest.mark.parametrize("kw, msg", [
    (dict(reconstruction="art"), "method must be one of"),
    (dict(reconstruction="fista", reconstruction_options=dict(tvv=0.1)), r"unknown option\(s\) \['tvv'\]"),
    (dict(reconstruction="cgls", reconstruction_options=dict(nonneg=True)), "nonneg=True is not available"),
    (dict(reconstruction="fbp", reconstruction_options=dict(tv=0.1)), "tv applies to the iterative methods"),
    (dict(score_transform="tanh"), "transform must be None"),
])
def test_pipeline_checks_reconstruction_before_scoring(kw, msg):
    def enc(x):
        raise AssertionError("the encoder must not run when the reconstruction options are wrong")
    with pytest.raises(ValueError, match=msg):
        tf.tomographic_heatmap(torch.rand(6, 6, 6), enc, spacing=1.0, n_directions=3, **kw)


@pytest.fixture
def scan(tmp_path):
    data = np.zeros((10, 12, 8), dtype=np.float32)
    data[3:6, 4:8, 2:5] = 2.0
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.5, 1.0])), str(path))
    return path


@pytest.fixture
def torchscript(tmp_path):
    class Sum(torch.nn.Module):
        def forward(self, x):
            return x.sum(dim=(1, 2, 3))
    path = tmp_path / "sum.pt"
    torch.jit.script(Sum()).save(str(path))
    return path


def test_cli_reconstruction(tmp_path, scan, torchscript, capsys):
    out = tmp_path / "heat.nii.gz"
    base = ["heatmap", "-i", str(scan), "-o", str(out), "--encoder", str(torchscript), "--directions", "6",
            "--device", "cpu", "-q"]
    assert main(base + ["--reconstruction", "fista", "--iterations", "4", "--tv", "0.01", "--score-baseline", "0",
                        "--window", "hann"]) == 0
    heat = np.asarray(nib.load(str(out)).dataobj)
    assert heat.shape == (10, 12, 8) and heat.min() >= 0 and heat[3:6, 4:8, 2:5].mean() > 2 * heat.mean()
    assert main(base + ["--reconstruction", "sirt", "--no-nonneg", "--adjoint", "backproject",
                        "--score-transform", "softplus", "--score-baseline", "median", "--overwrite"]) == 0
    for extra, msg in [(["--reconstruction", "cgls", "--nonneg"], "nonneg=True is not available"),
                       (["--tv", "0.1"], "--tv applies to an iterative --reconstruction"),
                       (["--reconstruction", "sirt", "--tv", "0.1"], "tv > 0 needs method='fista'")]:
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("tonno-fast: error:") and msg in err and len(err.splitlines()) == 1, err
    with pytest.raises(SystemExit):
        main(base + ["--score-baseline", "low"])
