"""CAM methods on slices (native GradCAM/LayerCAM against pytorch_grad_cam) and the CAM pipelines
(Averaged CAM, Tomographic CAM, slice-wise CAM) against the score pipeline and the volume itself."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tonno_fast as tf
from tonno_fast.cam import GradCAM, LayerCAM, PytorchGradCAM, gradcam, layercam, vit_reshape_transform
from tonno_fast.cam.upsample import BilinearUpsampler

from conftest import gaussian_blobs

pgc = pytest.importorskip("pytorch_grad_cam")
torchvision = pytest.importorskip("torchvision")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:tonno_fast. compiled CPU kernels unavailable")


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=5).eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _scale(a):
    """pytorch_grad_cam's per-image min-max normalisation (scale_cam_image) in torch."""
    a = a - a.amin(dim=(-2, -1), keepdim=True)
    return a / (1e-7 + a.amax(dim=(-2, -1), keepdim=True))


NATIVE = {"gradcam": (gradcam, pgc.GradCAM), "layercam": (layercam, pgc.LayerCAM)}


@pytest.mark.parametrize("name", list(NATIVE))
def test_native_cam_equals_pytorch_grad_cam_before_normalisation(resnet, images, name):
    ours, theirs = NATIVE[name]
    targets = [0, 3, 1]  # per-sample classes
    cam = theirs(resnet, [resnet.layer3])
    tg = [ClassifierOutputTarget(k) for k in targets]
    cam(input_tensor=images, targets=tg)
    A = cam.activations_and_grads.activations[0].numpy()
    G = cam.activations_and_grads.gradients[0].numpy()
    raw = np.maximum(cam.get_cam_image(images, resnet.layer3, tg, A, G, False), 0)  # what it normalises
    mine = ours(resnet, images, "layer3", targets=targets, size=A.shape[-2:])
    assert mine.shape == (3, 1) + A.shape[-2:] and mine.dtype == torch.float32
    assert raw.max() > 0
    np.testing.assert_allclose(mine[:, 0].numpy(), raw, rtol=1e-5, atol=1e-6 * raw.max())


@pytest.mark.parametrize("name", list(NATIVE))
def test_native_cam_equals_pytorch_grad_cam_after_its_normalisation(resnet, images, name):
    ours, theirs = NATIVE[name]
    out = theirs(resnet, [resnet.layer2])(input_tensor=images,
                                          targets=[ClassifierOutputTarget(k) for k in (2, 2, 4)])
    mine = ours(resnet, images, [resnet.layer2], targets=torch.tensor([2, 2, 4]), size=(8, 8))
    # pytorch_grad_cam: normalise per image at layer resolution, resize, normalise again.
    mine = _scale(F.interpolate(_scale(mine), size=(64, 64), mode="bilinear", align_corners=False))[:, 0]
    np.testing.assert_allclose(mine.numpy(), out, atol=1e-5)


def test_multiclass_broadcast_and_batched(resnet, images):
    both = gradcam(resnet, images, "layer3", targets=torch.tensor([[1, 4]] * 3))  # (M, K) targets
    assert both.shape == (3, 2, 64, 64)
    for j, k in enumerate((1, 4)):
        torch.testing.assert_close(both[:, j], gradcam(resnet, images, "layer3", targets=k)[:, 0])
    one_by_one = torch.cat([layercam(resnet, images[m:m + 1], "layer3", targets=2) for m in range(3)])
    torch.testing.assert_close(layercam(resnet, images, "layer3", targets=[2, 2, 2]), one_by_one,
                               rtol=1e-4, atol=1e-6)
    pred = resnet(images).argmax(dim=1)
    torch.testing.assert_close(gradcam(resnet, images, "layer3"), gradcam(resnet, images, "layer3", targets=pred))


