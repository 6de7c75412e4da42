"""Inputs from the tools users already hold: nibabel images, MONAI MetaTensors and NumPy arrays as volumes (spacing
and axis order as tonno_fast.load_nifti reads a file), and models passed as they are (a 3-channel torchvision
ResNet-18, TorchScript, timm's pretrained_cfg) behaving as the same model wrapped in an Encoder."""
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tonno_fast as tf
from tonno_fast.encoder import IMAGENET_MEAN, IMAGENET_STD, Encoder, error_line, model_in_channels


def _metatensor():
    """MONAI's MetaTensor (MONAI is a development requirement; the library itself never needs it)."""
    return pytest.importorskip("monai.data").MetaTensor

# An oblique, flipped, anisotropic affine: spacing (sz, sy, sx) = (2.5, 1.5, 1.2) mm from its column norms.
AFFINE = np.array([[-1.2, 0.0, 0.0, 10.0], [0.0, 0.0, 2.5, -5.0], [0.0, 1.5, 0.0, 3.0], [0, 0, 0, 1]])
SPACING = (2.5, 1.5, 1.2)
GEO = dict(n_directions=5, slice_size=21, pixel_spacing=1.5)


@pytest.fixture
def data():
    """A scan as nibabel hands it over: file voxel axes (i, j, k) = (x, y, z)."""
    rng = np.random.default_rng(0)
    d = rng.random((9, 8, 7)).astype(np.float32)
    d[2:5, 3:6, 1:4] += 2.0
    return d


def _zyx(d) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(d.transpose(2, 1, 0)))


def _weighted(x):  # a fixed score that depends on where the slice's mass lies, not only on how much there is
    h, w = x.shape[-2:]
    ramp = torch.linspace(-1, 1, w, dtype=x.dtype)[None, :] + 0.5 * torch.linspace(-1, 1, h, dtype=x.dtype)[:, None]
    return (x[:, 0] * (1.0 + ramp)).sum(dim=(-2, -1))


def test_nibabel_image_takes_its_spacing_and_axis_order(data, tmp_path):
    img = nib.Nifti1Image(data, AFFINE)
    ref = tf.tomographic_heatmap(_zyx(data), _weighted, spacing=SPACING, **GEO)
    got = tf.tomographic_heatmap(img, _weighted, **GEO)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    # The same image read from a file and in memory: one reading.
    nib.save(img, str(tmp_path / "scan.nii.gz"))
    from_file, in_memory = tf.load_nifti(tmp_path / "scan.nii.gz"), tf.load_nifti(img)
    assert in_memory.spacing == pytest.approx(SPACING) and from_file.spacing == pytest.approx(SPACING)  # file: float32
    torch.testing.assert_close(in_memory.data, from_file.data, rtol=0, atol=0)
    np.testing.assert_allclose(in_memory.affine, AFFINE)
    np.testing.assert_allclose(from_file.affine, AFFINE, rtol=1e-6)
    # The spacing matters here (another spacing gives another map), so the equality above is a real check.
    other = tf.tomographic_heatmap(_zyx(data), _weighted, spacing=(1.2, 1.5, 2.5), **GEO)
    assert (other - ref).abs().max() > 1e-3 * ref.abs().max()
    with pytest.raises(ValueError, match=r"contradicts the nibabel image's affine \(2.5, 1.5, 1.2\)"):
        tf.tomographic_heatmap(img, _weighted, spacing=(1.0, 1.5, 1.2), **GEO)
    tf.tomographic_heatmap(img, _weighted, spacing=SPACING, **GEO)  # agreeing spacing is fine


