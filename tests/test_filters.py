"""Filters along s (docs/design.md, "Reconstruction")."""
import math

import pytest
import torch

from tonno_fast.filters import FILTERS, WINDOWS, apply_filter


@pytest.mark.parametrize("name", ["ramp2", "laplacian", "ramp"])
def test_constant_row_gives_zero(name):
    row = torch.full((2, 3, 37), 4.2, dtype=torch.float64)
    out = apply_filter(row, name, slice_spacing=0.7)
    assert out.abs().max() < 1e-12


def test_ramp2_is_minus_second_derivative_on_smooth_rows():
    # For a band-limited smooth row the ω² filter equals -d²/ds².
    s = (torch.arange(257, dtype=torch.float64) - 128) * 0.5
    sigma = 6.0
    g = torch.exp(-s ** 2 / (2 * sigma ** 2))
    d2 = (s ** 2 / sigma ** 4 - 1 / sigma ** 2) * g
    out = apply_filter(g, "ramp2", slice_spacing=0.5)
    assert float((out + d2).abs().max()) < 1e-6 * float(d2.abs().max()) + 1e-9
    lap = apply_filter(g, "laplacian", slice_spacing=0.5)
    assert float((lap + d2).abs().max()) < 2e-3 * float(d2.abs().max())


def test_filters_are_linear_and_symmetric_away_from_the_edges():
    # Edge replication makes the operator non-symmetric at the ends of a row (autograd handles the exact
    # adjoint); rows that vanish near both ends see the symmetric kernel.
    torch.manual_seed(0)
    x, y = torch.zeros(2, 61, dtype=torch.float64)
    x[20:40], y[22:41] = torch.randn(20, dtype=torch.float64), torch.randn(19, dtype=torch.float64)
    for name in ("ramp2", "laplacian", "ramp"):
        for window in ([None] + list(WINDOWS) if name != "laplacian" else [None]):
            Ax = apply_filter(x, name, window, slice_spacing=1.3)
            Ay = apply_filter(y, name, window, slice_spacing=1.3)
            if name != "ramp" and window is None:  # |ω| decays slowly: its tails reach the edges
                assert abs(float(Ax @ y - x @ Ay)) < 1e-9 * float(Ax.norm() * y.norm())
            torch.testing.assert_close(apply_filter(2 * x + y, name, window, slice_spacing=1.3), 2 * Ax + Ay)


def test_windows_attenuate_high_frequencies():
    torch.manual_seed(1)
    x = torch.randn(101, dtype=torch.float64)
    plain = apply_filter(x, "ramp2", slice_spacing=1.0).norm()
    for window in WINDOWS:
        assert apply_filter(x, "ramp2", window, slice_spacing=1.0).norm() < plain


def test_none_and_dtype():
    x = torch.randn(3, 11)
    assert apply_filter(x, "none") is x
    assert apply_filter(x, "ramp2").dtype == torch.float32


def test_bad_filter_names():
    x = torch.zeros(5)
    with pytest.raises(ValueError, match="filter"):
        apply_filter(x, "ramp3")
    with pytest.raises(ValueError, match="window"):
        apply_filter(x, "ramp2", "gauss")
    with pytest.raises(ValueError, match="window"):
        apply_filter(x, "laplacian", "hann")
    assert set(FILTERS) == {"ramp2", "laplacian", "ramp", "none"}
