"""The implementations themselves: which backends load and why not, the op schemas of both namespaces, the
extension's build, the Triton kernels' GPU compilation and launch shapes (each op's own behaviour is tested in
``test_<op>.py``)."""
import os
import subprocess
import sys

import pytest
import torch

import tonno_fast
from harness import (GEOMETRIES, against_reference, make_impl, rand, unavailable)
from harness import kernels  # noqa: F401  (pytest fixtures)
from tonno_fast.ops import contract, registry

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # subprocesses import from here
OPS = ("slice_volume", "radon", "backproject", "backproject_slices", "affine_grid_sample")
ALL_OPS = OPS + tuple(f"{op}_backward" for op in OPS)

# The schemas every caller of torch.ops.tonno_fast / torch.ops.tonno_fast_triton relies on.
SCHEMAS = {
    "slice_volume": "(Tensor volume, Tensor maps, int n_slices, int height, int width, float fill, "
                    "ScalarType? out_dtype) -> Tensor",
    "slice_volume_backward": "(Tensor grad, Tensor maps, int[] volume_shape) -> Tensor",
    "radon": "(Tensor volume, Tensor maps, int n_slices, int height, int width, float scale) -> Tensor",
    "radon_backward": "(Tensor grad, Tensor maps, int height, int width, float scale, int[] volume_shape) -> Tensor",
    "backproject": "(Tensor sinogram, Tensor maps, Tensor weights, int[] volume_shape) -> Tensor",
    "backproject_backward": "(Tensor grad, Tensor maps, Tensor weights, int n_slices) -> Tensor",
    "backproject_slices": "(Tensor stacks, Tensor maps, Tensor weights, int[] volume_shape) -> Tensor",
    "backproject_slices_backward": "(Tensor grad, Tensor maps, Tensor weights, int[] stack_shape) -> Tensor",
    "affine_grid_sample": "(Tensor volume, Tensor theta, int[] size, bool align_corners) -> Tensor",
    "affine_grid_sample_backward": "(Tensor grad, Tensor volume, Tensor theta, bool align_corners, bool volume_grad, "
                                   "bool theta_grad) -> (Tensor, Tensor)",
}
TRITON_SCHEMAS = {
    "slice_volume": "(Tensor volume, Tensor maps, SymInt n_slices, SymInt height, SymInt width, float fill, "
                    "ScalarType? out_dtype, float[]? window, SymInt replicate_channels) -> Tensor",
    "slice_volume_backward": "(Tensor grad, Tensor maps, SymInt[] volume_shape) -> Tensor",
    "radon": "(Tensor volume, Tensor maps, SymInt n_slices, SymInt height, SymInt width, float scale) -> Tensor",
    "radon_backward": "(Tensor grad, Tensor maps, SymInt height, SymInt width, float scale, SymInt[] volume_shape) "
                      "-> Tensor",
    "backproject": "(Tensor sinogram, Tensor maps, Tensor weights, SymInt[] volume_shape) -> Tensor",
    "backproject_backward": "(Tensor grad, Tensor maps, Tensor weights, SymInt n_slices) -> Tensor",
    "backproject_slices": "(Tensor stacks, Tensor maps, Tensor weights, SymInt[] volume_shape, "
                          "float? laplacian_spacing) -> Tensor",
    "backproject_slices_backward": "(Tensor grad, Tensor maps, Tensor weights, SymInt[] stack_shape, "
                                   "float? laplacian_spacing) -> Tensor",
    "affine_grid_sample": "(Tensor volume, Tensor theta, SymInt[] size, bool align_corners) -> Tensor",
    "affine_grid_sample_backward": "(Tensor grad, Tensor volume, Tensor theta, bool align_corners, bool volume_grad, "
                                   "bool theta_grad) -> (Tensor, Tensor)",
}


# ---------------------------------------------------------------------------------------------------------
# Registry.

def test_backends_reports_every_backend():
    state = tonno_fast.backends()
    assert set(state) == {"reference", "cpu", "cuda", "triton"}
    assert state["reference"] == "available"
    assert all(isinstance(v, str) and v for v in state.values())