def test_metatensor_in_and_out_keeps_rank_affine_and_order(data):
    MetaTensor = _metatensor()
    ref = tf.tomographic_heatmap(_zyx(data), _weighted, spacing=SPACING, **GEO)  # (D, H, W) = (z, y, x)
    ref_xyz = ref.permute(2, 1, 0)
    affine = torch.as_tensor(AFFINE, dtype=torch.float64)
    # (C, X, Y, Z), as MONAI's LoadImage(ensure_channel_first=True) gives: (K, X, Y, Z) back.
    mt = MetaTensor(torch.from_numpy(data)[None], affine=affine, meta={"filename_or_obj": "scan.nii.gz"})
    out = tf.tomographic_heatmap(mt, _weighted, **GEO)
    assert isinstance(out, MetaTensor) and out.shape == (1, 9, 8, 7)
    torch.testing.assert_close(out.affine, affine)
    assert out.meta["filename_or_obj"] == "scan.nii.gz"
    torch.testing.assert_close(out.as_tensor()[0], ref_xyz, rtol=0, atol=0)
    # (X, Y, Z) without a channel: (X, Y, Z) back.
    out3 = tf.tomographic_heatmap(MetaTensor(torch.from_numpy(data), affine=affine), _weighted, **GEO)
    assert isinstance(out3, MetaTensor) and out3.shape == (9, 8, 7)
    torch.testing.assert_close(out3.as_tensor(), ref_xyz, rtol=0, atol=0)
    # A batch (B, C, X, Y, Z) with batched affines (B, 4, 4): (B, K, X, Y, Z).
    pair = torch.stack([torch.from_numpy(data), torch.from_numpy(data[::-1].copy())])[:, None]
    batch = MetaTensor(pair, affine=affine.expand(2, 4, 4).clone())
    out5 = tf.tomographic_heatmap(batch, _weighted, **GEO)
    assert isinstance(out5, MetaTensor) and out5.shape == (2, 1, 9, 8, 7)
    torch.testing.assert_close(out5.as_tensor()[0, 0], ref_xyz, rtol=0, atol=0)
    with pytest.raises(ValueError, match="contradicts the MetaTensor's affine"):
        tf.tomographic_heatmap(mt, _weighted, spacing=(1.0, 1.0, 1.0), **GEO)
    mixed = affine.expand(2, 4, 4).clone()
    mixed[1, 0, 0] = -2.0
    with pytest.raises(ValueError, match="share one voxel spacing"):
        tf.tomographic_heatmap(MetaTensor(pair, affine=mixed), _weighted, **GEO)


def test_metatensor_from_monai_loadimage_matches_load_nifti(data, tmp_path):
    MetaTensor = _metatensor()
    from monai.transforms import LoadImage

    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(data, AFFINE), str(path))
    mt = LoadImage(image_only=True, ensure_channel_first=True)(str(path))
    assert isinstance(mt, MetaTensor) and mt.shape == (1, 9, 8, 7)
    scan = tf.load_nifti(path)
    ref = tf.tomographic_heatmap(scan.data, _weighted, spacing=scan.spacing, **GEO)
    out = tf.tomographic_heatmap(mt, _weighted, **GEO)
    torch.testing.assert_close(out.as_tensor()[0], ref.permute(2, 1, 0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out.affine.numpy(), mt.affine.numpy())
    # Written with MONAI's affine, the heatmap lies where tonno_fast.save_nifti puts it.
    tf.save_nifti(tmp_path / "ref.nii.gz", ref, scan.affine)
    np.testing.assert_allclose(np.asarray(nib.load(str(tmp_path / "ref.nii.gz")).dataobj), out.as_tensor()[0].numpy(),
                               rtol=1e-6, atol=1e-6)


def test_cam_pipelines_take_metatensor_nibabel_and_numpy(data):
    MetaTensor = _metatensor()
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(4, 1))
    torch.manual_seed(0)
    for p in conv.parameters():
        torch.nn.init.normal_(p)
    kw = dict(target_layers=[conv[1]], **GEO)
    ref = tf.averaged_cam(_zyx(data), conv, spacing=SPACING, **kw)
    out = tf.averaged_cam(MetaTensor(torch.from_numpy(data)[None], affine=torch.as_tensor(AFFINE)), conv, **kw)
    assert isinstance(out, MetaTensor) and out.shape == (1, 9, 8, 7)
    torch.testing.assert_close(out.as_tensor()[0], ref.permute(2, 1, 0), rtol=0, atol=0)
    torch.testing.assert_close(tf.tomographic_cam(nib.Nifti1Image(data, AFFINE), conv, **kw),
                               tf.tomographic_cam(_zyx(data), conv, spacing=SPACING, **kw), rtol=0, atol=0)
    torch.testing.assert_close(tf.averaged_cam(_zyx(data).numpy(), conv, spacing=SPACING, **kw), ref, rtol=0, atol=0)
    sw = tf.slicewise_cam(MetaTensor(torch.from_numpy(data), affine=torch.as_tensor(AFFINE)), conv,
                          target_layers=[conv[1]], pixel_spacing=1.5, slice_size=21)
    ref_sw = tf.slicewise_cam(_zyx(data), conv, target_layers=[conv[1]], pixel_spacing=1.5, slice_size=21,
                              spacing=SPACING)
    assert isinstance(sw, MetaTensor)
    torch.testing.assert_close(sw.as_tensor(), ref_sw.permute(2, 1, 0), rtol=0, atol=0)


