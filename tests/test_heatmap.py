"""tomographic_heatmap end to end (docs/design.md, "Correctness"): the master identity and the API's conventions."""
import math

import pytest
import torch

import tonno_fast as tf
from conftest import PHANTOM_BLOBS, gaussian_blobs


def sum_encoder(pixel_area):
    return lambda x: x.sum(dim=(-3, -2, -1)) * pixel_area


def identity_error(vol, spacing, n_directions):
    g = tf.make_geometry(vol.shape, spacing=spacing)
    heat = tf.tomographic_heatmap(vol, sum_encoder(g.pixel_area), n_directions=n_directions, spacing=spacing)
    assert heat.shape == vol.shape and heat.dtype == torch.float64
    return float((heat - vol).norm() / vol.norm())


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 1.0, 1.0)])
def test_master_identity_sum_encoder(spacing):
    shape = tuple(int(round(48 / s)) for s in spacing)  # the same physical 48 mm phantom
    vol = gaussian_blobs(shape, spacing, PHANTOM_BLOBS)
    errs = [identity_error(vol, spacing, n) for n in (32, 128, 256)]
    print(f"spacing {spacing}: relative L2 error at 32/128/256 directions = {errs}")
    assert errs[0] > errs[1] > errs[2]
    assert errs[1] < 0.10
    assert errs[2] < 0.045


@pytest.mark.parametrize("filt", ["ramp2", "laplacian"])
def test_constant_score_gives_zero_heatmap(filt):
    vol = torch.randn(9, 10, 11)
    heat = tf.tomographic_heatmap(vol, lambda x: torch.full((x.shape[0],), 3.7), n_directions=8, filter=filt)
    assert heat.abs().max() < 1e-4  # float32 rounding of FFT and backprojection of 3.7


def test_multiple_outputs_and_batches():
    torch.manual_seed(0)
    vol = torch.randn(2, 1, 9, 10, 11)
    enc = lambda x: torch.stack([x.mean(dim=(1, 2, 3)), x.amax(dim=(1, 2, 3)), x.std(dim=(1, 2, 3))], dim=1)
    heat = tf.tomographic_heatmap(vol, enc, n_directions=6)
    assert heat.shape == (2, 3, 9, 10, 11) and heat.dtype == torch.float32
    one = tf.tomographic_heatmap(vol[1], enc, n_directions=6)
    torch.testing.assert_close(one[0], heat[1], rtol=1e-5, atol=1e-5)
    # 3D volume with a single-score encoder gives (D, H, W)
    assert tf.tomographic_heatmap(vol[0, 0], lambda x: x.mean(dim=(1, 2, 3)), n_directions=4).shape == (9, 10, 11)


def test_int16_volume_and_float64():
    vol = (torch.rand(8, 9, 10) * 1000 - 500).to(torch.int16)
    heat = tf.tomographic_heatmap(vol, lambda x: x.mean(dim=(1, 2, 3)), n_directions=4)
    assert heat.dtype == torch.float32
    heat64 = tf.tomographic_heatmap(vol.double(), lambda x: x.mean(dim=(1, 2, 3)), n_directions=4)
    assert heat64.dtype == torch.float64
    torch.testing.assert_close(heat.double(), heat64, rtol=1e-4, atol=1e-3)


def test_batch_size_does_not_change_the_result():
    torch.manual_seed(0)
    vol = torch.randn(9, 10, 11, dtype=torch.float64)
    calls = []

    def enc(x):
        calls.append(x.shape[0])
        return x.mean(dim=(1, 2, 3))

    a = tf.tomographic_heatmap(vol, enc, n_directions=5, batch_size=7)
    assert max(calls) <= 7
    b = tf.tomographic_heatmap(vol, enc, n_directions=5, batch_size=1000)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_progress_bar(capsys):
    tf.tomographic_heatmap(torch.rand(6, 6, 6), lambda x: x.mean(dim=(1, 2, 3)), n_directions=3, progress=True)
    assert "slice" in capsys.readouterr().err


@pytest.mark.parametrize("volume, encoder, kw, exc, msg", [
    (torch.rand(5, 5), None, {}, ValueError, "volume must have 3"),
    (torch.rand(1, 1, 1, 5, 5, 5), None, {}, ValueError, "volume must have 3"),
    (torch.rand(0, 5, 5), None, {}, ValueError, "volume must not be empty"),
    (torch.tensor([[[float("nan")]]]).expand(3, 3, 3), None, {}, ValueError, "NaN"),
    (torch.rand(5, 5, 5) > 0.5, None, {}, TypeError, "bool"),
    (torch.rand(5, 5, 5), None, {"spacing": (1, 0, 1)}, ValueError, "spacing"),
    (torch.rand(5, 5, 5), None, {"directions": [[0, 0, 0]]}, ValueError, "non-zero"),
    (torch.rand(5, 5, 5), None, {"directions": [[float("inf"), 0, 1]]}, ValueError, "finite"),
    (torch.rand(5, 5, 5), lambda x: x.sum(), {}, ValueError, "encoder must return scores of shape"),
    (torch.rand(5, 5, 5), lambda x: [1.0], {}, TypeError, "encoder must return a torch.Tensor"),
    (torch.rand(5, 5, 5), "not callable", {}, TypeError, "encoder must be callable"),
    (torch.rand(5, 5, 5), None, {"filter": "ramp3"}, ValueError, "filter must be one of"),
    (torch.rand(5, 5, 5), None, {"backend": "opencl"}, ValueError, "backend must be one of"),
    (torch.rand(5, 5, 5), None, {"batch_size": 0}, ValueError, "batch_size"),
])
def test_bad_inputs(volume, encoder, kw, exc, msg):
    encoder = encoder or (lambda x: x.mean(dim=(1, 2, 3)))
    with pytest.raises(exc, match=msg):
        tf.tomographic_heatmap(volume, encoder, n_directions=3, **kw)


def test_non_unit_directions_are_normalised():
    vol = torch.rand(6, 7, 8, dtype=torch.float64)
    enc = lambda x: x.mean(dim=(1, 2, 3))
    a = tf.tomographic_heatmap(vol, enc, directions=[[0, 0, 2.0], [3.0, 0, 0]])
    b = tf.tomographic_heatmap(vol, enc, directions=[[0, 0, 1.0], [1.0, 0, 0]])
    torch.testing.assert_close(a, b)