def test_auto_picks_the_compiled_kernels(kernels):
    """``backend="auto"`` reaches the compiled kernels for their device (cpu for CPU tensors; cuda, else
    triton, for CUDA tensors)."""
    if kernels.name == "triton" and unavailable("cuda") is None:
        pytest.skip("CUDA tensors go to the cuda backend")
    if kernels.name == "triton" and kernels.device.type == "cpu":
        pytest.skip("CPU tensors go to the cpu backend")
    assert registry.get_backend("auto", kernels.device) is kernels.module
    vol = rand(1, 1, *GEOMETRIES["small"].volume_shape, device=kernels.device)
    torch.testing.assert_close(tonno_fast.radon(vol, GEOMETRIES["small"]).cpu(),
                               tonno_fast.radon(vol.cpu(), GEOMETRIES["small"], backend="reference"))


@pytest.mark.parametrize("namespace, schemas", [("tonno_fast", SCHEMAS), ("tonno_fast_triton", TRITON_SCHEMAS)])
def test_op_schemas(namespace, schemas):
    """Both namespaces keep their public schemas (the contract defines them: contract.py)."""
    impl = "cpu" if namespace == "tonno_fast" else "triton"
    if unavailable(impl) is not None:
        pytest.skip(f"backend {impl}: {unavailable(impl)}")
    make_impl(impl)
    for op, schema in schemas.items():
        assert str(getattr(getattr(torch.ops, namespace), op).default._schema) == f"{namespace}::{op}{schema}"


def test_build_info():
    if unavailable("cpu") is not None:
        pytest.skip(unavailable("cpu"))
    from tonno_fast.ops import native
    info = native.build_info()
    assert set(info) == {"cuda", "cuda_arch", "openmp", "omp_max_threads", "torch_version"}
    assert info["torch_version"] == torch.__version__.split("+")[0]
    assert info["omp_max_threads"] >= 1
    assert isinstance(info["cuda_arch"], list) and (info["cuda"] or info["cuda_arch"] == [])


def _cuda_build_expected():
    """Why the extension should hold CUDA kernels here (None if it should not), mirroring setup.py."""
    if os.environ.get("TONNO_FAST_NO_CUDA", "0") == "1":
        return None
    if torch.version.cuda is None:
        return None
    from torch.utils import cpp_extension

    cuda_home = os.environ.get("CUDA_HOME") or cpp_extension.CUDA_HOME or "/usr/local/cuda"
    if not os.path.isfile(os.path.join(cuda_home, "bin", "nvcc")):
        return None
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) and nvcc in {cuda_home}"


def test_cuda_kernels_built():
    """CI has nvcc and a CUDA build of torch but no GPU: where the extension could have been built with CUDA,
    ``tonno_fast._C`` must hold a CUDA kernel for every op."""
    if unavailable("cpu") is not None:
        pytest.skip(f"tonno_fast._C is not built or does not load ({unavailable('cpu')})")
    why = _cuda_build_expected()
    if why is None:
        pytest.skip("no CUDA toolchain or no CUDA build of torch here (or TONNO_FAST_NO_CUDA=1): "
                    "a CPU-only extension is expected")
    from tonno_fast.ops import native
    info = native.build_info()
    assert info["cuda"] is True, f"tonno_fast._C was built without CUDA kernels although {why} are present"
    assert len(info["cuda_arch"]) >= 1, f"build_info() lists no CUDA architecture: {info}"
    missing = [op for op in ALL_OPS
               if not torch._C._dispatch_has_kernel_for_dispatch_key(f"tonno_fast::{op}", "CUDA")]
    assert not missing, f"no CUDA kernel registered for tonno_fast::{missing}"


# ---------------------------------------------------------------------------------------------------------
# Triton.

needs_triton = pytest.mark.skipif(unavailable("triton") is not None, reason=f"triton: {unavailable('triton')}")