def test_numpy_volumes(data):
    vol = _zyx(data)
    ref = tf.tomographic_heatmap(vol, _weighted, spacing=SPACING, **GEO)
    torch.testing.assert_close(tf.tomographic_heatmap(vol.numpy(), _weighted, spacing=SPACING, **GEO), ref,
                               rtol=0, atol=0)
    big_endian = vol.numpy().astype(">f4")
    torch.testing.assert_close(tf.tomographic_heatmap(big_endian, _weighted, spacing=SPACING, **GEO), ref,
                               rtol=0, atol=0)
    geometry = tf.make_geometry(tuple(vol.shape), spacing=SPACING, **GEO)
    sino = tf.encode_slices(vol[None, None], geometry, _weighted)
    torch.testing.assert_close(tf.encode_slices(vol.numpy(), geometry, _weighted), sino, rtol=0, atol=0)
    torch.testing.assert_close(tf.encode_slices(nib.Nifti1Image(data, AFFINE), geometry, _weighted), sino,
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="contradicts the geometry's spacing"):
        tf.encode_slices(nib.Nifti1Image(data, np.eye(4)), geometry, _weighted)


def test_monai_is_imported_only_for_a_metatensor():
    code = ("import sys, torch, tonno_fast as tf\n"
            "tf.tomographic_heatmap(torch.rand(6, 6, 6), lambda x: x.sum((1, 2, 3)), spacing=1.0, n_directions=3)\n"
            "assert not any(m == 'monai' or m.startswith('monai.') for m in sys.modules), 'monai imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


# --------------------------------------------------------------------------------------------------- encoders
def _resnet18():
    from torchvision.models import resnet18

    torch.manual_seed(0)
    return resnet18(weights=None, num_classes=2)


def test_three_channel_resnet18_passed_directly(data):
    model = _resnet18()
    assert model.training and model_in_channels(model) == 3
    vol = _zyx(data)
    kw = dict(spacing=SPACING, n_directions=3, slice_size=32, pixel_spacing=0.6)
    direct = tf.tomographic_heatmap(vol, model, **kw)
    assert direct.shape == (1, 2, 7, 8, 9) and torch.isfinite(direct).all()
    assert not model.training  # put in eval mode, as Encoder(model) does: BatchNorm must not mix slices
    torch.testing.assert_close(direct, tf.tomographic_heatmap(vol, Encoder(model), **kw), rtol=0, atol=0)
    # What "replicated to 3 channels" means: the model fed the 1-channel slice three times.
    manual = tf.tomographic_heatmap(vol, lambda x: model(x.repeat(1, 3, 1, 1)), **kw)
    torch.testing.assert_close(direct, manual, rtol=0, atol=0)
    # TorchScript: the same channels (read from the scripted Conv2d), the same map.
    scripted = torch.jit.script(model)
    assert model_in_channels(scripted) == 3
    torch.testing.assert_close(tf.tomographic_heatmap(vol, scripted, **kw), direct, rtol=1e-5, atol=1e-5)
    # dtype: a float64 model gets float64 batches (scores back in the volume's float32).
    model64 = _resnet18().double()
    out64 = tf.tomographic_heatmap(vol, model64, **kw)
    assert out64.dtype == torch.float32
    torch.testing.assert_close(out64, direct, rtol=1e-4, atol=1e-4)
    # A CAM pipeline with the same model as it is.
    cam = tf.averaged_cam(vol, model, target_layers=[model.layer4], targets=1, **kw)
    assert cam.shape == (7, 8, 9) and torch.isfinite(cam).all() and cam.abs().max() > 0
    torch.testing.assert_close(cam, tf.averaged_cam(vol, Encoder(model), target_layers=[model.layer4], targets=1,
                                                    **kw), rtol=0, atol=0)


def test_pretrained_cfg_and_normalize_override(data):
    model = _resnet18()
    vol = _zyx(data)
    kw = dict(spacing=SPACING, n_directions=3, slice_size=32, pixel_spacing=0.6)
    plain = tf.tomographic_heatmap(vol, model, **kw)
    model.pretrained_cfg = {"mean": (0.2, 0.3, 0.4), "std": (0.5, 0.6, 0.7), "input_size": (3, 224, 224)}
    with_cfg = tf.tomographic_heatmap(vol, model, **kw)
    explicit = tf.tomographic_heatmap(vol, Encoder(model, mean=(0.2, 0.3, 0.4), std=(0.5, 0.6, 0.7)), **kw)
    torch.testing.assert_close(with_cfg, explicit, rtol=0, atol=0)
    assert (with_cfg - plain).abs().max() > 1e-3 * plain.abs().max()
    torch.testing.assert_close(tf.tomographic_heatmap(vol, Encoder(model, normalize="none"), **kw), plain,
                               rtol=0, atol=0)
    imagenet = Encoder(model, normalize="imagenet")
    assert imagenet.mean.tolist() == pytest.approx(IMAGENET_MEAN) and imagenet.std.tolist() == pytest.approx(IMAGENET_STD)
    assert Encoder(model).with_normalize(None).mean is None
    with pytest.raises(ValueError, match="not both"):
        Encoder(model, normalize="imagenet", mean=(0.5,))
    with pytest.raises(ValueError, match="normalize must be"):
        Encoder(model, normalize="z-score")


def test_timm_model_passed_directly(data):
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False, num_classes=1)
    cfg = model.pretrained_cfg
    assert cfg["mean"] is not None and cfg["std"] is not None
    vol = _zyx(data)
    kw = dict(spacing=SPACING, n_directions=3, slice_size=32, pixel_spacing=0.6)
    direct = tf.tomographic_heatmap(vol, model, **kw)
    torch.testing.assert_close(direct, tf.tomographic_heatmap(vol, Encoder(model, mean=cfg["mean"], std=cfg["std"]),
                                                              **kw), rtol=0, atol=0)
    raw = tf.tomographic_heatmap(vol, Encoder(model, normalize=None), **kw)
    assert (direct - raw).abs().max() > 1e-3 * raw.abs().max()


