"""Streaming under a memory budget (docs/design.md, "Streaming"): the chunk tensors are bounded by
``max_memory``, results do not depend on the chunking, and the peak RSS of ``tomographic_cam`` does not grow
with the number of directions."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import tonno_fast as tf
import tonno_fast.cam.pipelines as cam_pipelines
import tonno_fast.pipeline as pipeline

from conftest import gaussian_blobs

pytestmark = pytest.mark.filterwarnings("ignore:tonno_fast. compiled CPU kernels unavailable")


def _tiny_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1)).eval()


@pytest.fixture
def recorded(monkeypatch):
    """Record the bytes of every slice chunk made and every CAM stack backprojected."""
    sizes = {"slices": [], "stacks": []}
    make = pipeline.GeometrySlicer.__call__
    bp = cam_pipelines.backproject_slices

    def slicer_call(self, *args):
        out = make(self, *args)
        sizes["slices"].append(out.numel() * out.element_size())
        return out

    def backproject(stack, *args, **kw):
        sizes["stacks"].append(stack.numel() * stack.element_size())
        return bp(stack, *args, **kw)

    monkeypatch.setattr(pipeline.GeometrySlicer, "__call__", slicer_call)
    monkeypatch.setattr(cam_pipelines, "backproject_slices", backproject)
    return sizes


@pytest.mark.parametrize("n_directions", [3, 12])
def test_chunks_stay_under_the_budget(recorded, n_directions):
    vol = gaussian_blobs((16, 16, 16), dtype=torch.float32)
    budget = 300_000
    S = h = w = 29  # covering counts for 16³ at 1 mm
    direction_stack = S * h * w * 4
    assert direction_stack < budget // 2 < 2 * direction_stack  # so exactly one direction per chunk
    tf.tomographic_cam(vol, _tiny_cnn(), target_layers="2", n_directions=n_directions, max_memory=budget,
                       batch_size=16, backend="reference")
    assert len(recorded["stacks"]) == n_directions
    assert max(recorded["stacks"]) <= budget // 2
    # slices in flight: at most a quarter of the budget (one slice position costs h·w·4 bytes)
    assert max(recorded["slices"]) <= budget // 4
    assert sum(recorded["slices"]) == n_directions * S * h * w * 4


def test_scores_pipeline_independent_of_max_memory(recorded):
    vol = gaussian_blobs((12, 13, 14))
    f = lambda x: x.sum((1, 2, 3))  # noqa: E731
    ref = tf.tomographic_heatmap(vol, f, n_directions=6, backend="reference")
    small = tf.tomographic_heatmap(vol, f, n_directions=6, backend="reference", max_memory=20_000, batch_size=3)
    assert max(recorded["slices"][-10:]) <= 20_000 // 4 + 23 * 23 * 8  # ≥ one slice position always
    torch.testing.assert_close(small, ref, rtol=0, atol=1e-12 * float(ref.abs().max()))


_MEASURE = textwrap.dedent("""
    import sys, warnings
    warnings.simplefilter("ignore")
    import torch
    from torch import nn
    import tonno_fast as tf

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    n_directions, max_memory = int(sys.argv[1]), int(sys.argv[2])
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1)).eval()
    vol = torch.rand(128, 128, 128)
    kw = dict(target_layers="2", slice_size=48, max_memory=max_memory, batch_size=512)
    tf.tomographic_cam(vol, net, n_directions=1, **kw)  # warm-up: allocator pools, oneDNN kernels
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    base = status("VmRSS:")
    tf.tomographic_cam(vol, net, n_directions=n_directions, **kw)
    print(status("VmHWM:") - base)
""")


def _peak_rss_delta(n_directions: int, max_memory: int) -> int:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd()] + sys.path))
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(n_directions), str(max_memory)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_peak_memory_of_tomographic_cam_does_not_grow_with_directions():
    """128³ volume, 48×48 slices (223 per direction, 2.05 MB of CAM per direction), max_memory 2 MB: one
    direction per chunk. Without streaming, N directions would hold N × 2.05 MB of CAM stacks plus their
    filtered copy; streamed, the peak must not depend on N."""
    # 4 against 32 directions: peak RSS carries ~10 MiB of allocator noise run to run (measured 34.0, 34.0, 40.4,
    # 34.5 MiB for 4, 16, 32, 64 directions), so the gap in N must be wide enough that the cost of *not*
    # streaming (28 extra stacks of 2.05 MB = 55 MiB, twice that with their filtered copies) stands far above it.
    few, many = 4, 32
    max_memory = 2 * 2 ** 20
    d_few, d_many = _peak_rss_delta(few, max_memory), _peak_rss_delta(many, max_memory)
    mib = 2 ** 20
    # Stated bound: the budget, the reference backend's coordinate grids (≤ 256 MiB per call), and the
    # volume-sized buffers (float64 accumulator 16 MiB, one chunk's backprojection 8 MiB, …): 64 MiB.
    bound = max_memory + 256 * mib + 64 * mib
    assert d_many < bound, (d_few / mib, d_many / mib)
    # Growth with N must stay below half of what holding the extra directions' stacks alone would cost.
    stack_bytes = 223 * 48 * 48 * 4  # S × h × w float32 CAM stack of one direction
    assert d_many - d_few < 0.5 * (many - few) * stack_bytes, (d_few / mib, d_many / mib)
    print(f"peak RSS above baseline: {few} directions {d_few / mib:.1f} MiB, {many}: {d_many / mib:.1f} MiB")