@needs_triton
def test_import_never_fails_without_triton():
    # A fresh interpreter where `import triton` raises: tonno_fast and the backend module still import, and the
    # backend reports why it is unavailable.
    code = ("import sys, importlib; sys.modules['triton'] = None\n"
            "import tonno_fast\n"
            "m = importlib.import_module('tonno_fast.ops.triton.backend')\n"
            "r = m.unavailable_reason('triton'); assert r and 'triton' in r, r\n"
            "assert 'triton' in tonno_fast.backends()['triton']\n"
            "print('ok')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@needs_triton
def test_kernels_compile_for_sm90_and_trace_as_triton_ops():
    """The interpreter never runs the Triton compiler: compile every kernel variant the GPU launchers use
    (float32, float64, and float32 with every integer argument specialised to 1 as the JIT does for B = 1 or
    unit strides) down to an sm_90 cubin, in a process without TRITON_INTERPRET."""
    import triton
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("this triton install has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-m", "tonno_fast.ops.triton.compile_check", "--arch", "90",
                          "--dtypes", "fp32", "fp64", "--ones", "--trace"], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    from tonno_fast.ops.triton.compile_check import variants
    assert out.stdout.count(": ok") == 3 * len(variants()), out.stdout
    # ... and every op traced as the triton_op a GPU machine registers, decomposed into kernel launches.
    assert out.stdout.count(": traced, 1 kernel launch") == 10, out.stdout


@needs_triton
def test_triton_small_blocks_and_many_tiles(monkeypatch):
    """With the interpreter's block caps lowered (16 pixels / 64 voxels, 2 batch×channel rows), every kernel
    runs several programs per slice / voxel range (program offsets, masked tails, radon's pixel loop) and the
    backprojections several batch×channel tiles (B·K = 3: one full, one partial). Forward and adjoint against
    the reference, float64, on a smaller volume to keep the program count down."""
    impl = make_impl("triton")
    if not impl.interpreted:
        pytest.skip("the block caps are the interpreter's")
    from tonno_fast.ops.triton import _common
    from test_backproject_slices import backproject_slices
    monkeypatch.setattr(_common, "INTERPRETER_MAX_BLOCK", 16)
    monkeypatch.setattr(_common, "INTERPRETER_MAX_BLOCK_BK", 2)
    shape = (5, 6, 7)
    g = tonno_fast.make_geometry(shape, directions=[[0, 0, 1], [1, 2, 3]], n_slices=3, slice_size=(4, 5))
    S, h, wd = g.n_slices, g.height, g.width

    def sm(v):
        return g.slice_maps(dtype=v.dtype, device=v.device)

    def vm(x):
        return g.volume_maps(dtype=x.dtype, device=x.device), g.weights.to(x)

    vol = rand(1, 1, *shape, seed=71)
    against_reference(impl, lambda be, v: be.slice_volume(v, sm(v), S, h, wd, 0.3, None), vol, 1)
    against_reference(impl, lambda be, v: be.radon(v, sm(v), S, h, wd, 1.0), vol, 2)
    # Voxel-parallel kernels: 210 voxels in blocks of 64 (3 full programs and a tail) is enough.
    monkeypatch.setattr(_common, "INTERPRETER_MAX_BLOCK", 64)
    against_reference(impl, lambda be, s: be.backproject(s, *vm(s), list(shape)), rand(1, 3, 2, S, seed=73), 3)
    against_reference(impl, backproject_slices(g, 0.9), rand(1, 3, 2, S, h, wd, seed=79), 4)
    theta = torch.eye(3, 4, dtype=torch.float64) + 0.2 * rand(1, 3, 4, seed=83)
    against_reference(impl, lambda be, v: be.affine_grid_sample(v, theta.to(v), [1, 1, 4, 3, 5], False), vol, 5)


def test_contract_covers_every_op():
    """Every op of both namespaces has its contract, and every adjoint named exists."""
    assert set(ALL_OPS) <= set(contract.CONTRACTS)
    for name, c in contract.CONTRACTS.items():
        assert c.adjoint is None or c.adjoint in contract.CONTRACTS, name