def test_callable_target_and_frozen_model(resnet, images):
    def target(out):
        return out.softmax(dim=1)[:, 2]

    unfrozen = layercam(resnet, images, "layer3", targets=target)
    for p in resnet.parameters():
        p.requires_grad_(False)
    try:
        frozen = layercam(resnet, images, "layer3", targets=target)
    finally:
        for p in resnet.parameters():
            p.requires_grad_(True)
    assert frozen.shape == (3, 1, 64, 64) and bool(frozen.amax() > 0)
    torch.testing.assert_close(frozen, unfrozen)


def test_adapter_matches_native(resnet, images):
    enc = tf.Encoder(resnet, output=(0, 3))
    adapted = PytorchGradCAM(pgc.GradCAM(resnet, [resnet.layer2]))(enc, images)
    native = GradCAM(["layer2"])(enc, images)  # raw, upsampled to the slice size
    assert adapted.shape == native.shape == (3, 2, 64, 64)
    # The adapter's maps are normalised per image by pytorch_grad_cam (at the layer's resolution, then
    # again after resizing; see the test above); the native ones are raw: compare after the same steps.
    raw = gradcam(resnet, images, "layer2", targets=torch.tensor([[0, 3]] * 3), size=(8, 8))  # layer resolution
    expect = _scale(F.interpolate(_scale(raw), size=(64, 64), mode="bilinear", align_corners=False))
    torch.testing.assert_close(adapted, expect, atol=1e-5, rtol=0)
    torch.testing.assert_close(F.interpolate(raw, size=(64, 64), mode="bilinear", align_corners=False), native)


