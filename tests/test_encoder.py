"""The Encoder wrapper: input adaptation (window, z-score, context slices, channels, size), batching, output
selection, autocast, and its use in the score pipeline."""
import math

import pytest
import torch
from torch import nn

import tonno_fast as tf
from tonno_fast.encoder import Encoder

from conftest import gaussian_blobs

pytestmark = pytest.mark.filterwarnings("ignore:tonno_fast. compiled CPU kernels unavailable")


class Recorder:
    """A callable encoder that keeps every batch it sees and scores each slice by its mean per channel."""

    def __init__(self):
        self.batches = []

    def __call__(self, x):
        self.batches.append(x.detach().clone())
        return x.mean(dim=(-2, -1))


def axial_geometry_kwargs(shape):
    """Slices of the single direction e_z at the voxel grid: slice k is exactly volume[k] (1 mm spacing)."""
    D, H, W = shape
    return dict(directions=[[0.0, 0.0, 1.0]], n_slices=D, slice_size=(H, W), pixel_spacing=1.0,
                slice_spacing=1.0, filter="none", backend="reference", spacing=(1.0, 1.0, 1.0))


def test_axial_geometry_gives_the_volume_slices():
    vol = torch.rand(5, 6, 7, dtype=torch.float64)
    rec = Recorder()
    tf.tomographic_heatmap(vol, rec, **axial_geometry_kwargs(vol.shape))
    torch.testing.assert_close(torch.cat(rec.batches)[:, 0], vol)


def test_context_channels_are_the_neighbouring_slices():
    vol = torch.rand(5, 6, 7, dtype=torch.float64) + 1.0
    rec = Recorder()
    enc = Encoder(rec, context=1, context_step=2, in_channels=None)
    tf.tomographic_heatmap(vol, enc, fill=-1.0, **axial_geometry_kwargs(vol.shape))
    seen = torch.cat(rec.batches)  # (D, 3, H, W): slices k-2, k, k+2
    assert seen.shape == (5, 3, 6, 7)
    padded = torch.cat([torch.full((2, 6, 7), -1.0, dtype=vol.dtype), vol, torch.full((2, 6, 7), -1.0,
                                                                                       dtype=vol.dtype)])
    for k in range(5):
        torch.testing.assert_close(seen[k], padded[[k, k + 2, k + 4]])


def test_context_is_independent_of_chunking():
    """Slice ranges of one direction carry their halo: results equal the unchunked ones."""
    vol = gaussian_blobs((10, 11, 12))
    enc = Encoder(lambda x: x[:, 0].sum((-2, -1)) - 0.5 * x[:, 2].sum((-2, -1)), context=1, in_channels=None,
                  batch_size=5)
    ref = tf.tomographic_heatmap(vol, enc, n_directions=5, backend="reference", spacing=(1.0, 1.0, 1.0))
    chunked = tf.tomographic_heatmap(vol, enc, n_directions=5, backend="reference", max_memory=8 * 400 * 4 * 3,
                                     spacing=(1.0, 1.0, 1.0))
    torch.testing.assert_close(chunked, ref, rtol=1e-12, atol=1e-12 * float(ref.abs().max()))


def test_channel_replication_and_channel_normalisation():
    net = nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    enc = Encoder(net, mean=(0.1, 0.2, 0.3), std=(1.0, 2.0, 4.0))
    assert enc.in_channels == 3  # read from the first Conv2d
    x = torch.rand(4, 1, 9, 9)
    expect = net((x.repeat(1, 3, 1, 1) - torch.tensor([0.1, 0.2, 0.3])[:, None, None])
                 / torch.tensor([1.0, 2.0, 4.0])[:, None, None])
    torch.testing.assert_close(enc(x), expect)
    with pytest.raises(ValueError, match="not a multiple"):
        Encoder(net)(torch.rand(2, 2, 9, 9))


def test_window_is_applied_to_the_volume_and_the_fill():
    hu = torch.linspace(-1200, 800, 9 * 10 * 11).reshape(9, 10, 11)
    rec = Recorder()
    tf.tomographic_heatmap(hu, Encoder(rec, window=(-1000, 400), in_channels=None), fill=-2000.0,
                           **axial_geometry_kwargs(hu.shape))
    torch.testing.assert_close(torch.cat(rec.batches)[:, 0], ((hu + 1000) / 1400).clamp(0, 1))
    # oblique slices: the same as slicing the windowed volume with the windowed fill (0 here)
    enc = Encoder(lambda x: x.sum((1, 2, 3)), window=(-1000, 400), in_channels=None)
    a = tf.tomographic_heatmap(hu, enc, n_directions=4, fill=-2000.0, backend="reference", spacing=(1.0, 1.0, 1.0))
    b = tf.tomographic_heatmap(((hu + 1000) / 1400).clamp(0, 1), lambda x: x.sum((1, 2, 3)), n_directions=4,
                               backend="reference", spacing=(1.0, 1.0, 1.0))
    torch.testing.assert_close(a, b)


