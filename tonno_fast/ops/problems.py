"""The benchmark problems of the operators, defined once for every benchmark.

Used by ``tonno-fast bench`` (:mod:`tonno_fast.cli`), the CPU benchmarks (``benchmarks/test_bench_cpu.py``,
pytest-benchmark) and the GPU benchmarks (``benchmarks/gpu/bench.py``); each picks sizes with the arguments
of :func:`make_problems`. A :class:`Problem` allocates its inputs on a device (index-space maps included, so
the timed call is the op alone) and calls the op of a backend module (:func:`tonno_fast.ops.registry.get_backend`),
with the op's schema. Work is counted in samples (trilinear reads of a gather) or updates (one voxel ×
direction of a backprojection); bytes are the compulsory traffic (inputs read once, output written once).
See docs/performance.md for how the numbers are taken.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from ..geometry import make_geometry

__all__ = ["OPS", "Problem", "make_problems", "rotations"]

OPS = ("slice_volume", "radon", "backproject", "backproject_slices", "affine_grid_sample")


@dataclass
class Problem:
    """One benchmark case: what to allocate, what to call and how much work it is."""

    op: str
    label: str                      # e.g. "128³ → 64×128×128² bf16"
    work: float                     # samples or updates per call
    unit: str                       # "samples" or "updates"
    in_bytes: float                 # compulsory input traffic of one call
    out_bytes: float                # output bytes of one call
    make_inputs: Callable[[torch.device], dict] = field(repr=False)
    call: Callable[[object, dict], torch.Tensor] = field(repr=False)
    differentiable: Tuple[str, ...] = ("x",)  # the inputs a backward pass differentiates

    @property
    def name(self) -> str:
        return f"{self.op} {self.label}"

    def backward(self, backend, device: torch.device, seed: int = 3) -> Callable[[], tuple]:
        """The timed call of a backward benchmark: the forward graph is built here, once (inputs on ``device``,
        the :attr:`differentiable` ones requiring grad, an incoming gradient drawn with ``seed``); each call of
        the returned function runs ``torch.autograd.grad`` on it (``retain_graph``), the backward pass alone."""
        inputs = self.make_inputs(device)
        xs = [inputs[k].requires_grad_() for k in self.differentiable]
        out = self.call(backend, inputs)
        gout = torch.rand(out.shape, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=out.dtype)
        return lambda: torch.autograd.grad(out, xs, gout, retain_graph=True)


def rotations(n: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """``n`` random ``affine_grid`` thetas ``(n, 3, 4)``: rotations about z then y, no shift."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(n, 2, generator=gen, dtype=torch.float64) * math.pi
    cz, sz, cy, sy = torch.cos(a[:, 0]), torch.sin(a[:, 0]), torch.cos(a[:, 1]), torch.sin(a[:, 1])
    z, o = torch.zeros(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)
    rz = torch.stack([torch.stack([cz, -sz, z], -1), torch.stack([sz, cz, z], -1), torch.stack([z, z, o], -1)], -2)
    ry = torch.stack([torch.stack([cy, z, sy], -1), torch.stack([z, o, z], -1), torch.stack([-sy, z, cy], -1)], -2)
    return torch.cat([rz @ ry, torch.zeros(n, 3, 1, dtype=torch.float64)], -1).to(dtype)


def _rand(*shape, device, seed: int) -> torch.Tensor:
    """Uniform float32 data, the same for a given seed on every device."""
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)).to(device)