class TinyViT(nn.Module):
    """Patch embedding + class token + one MLP block + head on the class token: tokens (M, 1 + 16, E)."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 8, stride=8)
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.block = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.GELU())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1)
        t = t + self.block(t)
        return self.head(t.mean(dim=1))


def test_vit_reshape_transform_matches_pytorch_grad_cam(images):
    torch.manual_seed(3)
    vit = TinyViT().eval()
    x = images[:, :, :32, :32]
    rt = vit_reshape_transform(4, 4)
    cam = pgc.GradCAM(vit, [vit.block], reshape_transform=rt)
    tg = [ClassifierOutputTarget(1)] * 3
    cam(input_tensor=x, targets=tg)
    A = cam.activations_and_grads.activations[0].numpy()
    G = cam.activations_and_grads.gradients[0].numpy()
    raw = np.maximum(cam.get_cam_image(x, vit.block, tg, A, G, False), 0)
    mine = gradcam(vit, x, "block", targets=1, reshape_transform=rt, size=(4, 4))
    np.testing.assert_allclose(mine[:, 0].numpy(), raw, rtol=1e-5, atol=1e-6 * raw.max())


def test_target_layer_errors(resnet, images):
    with pytest.raises(ValueError, match="target_layers is required"):
        gradcam(resnet, images, None)
    with pytest.raises(ValueError, match="no submodule 'layer9'"):
        gradcam(resnet, images, "layer9")
    with pytest.raises(ValueError, match="ran 2 times"):
        gradcam(resnet, images, "layer4.1.relu")  # torchvision's BasicBlock reuses its ReLU
    with pytest.raises(ValueError, match="M = 3 rows"):
        gradcam(resnet, images, "layer4", targets=[1, 2])
    torch.testing.assert_close(gradcam(resnet, images, "layer4.1", targets=0),
                               gradcam(resnet, images, resnet.layer4[1], targets=0))


# ------------------------------------------------------------------------------------------------------------
# Pipelines
# ------------------------------------------------------------------------------------------------------------
def _sum_encoder(pixel_area):
    return lambda x: x.sum(dim=(-3, -2, -1)) * pixel_area


@pytest.mark.parametrize("filter", ["ramp2", "laplacian"])
def test_tomographic_cam_of_a_constant_cam_is_tonno(filter):
    """A CAM constant over each slice (= the slice's score) reconstructs exactly the ToNNO heatmap."""
    vol = gaussian_blobs((13, 14, 12), spacing=(1.2, 1.0, 1.1))
    kw = dict(spacing=(1.2, 1.0, 1.1), n_directions=10, filter=filter, backend="reference")
    geom = tf.make_geometry(vol.shape, spacing=(1.2, 1.0, 1.1), n_directions=10)
    score = _sum_encoder(geom.pixel_area)

    def constant_cam(x):  # (M, c, h, w) → the score broadcast over the slice, two targets
        s = score(x)[:, None, None, None]
        return torch.cat([s, 2 * s - 1], dim=1).expand(-1, -1, *x.shape[-2:])

    heat = tf.tomographic_heatmap(vol, lambda x: torch.stack([score(x), 2 * score(x) - 1], dim=1), **kw)
    cam = tf.tomographic_cam(vol, score, method=constant_cam, **kw)
    assert cam.shape == heat.shape == (1, 2) + vol.shape and cam.dtype == torch.float64
    scale = heat.abs().max()
    torch.testing.assert_close(cam, heat, rtol=0, atol=1e-10 * scale)


def test_averaged_cam_of_the_slice_itself_is_a_blurred_volume():
    # Blobs of σ 2.5–3 mm well inside a 24³ volume (the 48³ master phantom would be cut by the border).
    vol = gaussian_blobs((24, 24, 24), blobs=[((3.0, -2.0, 1.0), 3.0, 1.0), ((-3.0, 3.0, -2.0), 2.5, 0.8)])
    out = tf.averaged_cam(vol, _sum_encoder(1.0), method=lambda x: x[:, 0], n_directions=16, backend="reference",
                          spacing=(1.0, 1.0, 1.0))
    assert out.shape == vol.shape
    rel = float((out - vol).norm() / vol.norm())
    # Slicing and mapping back each interpolate trilinearly: a slight blur (3.7% measured), nothing else.
    assert rel < 0.045, rel
    blurred = F.avg_pool3d(F.pad(vol[None, None], (1,) * 6, mode="replicate"), 3, stride=1)[0, 0]
    assert float((out - vol).norm()) < float((blurred - vol).norm())  # milder than a 3³ box blur


@pytest.mark.parametrize("fn", ["averaged", "tomographic"])
def test_cam_pipelines_invariant_to_chunking_and_direction_order(fn):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2)).eval()
    enc = tf.Encoder(net, output=(0, 1))
    vol = gaussian_blobs((12, 12, 12), dtype=torch.float32)
    dirs = tf.fibonacci_directions(7)
    w = torch.linspace(0.5, 1.5, 7) * (2 * math.pi / 7)
    f = tf.averaged_cam if fn == "averaged" else tf.tomographic_cam
    kw = dict(target_layers=[net[2]], weights=w, slice_size=16, backend="reference", spacing=(1.0, 1.0, 1.0))
    ref = f(vol, enc, directions=dirs, max_memory=1 << 30, **kw)
    small = f(vol, enc, directions=dirs, max_memory=200_000, batch_size=7, **kw)  # 1 direction per chunk
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(2))
    shuffled = f(vol, enc, directions=dirs[perm], max_memory=1 << 30, **{**kw, "weights": w[perm]})
    assert ref.shape == (1, 2, 12, 12, 12) and float(ref.abs().max()) > 0
    scale = float(ref.abs().max())
    for other in (small, shuffled):
        assert float((other - ref).abs().max()) <= 1e-6 * scale