def test_zscore_per_volume_equals_slicing_the_standardised_volume():
    vols = torch.stack([gaussian_blobs((8, 9, 10)), 3 * gaussian_blobs((8, 9, 10)) + 7])[:, None]  # (2,1,D,H,W)
    f = lambda x: (x ** 2).sum((1, 2, 3))  # noqa: E731 - non-linear, so a wrong affine map would show
    fill = 0.5
    got = tf.tomographic_heatmap(vols, Encoder(f, zscore=True, in_channels=None), n_directions=5, fill=fill,
                                 backend="reference", spacing=(1.0, 1.0, 1.0))
    for b in range(2):
        v = vols[b, 0]
        mean, std = v.mean(), v.std()
        expect = tf.tomographic_heatmap((v - mean) / std, f, n_directions=5, fill=float((fill - mean) / std),
                                        backend="reference", spacing=(1.0, 1.0, 1.0))
        torch.testing.assert_close(got[b, 0], expect, rtol=1e-9, atol=1e-9 * float(expect.abs().max()))


def test_output_selection():
    model = lambda x: torch.stack([x.mean((1, 2, 3)), x.amax((1, 2, 3)), -x.mean((1, 2, 3))], dim=1)  # noqa
    x = torch.rand(6, 1, 5, 5)
    full = model(x)
    torch.testing.assert_close(Encoder(model)(x), full)
    torch.testing.assert_close(Encoder(model, output=1)(x), full[:, 1:2])
    torch.testing.assert_close(Encoder(model, output=[2, 0])(x), full[:, [2, 0]])
    torch.testing.assert_close(Encoder(model, output=lambda o: o.softmax(1)[:, 0])(x), full.softmax(1)[:, :1])
    with pytest.raises(IndexError, match="output=3 is out of range"):
        Encoder(model, output=3)(x)
    with pytest.raises(TypeError, match="output must be"):
        Encoder(model, output="logits")
    with pytest.raises(ValueError, match="NaN or inf"):
        Encoder(lambda x: x.sum((1, 2, 3)) / 0)(x)
    with pytest.raises(RuntimeError, match="encoder raised ZeroDivisionError"):
        Encoder(lambda x: 1 / 0)(x)


def test_autocast_bf16_gives_float32_scores_close_to_float32():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 2))
    x = torch.rand(5, 1, 16, 16)
    seen = []
    net[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    ref = Encoder(net)(x)
    low = Encoder(net, autocast=torch.bfloat16)(x)
    assert seen == [torch.float32, torch.bfloat16]
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))


def test_batching_input_size_and_slice_dtype():
    rec = Recorder()
    vol = torch.rand(7, 8, 9)
    enc = Encoder(rec, input_size=(12, 10), batch_size=13, slice_dtype=torch.bfloat16, in_channels=None)
    tf.tomographic_heatmap(vol, enc, n_directions=3, n_slices=11, spacing=(1.0, 1.0, 1.0))
    assert all(b.shape[0] <= 13 and b.shape[-2:] == (12, 10) and b.dtype == torch.bfloat16 for b in rec.batches)
    assert sum(b.shape[0] for b in rec.batches) == 3 * 11
    with pytest.raises(ValueError, match="contradicts the encoder's input_size"):
        tf.tomographic_heatmap(vol, enc, n_directions=3, slice_size=16, spacing=(1.0, 1.0, 1.0))


def test_device_placement_moves_batches_to_the_model_device():
    """Slices are made on the volume's device and each batch is moved to the model's; scores come back."""
    devices = []

    class Where(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, x):
            devices.append(x.device)
            return x.sum((1, 2, 3)) * self.w

    target = "cuda" if torch.cuda.is_available() else "cpu"
    enc = Encoder(Where().to(target))
    assert enc.device(torch.device("cpu")).type == target
    vol = gaussian_blobs((8, 8, 8), dtype=torch.float32)
    out = tf.tomographic_heatmap(vol, enc, n_directions=3, backend="reference", spacing=(1.0, 1.0, 1.0))
    assert out.device.type == "cpu" and set(d.type for d in devices) == {target}
    ref = tf.tomographic_heatmap(vol, lambda x: x.sum((1, 2, 3)), n_directions=3, backend="reference",
                                 spacing=(1.0, 1.0, 1.0))
    torch.testing.assert_close(out, ref)


def test_encoder_argument_errors():
    f = lambda x: x.sum((1, 2, 3))  # noqa: E731
    with pytest.raises(ValueError, match="window must be finite with hi > lo"):
        Encoder(f, window=(400, -1000))
    with pytest.raises(ValueError, match="context must be ≥ 0"):
        Encoder(f, context=-1)
    with pytest.raises(ValueError, match="autocast must be"):
        Encoder(f, autocast=torch.int8)
    with pytest.raises(TypeError, match="model must be an nn.Module or a callable"):
        Encoder(3)
    with pytest.raises(ValueError, match="batch_size must be"):
        Encoder(f, batch_size=0)
    assert math.isclose(Encoder(f, window=(0, 10)).prepare_volume(torch.zeros(1, 1, 2, 2, 2), 5.0)[1], 0.5)