def test_bundle_keeps_its_own_normalization(tmp_path):
    model = _resnet18()
    model.pretrained_cfg = {"mean": (0.2, 0.3, 0.4), "std": (0.5, 0.6, 0.7)}
    path = tf.save_encoder(tmp_path / "b.pt", model, slice_size=32, pixel_spacing=0.6,
                           factory="torchvision.models:resnet18", factory_kwargs={"num_classes": 2})
    enc = tf.load_encoder(path)
    assert enc.mean.tolist() == pytest.approx([0.2, 0.3, 0.4]) and enc.std.tolist() == pytest.approx([0.5, 0.6, 0.7])
    none = tf.save_encoder(tmp_path / "n.pt", Encoder(model, normalize=None), slice_size=32, pixel_spacing=0.6,
                           factory="torchvision.models:resnet18", factory_kwargs={"num_classes": 2})
    assert tf.load_encoder(none).mean is None
    assert tf.load_encoder(none, normalize="imagenet").mean.tolist() == pytest.approx(IMAGENET_MEAN)


class _RawConv(torch.nn.Module):
    """A 3-channel convolution through F.conv2d: nothing says how many channels it takes."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(2, 3, 3, 3))

    def forward(self, x):
        return F.conv2d(x, self.weight).mean(dim=(1, 2, 3))


def test_torchscript_error_is_one_line_naming_the_cause():
    scripted = torch.jit.script(_RawConv())
    with pytest.raises(Exception) as info:
        scripted(torch.zeros(2, 1, 8, 8))
    assert "TorchScript interpreter" in str(info.value)
    line = error_line(info.value)
    assert "\n" not in line and "TorchScript interpreter" not in line
    assert "to have 3 channels, but got 1 channels" in line
    with pytest.raises(RuntimeError, match=r"encoder raised .*expected input\[.*to have 3 channels, but got 1 "):
        tf.tomographic_heatmap(torch.rand(6, 6, 6), scripted, spacing=1.0, n_directions=2)