@pytest.mark.parametrize("size_in,size_out", [((16, 16), (64, 64)), ((5, 7), (12, 9)), ((9, 6), (4, 5)),
                                               ((1, 3), (2, 3))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bilinear_upsampler_is_interpolate(size_in, size_out, dtype):
    x = torch.randn(2, 3, *size_in, dtype=dtype, generator=torch.Generator().manual_seed(0))
    expect = F.interpolate(x, size=size_out, mode="bilinear", align_corners=False)
    up = BilinearUpsampler(size_out)
    tol = (1e-12 if dtype == torch.float64 else 1e-6) * float(expect.abs().max())
    got = up(x)
    assert got.shape == expect.shape and got.dtype == dtype
    torch.testing.assert_close(got, expect, rtol=0, atol=tol)
    out = torch.full(expect.shape, float("nan"), dtype=dtype)
    assert up(x[:, :, None].transpose(1, 2)[:, 0], out=out) is out  # a non-contiguous view of the same maps
    torch.testing.assert_close(out, expect, rtol=0, atol=tol)


def test_native_cams_at_the_layer_resolution():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2)).eval()
    x = torch.randn(3, 1, 16, 12, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([[0, 1]] * 3)  # two CAMs per slice
    full = gradcam(net, x, [net[2]], targets=targets)
    low = tf.cam.methods.compute_cams(net, x, [net[2]], tf.cam.methods.make_score_fn(targets, 3),
                                      combine=tf.cam.methods._combine_gradcam, upsample=False)
    assert low.shape == (3, 2, 8, 6) and full.shape == (3, 2, 16, 12)
    torch.testing.assert_close(BilinearUpsampler((16, 12))(low), full, rtol=0, atol=1e-6 * float(full.abs().max()))
    # layers of different resolutions: each is upsampled before they are averaged, as without upsample=False
    both = tf.cam.methods.compute_cams(net, x, [net[0], net[2]], tf.cam.methods.make_score_fn(targets, 3),
                                       combine=tf.cam.methods._combine_gradcam, upsample=False)
    torch.testing.assert_close(both, gradcam(net, x, [net[0], net[2]], targets=targets))


@pytest.mark.parametrize("fn", ["averaged", "tomographic"])
def test_cam_pipelines_filter_and_backproject_maps_upsampled_late(fn, monkeypatch):
    """Native CAMs stay at the layer's resolution until the stacks are filtered: the same volume as upsampling
    every map first (float32 CAMs: to 1e-6 of the peak), whether the upsampled stacks are made a direction at a
    time or a chunk at a time."""
    from tonno_fast.cam import pipelines
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2)).eval()
    enc = tf.Encoder(net, output=(0, 1))
    vol = gaussian_blobs((12, 11, 10), dtype=torch.float64)
    f = tf.averaged_cam if fn == "averaged" else tf.tomographic_cam
    kw = dict(target_layers=[net[2]], n_directions=7, slice_size=(16, 14), spacing=(1.0, 1.1, 1.2))
    calls = []
    upsample = pipelines.BilinearUpsampler.__call__
    monkeypatch.setattr(pipelines.BilinearUpsampler, "__call__",
                        lambda self, x, out=None: calls.append(x.shape) or upsample(self, x, out))
    late = f(vol, enc, **kw)
    assert len(calls) == 1 and calls[0][-2:] == (8, 7), calls  # the whole chunk, at the layer's 8 × 7
    monkeypatch.setattr(pipelines, "UPSAMPLE_BYTES", 1)  # one direction per upsampled piece
    pieces = f(vol, enc, **kw)
    assert len(calls) == 1 + 7 and all(c[2] == 1 for c in calls[1:]), calls
    monkeypatch.setattr(tf.cam.methods._NativeCAM, "deferred_upsampling", False)
    early = f(vol, enc, **kw)
    assert len(calls) == 8  # maps upsampled by the CAM itself
    scale = float(early.abs().max())
    assert early.shape == (1, 2, 12, 11, 10) and scale > 0
    for other in (late, pieces):
        assert float((other - early).abs().max()) <= 1e-6 * scale