def make_problems(volume: int = 128, directions: int = 64, slices: Optional[int] = None, *,
                  stack_volume: Optional[int] = None, stack_directions: int = 16, affine_batch: int = 1,
                  out_dtypes: Sequence[torch.dtype] = (torch.float32,), ops: Sequence[str] = OPS) -> List[Problem]:
    """The problems for a cubic float32 volume of ``volume`` voxels per side (1 mm):

    * ``slice_volume`` (one problem per ``out_dtypes``) and ``radon``: ``directions`` directions, ``slices``
      slices of ``slices²`` pixels at 1 mm (``None``: the default geometry, covering the bounding sphere);
    * ``backproject``: a ``directions × S`` sinogram of that geometry into the volume;
    * ``backproject_slices``: ``stack_directions`` stacks of the default geometry of a ``stack_volume`` cube
      (default: ``volume``) into it;
    * ``affine_grid_sample``: ``affine_batch`` volumes resampled by random rotations onto grids of their size.
    """
    f32 = 4
    probs: List[Problem] = []
    size = (volume,) * 3
    kw = {} if slices is None else dict(slice_size=slices, n_slices=slices, pixel_spacing=1.0)
    g = make_geometry(size, n_directions=directions, **kw)
    N, S, h, w = g.n_directions, g.n_slices, g.height, g.width
    samples, vol_bytes = N * S * h * w, volume ** 3 * f32
    shape = f"{volume}³ → {N}×{S}×{h}×{w}"

    def vol_inputs(dev):
        return {"x": _rand(1, 1, *size, device=dev, seed=0), "maps": g.slice_maps(dtype=torch.float32, device=dev)}

    if "slice_volume" in ops:
        for odt in out_dtypes:
            nbytes = torch.empty((), dtype=odt).element_size()
            probs.append(Problem(
                "slice_volume", f"{shape} {str(odt).replace('torch.', '')}", samples, "samples", vol_bytes,
                samples * nbytes, vol_inputs, lambda be, a, odt=odt: be.slice_volume(a["x"], a["maps"], S, h, w, 0.0,
                                                                                      odt)))
    if "radon" in ops:
        probs.append(Problem("radon", shape, samples, "samples", vol_bytes, N * S * f32, vol_inputs,
                             lambda be, a: be.radon(a["x"], a["maps"], S, h, w, g.pixel_area)))
    if "backproject" in ops:
        def bp_inputs(dev):
            return {"x": _rand(1, 1, N, S, device=dev, seed=1),
                    "maps": g.volume_maps(dtype=torch.float32, device=dev),
                    "w": g.weights.to(device=dev, dtype=torch.float32)}
        probs.append(Problem("backproject", f"{N}×{S} → {volume}³", N * volume ** 3, "updates", N * S * f32,
                             vol_bytes, bp_inputs, lambda be, a: be.backproject(a["x"], a["maps"], a["w"], list(size))))
    if "backproject_slices" in ops:
        n_small = stack_volume or volume
        gs = make_geometry((n_small,) * 3, n_directions=stack_directions)
        Ns, Ss, hs, ws = gs.n_directions, gs.n_slices, gs.height, gs.width

        def bps_inputs(dev):
            return {"x": _rand(1, 1, Ns, Ss, hs, ws, device=dev, seed=2),
                    "maps": gs.volume_maps(dtype=torch.float32, device=dev),
                    "w": gs.weights.to(device=dev, dtype=torch.float32)}
        probs.append(Problem(
            "backproject_slices", f"{Ns}×{Ss}×{hs}×{ws} → {n_small}³", Ns * n_small ** 3, "updates",
            Ns * Ss * hs * ws * f32, n_small ** 3 * f32, bps_inputs,
            lambda be, a: be.backproject_slices(a["x"], a["maps"], a["w"], list(gs.volume_shape))))
    if "affine_grid_sample" in ops:
        out_size = [affine_batch, 1, *size]

        def aff_inputs(dev):
            return {"x": _rand(affine_batch, 1, *size, device=dev, seed=3),
                    "theta": rotations(affine_batch).to(dev)}
        probs.append(Problem(
            "affine_grid_sample", f"{affine_batch}×{volume}³ → {affine_batch}×{volume}³",
            affine_batch * volume ** 3, "samples", affine_batch * vol_bytes, affine_batch * vol_bytes, aff_inputs,
            lambda be, a: be.affine_grid_sample(a["x"], a["theta"], out_size, False), ("x", "theta")))
    return probs
