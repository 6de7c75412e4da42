"""Encoder bundles (weights + the slice geometry they were trained on), pipelines that take a Geometry or a
bundle's geometry, required spacing, and the 2D baseline at a given pixel spacing."""
import numpy as np
import pytest
import torch
from torch import nn

import tonno_fast as tf
from tonno_fast.bundle import is_encoder_bundle
from tonno_fast.demo.model import SliceCNN
from tonno_fast.io import NiftiVolume

SP = (2.0, 1.5, 1.5)


def _vol(shape=(9, 12, 10), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) + 0.5


def _cnn():
    torch.manual_seed(0)
    return SliceCNN(widths=(4, 4, 8, 8), norm="group").eval()


@pytest.mark.parametrize("torchscript", [False, True])
def test_save_and_load_round_trip(tmp_path, torchscript):
    net = _cnn()
    path = tf.save_encoder(tmp_path / "enc.pt", net, slice_size=16, pixel_spacing=3.0, zscore=True,
                           factory_kwargs={"widths": (4, 4, 8, 8), "norm": "group"}, torchscript=torchscript,
                           metadata={"objective": "bag", "steps": 10})
    assert is_encoder_bundle(path)
    enc = tf.load_encoder(path)
    assert isinstance(enc, tf.Encoder)
    assert enc.input_size == (16, 16) and enc.pixel_spacing == 3.0 and enc.in_channels == 1 and enc.zscore
    assert enc.bundle["metadata"] == {"objective": "bag", "steps": 10}
    assert enc.bundle["geometry"] == {"slice_size": [16, 16], "pixel_spacing": 3.0, "channels": 1}
    x = torch.rand(5, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(enc.model(x), net(x))
    # Encoder keyword arguments override what the bundle says.
    assert tf.load_encoder(path, pixel_spacing=2.0, batch_size=7).pixel_spacing == 2.0


def test_slicecnn_options_travel_in_the_bundle(tmp_path):
    # No factory_kwargs given: SliceCNN's own constructor arguments (pooling, top_k, ...) are stored.
    torch.manual_seed(1)
    net = SliceCNN(widths=(4, 4, 8, 8), norm="group", pooling="topk", top_k=3, sharpness=4.0).eval()
    path = tf.save_encoder(tmp_path / "enc.pt", net, slice_size=16, pixel_spacing=3.0)
    enc = tf.load_encoder(path)
    assert torch.load(path, weights_only=True)["model"]["factory_kwargs"]["pooling"] == "topk"
    assert (enc.model.pooling, enc.model.top_k, enc.model.sharpness) == ("topk", 3, 4.0)
    x = torch.rand(5, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(enc.model(x), net(x))


def test_bundle_from_an_encoder_and_errors(tmp_path):
    net = _cnn()
    wrapped = tf.Encoder(net, input_size=(16, 12), pixel_spacing=2.5, window=(0.0, 2.0))
    p = tf.save_encoder(tmp_path / "b.pt", wrapped, factory_kwargs={"widths": (4, 4, 8, 8), "norm": "group"})
    enc = tf.load_encoder(p)
    assert enc.input_size == (16, 12) and enc.pixel_spacing == 2.5 and enc.window == (0.0, 2.0)
    with pytest.raises(ValueError, match="pixel_spacing is required"):
        tf.save_encoder(tmp_path / "c.pt", net, slice_size=16)
    with pytest.raises(ValueError, match="slice_size is required"):
        tf.save_encoder(tmp_path / "c.pt", net, pixel_spacing=1.0)
    with pytest.raises(ValueError, match="factory"):
        tf.save_encoder(tmp_path / "c.pt", net, slice_size=16, pixel_spacing=1.0, factory="no_such_module:make")
    with pytest.raises(ValueError, match="do not fit"):  # factory SliceCNN with no arguments: other widths
        tf.load_encoder(tf.save_encoder(tmp_path / "d.pt", net, slice_size=16, pixel_spacing=1.0,
                                        factory="tonno_fast.demo.model:SliceCNN"))
    junk = tmp_path / "junk.pt"
    torch.save({"weights": torch.zeros(3)}, junk)
    with pytest.raises(ValueError, match="not an encoder bundle"):
        tf.load_encoder(junk)
    with pytest.raises(FileNotFoundError):
        tf.load_encoder(tmp_path / "missing.pt")
    assert not is_encoder_bundle(junk)


class _Mean(nn.Module):
    def forward(self, x):
        return x.mean(dim=(1, 2, 3))


def test_pipelines_use_the_bundle_geometry(tmp_path):
    vol = _vol()
    p = tf.save_encoder(tmp_path / "m.pt", _Mean(), slice_size=14, pixel_spacing=2.5, channels=1, torchscript=True)
    enc = tf.load_encoder(p)
    a = tf.tomographic_heatmap(vol, enc, n_directions=5, spacing=SP)
    b = tf.tomographic_heatmap(vol, _Mean(), n_directions=5, spacing=SP, slice_size=14, pixel_spacing=2.5)
    torch.testing.assert_close(a, b)
    # Told otherwise: an explicit pixel spacing wins.
    c = tf.tomographic_heatmap(vol, enc, n_directions=5, spacing=SP, pixel_spacing=1.0)
    d = tf.tomographic_heatmap(vol, _Mean(), n_directions=5, spacing=SP, slice_size=14, pixel_spacing=1.0)
    torch.testing.assert_close(c, d)


def test_geometry_argument_and_spacing_from_the_scan():
    vol = _vol()
    enc = lambda x: x.mean(dim=(1, 2, 3))  # noqa: E731
    geom = tf.make_geometry(vol.shape, spacing=SP, n_directions=6, slice_size=12, pixel_spacing=2.0)
    a = tf.tomographic_heatmap(vol, enc, geometry=geom)
    b = tf.tomographic_heatmap(vol, enc, spacing=SP, n_directions=6, slice_size=12, pixel_spacing=2.0)
    torch.testing.assert_close(a, b)
    scan = NiftiVolume(vol, SP, np.eye(4))
    torch.testing.assert_close(tf.tomographic_heatmap(scan, enc, n_directions=6, slice_size=12, pixel_spacing=2.0), b)
    cam_kw = dict(method=lambda x: x[:, 0])
    for fn in (tf.averaged_cam, tf.tomographic_cam):
        torch.testing.assert_close(fn(vol, enc, geometry=geom, **cam_kw),
                                   fn(scan, enc, n_directions=6, slice_size=12, pixel_spacing=2.0, **cam_kw))
    with pytest.raises(ValueError, match="spacing is required"):
        tf.tomographic_heatmap(vol, enc, n_directions=3)
    with pytest.raises(ValueError, match="spacing is required"):
        tf.averaged_cam(vol, enc, n_directions=3, **cam_kw)
    with pytest.raises(ValueError, match="not both"):
        tf.tomographic_heatmap(vol, enc, geometry=geom, n_directions=3)
    with pytest.raises(ValueError, match="shape"):
        tf.tomographic_heatmap(vol[:-1], enc, geometry=geom)
    with pytest.raises(ValueError, match="contradicts"):
        tf.tomographic_heatmap(vol, enc, geometry=geom, spacing=1.0)
    with pytest.raises(ValueError, match="contradicts the scan"):
        tf.tomographic_heatmap(scan, enc, spacing=1.0, n_directions=3)
    with pytest.raises(TypeError, match="Geometry"):
        tf.tomographic_heatmap(vol, enc, geometry={"n_directions": 3})


def _centre_pad(vol, size):
    """The axial images centred in a ``size × size`` box (the 2D baseline by hand)."""
    D, H, W = vol.shape
    out = torch.zeros(D, size, size, dtype=vol.dtype)
    oh, ow = (size - H) // 2, (size - W) // 2
    out[:, oh:oh + H, ow:ow + W] = vol
    return out, (oh, ow)


def test_slicewise_cam_at_a_pixel_spacing():
    vol = _vol((7, 12, 10)).double()
    identity = lambda x: x[:, 0]  # noqa: E731  (the CAM is the slice itself)
    enc = lambda x: x.mean(dim=(1, 2, 3))  # noqa: E731
    # At the volume's own in-plane spacing and a size of the same parity, the axial slices are the images
    # padded with zeros: the CAM mapped back is the volume itself.
    out = tf.slicewise_cam(vol, enc, method=identity, pixel_spacing=1.5, spacing=SP, slice_size=16)
    torch.testing.assert_close(out, vol, rtol=1e-12, atol=1e-12)
    # What the model sees is the centred, zero-padded image.
    seen = []
    tf.slicewise_cam(vol, enc, method=lambda x: seen.append(x[:, 0].clone()) or x[:, 0], pixel_spacing=1.5,
                     spacing=SP, slice_size=16)
    padded, _ = _centre_pad(vol, 16)
    torch.testing.assert_close(torch.cat(seen[1:]), padded, rtol=1e-12, atol=1e-12)  # seen[0]: the K probe
    # A bundle-like Encoder carries the pixel spacing and size; a geometry gives its in-plane part.
    wrapped = tf.Encoder(enc, input_size=16, pixel_spacing=1.5, in_channels=None)
    torch.testing.assert_close(tf.slicewise_cam(vol, wrapped, method=identity, spacing=SP), vol)
    geom = tf.make_geometry(vol.shape, spacing=SP, n_directions=3, slice_size=16, pixel_spacing=1.5)
    torch.testing.assert_close(tf.slicewise_cam(vol, enc, method=identity, geometry=geom), vol)
    with pytest.raises(ValueError, match="spacing is required"):
        tf.slicewise_cam(vol, enc, method=identity, pixel_spacing=1.5)
    # Coarser pixels than voxels: a smoothed copy, still matching the volume where it is smooth.
    smooth = torch.linspace(0, 1, 10, dtype=torch.float64).expand(7, 12, 10).contiguous()
    half = tf.slicewise_cam(smooth, enc, method=identity, pixel_spacing=3.0, spacing=SP, slice_size=8)
    torch.testing.assert_close(half[:, 2:-2, 2:-2], smooth[:, 2:-2, 2:-2], rtol=0, atol=1e-9)


def test_one_default_cam_method():
    import inspect
    defaults = {fn.__name__: inspect.signature(fn).parameters["method"].default
                for fn in (tf.averaged_cam, tf.tomographic_cam, tf.slicewise_cam)}
    assert set(defaults.values()) == {"gradcam"}, defaults