def test_slicewise_cam_is_the_stack_of_axial_cams():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    vol = torch.randn(5, 12, 10, generator=torch.Generator().manual_seed(4))
    enc = tf.Encoder(net, output=1)  # in_channels 3 read from the first conv: axial images replicated
    out = tf.slicewise_cam(vol, enc, target_layers="2", batch_size=2, max_memory=4000)
    expect = gradcam(net, vol[:, None].expand(-1, 3, -1, -1), "2", targets=1)[:, 0]
    assert out.shape == vol.shape
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-7)
    # identity CAM: the volume itself; resized for the model and back
    torch.testing.assert_close(tf.slicewise_cam(vol, enc, method=lambda x: x[:, 0]), vol)
    # resized for the model (×2) and back: a smooth volume survives to within interpolation error
    smooth = gaussian_blobs((5, 12, 10), blobs=[((0.5, -1.0, 0.0), 3.0, 1.0)], dtype=torch.float32)
    resized = tf.slicewise_cam(smooth, enc, method=lambda x: x[:, 0], slice_size=(24, 20))
    torch.testing.assert_close(resized, smooth, rtol=0, atol=0.04)  # 2.6% measured
    torch.testing.assert_close(tf.slicewise_cam(vol, enc, method=lambda x: x[:, 0] + 1, normalize="max"),
                               (vol + 1) / (vol + 1).abs().max())


def test_cam_argument_errors():
    vol = torch.rand(6, 6, 6)
    with pytest.raises(ValueError, match="method must be one of"):
        tf.averaged_cam(vol, lambda x: x.sum((1, 2, 3)), method="scorecam", n_directions=2, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(TypeError, match="must be an nn.Module"):
        tf.tomographic_cam(vol, lambda x: x.sum((1, 2, 3)), target_layers="0", n_directions=2, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="normalize must be one of"):
        tf.averaged_cam(vol, lambda x: x.sum((1, 2, 3)), method=lambda x: x[:, 0], normalize="l2",
                        spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="max_memory must be"):
        tf.averaged_cam(vol, lambda x: x.sum((1, 2, 3)), method=lambda x: x[:, 0], max_memory=0,
                        spacing=(1.0, 1.0, 1.0))


def test_targets_override_the_encoder_output():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(3, 3)).eval()
    vol = gaussian_blobs((8, 8, 8), blobs=[((0.0, 1.0, 0.0), 2.0, 1.0)], dtype=torch.float32)
    kw = dict(target_layers="0", n_directions=3, backend="reference", spacing=(1.0, 1.0, 1.0))
    a = tf.averaged_cam(vol, net, targets=[2, 0], **kw)
    b = tf.averaged_cam(vol, tf.Encoder(net, output=(2, 0)), **kw)
    assert a.shape == (1, 2, 8, 8, 8)
    torch.testing.assert_close(a, b)
    c = tf.tomographic_cam(vol, tf.Encoder(net, output=1), targets=lambda o: o[:, 0], **kw)
    torch.testing.assert_close(c, tf.tomographic_cam(vol, net, targets=0, **kw))
    assert c.shape == (8, 8, 8)


def test_autocast_cams_are_float32_and_close_to_float32_cams():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)).eval()
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    ref = LayerCAM("2")(tf.Encoder(net, output=1), x)
    low = LayerCAM("2")(tf.Encoder(net, output=1, autocast=torch.bfloat16), x)
    assert low.dtype == torch.float32 and low.shape == ref.shape == (4, 1, 16, 16) and float(ref.amax()) > 0
    torch.testing.assert_close(low, ref, rtol=0, atol=3e-2 * float(ref.amax()))


@pytest.mark.parametrize("filter,window", [("ramp2", None), ("ramp", "hann"), ("laplacian", None)])
def test_filter_matrix_is_apply_filter(filter, window):
    from tonno_fast.filters import filter_matrix
    from tonno_fast.filters import apply_filter
    g = torch.randn(3, 4, 17, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(6))  # S = 17
    M = filter_matrix(filter, window, 17, 0.7)
    expect = apply_filter(g.movedim(2, -1), filter, window, slice_spacing=0.7).movedim(-1, 2)
    torch.testing.assert_close(M @ g, expect, rtol=1e-12, atol=1e-12 * float(expect.abs().max()))
