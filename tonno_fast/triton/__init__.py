"""Triton kernels for the five operators and their adjoints (the ``triton`` backend).

One module per op, each holding its ``@triton.jit`` kernels (forward and adjoint), the launcher that picks
block sizes, and the ``torch.library`` registration (namespace ``tonno_fast_triton``: fake kernels for
``torch.compile``/meta tensors, autograd whose backward is the exact adjoint kernel):

* :mod:`.slice_volume` — ``slice_volume`` (+ encoder-input fusions: bf16/fp16 output, intensity window,
  channel replication) and ``slice_volume_backward``;
* :mod:`.radon` — ``radon`` and ``radon_backward``;
* :mod:`.backproject` — ``backproject`` (direction loop inside the kernel) and ``backproject_backward``;
* :mod:`.backproject_slices` — ``backproject_slices`` (optional fused ``laplacian`` filter) and its adjoint;
* :mod:`.affine_grid_sample` — ``affine_grid_sample`` (gradients for volume and ``theta``).

The per-point maths (affine maps, NaN-safe linear taps, trilinear gathers/scatters) is in :mod:`._common`,
the Triton twin of ``csrc/include/tonno_fast/maths.h``. On a GPU the kernels compile; on a CPU they run
under ``TRITON_INTERPRET=1`` (which must be set before ``triton`` is first imported). Importing this package
requires a working ``triton``; :mod:`tonno_fast.backend.triton` is the import-safe entry point.
"""
# Submodules are imported for their registrations; the functions live in them (``slice_volume.slice_volume``,
# ...) and in :mod:`tonno_fast.backend.triton`. They are deliberately not re-exported here under the
# submodules' own names, which would shadow the modules (``import tonno_fast.triton.radon as m`` would then
# give the function).
from . import affine_grid_sample, backproject, backproject_slices, radon, slice_volume  # noqa: F401
from ._common import INTERPRETED
from .backproject import backproject_backward
from .backproject_slices import backproject_slices_backward
from .radon import radon_backward
from .slice_volume import slice_volume_backward

__all__ = ["slice_volume", "radon", "backproject", "backproject_slices", "affine_grid_sample",
           "slice_volume_backward", "radon_backward", "backproject_backward", "backproject_slices_backward",
           "INTERPRETED"]
