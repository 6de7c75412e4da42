"""Compile every Triton kernel of :mod:`tonno_fast.ops.triton` for a CUDA target, without a GPU.

The interpreter (``TRITON_INTERPRET=1``, how CI runs the kernels) executes the kernels' Python with NumPy
and never sees the compiler: a type mismatch, a constexpr scoping error or an unsupported op would only
show up on a GPU. This ahead-of-time check runs the real compiler pipeline (TTIR → TTGIR → LLVM → PTX →
cubin with the ``ptxas`` bundled in the triton wheel) for each kernel and each constexpr variant the
launchers use, and optionally reports registers and spills from ``ptxas -v`` (the numbers quoted in the
modules' NOTEs).

Usage (TRITON_INTERPRET must be unset, since interpreted kernels cannot be compiled)::

    python -m tonno_fast.ops.triton.compile_check [--arch 90] [--dtypes fp32 fp64] [--ones] [--registers] [--trace]

``--trace`` also traces every op as the ``triton_op`` a GPU machine registers (see :func:`trace_ops`).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional


def op_modules() -> List:
    """The op modules of the Triton backend (one per forward op: kernels, launchers, the compile variants
    ``COMPILE_VARIANTS`` and the tracing samples ``trace_samples``)."""
    from .backend import op_modules as modules
    return list(modules().values())


def variants():
    """``(module, (kernel, pointer dtype overrides, constexprs, num_warps))`` for every kernel variant the GPU
    launchers use."""
    return [(m, v) for m in op_modules() for v in m.COMPILE_VARIANTS]


class TraceSamples:
    """Small inputs for :func:`trace_ops`: a 5×6×7 volume, 2 directions, 3 slices of 4×5 pixels (float32, CPU)."""

    def __init__(self):
        import torch

        from ...geometry import make_geometry

        self.ops = torch.ops.tonno_fast_triton
        g = make_geometry((5, 6, 7), directions=[[0, 0, 1], [1, 2, 3]], n_slices=3, slice_size=(4, 5))
        self.sm, self.vm = g.slice_maps(dtype=torch.float32), g.volume_maps(dtype=torch.float32)
        self.w = g.weights.float()
        self.theta = torch.eye(3, 4).expand(2, 3, 4).contiguous()
        self.r = torch.randn


def _signature(fn, dtype: str, overrides: Dict[str, str], constexprs: Dict[str, object], ones: bool):
    """Triton signature and constexpr values: ``*_ptr`` arguments are pointers (``dtype`` unless overridden),
    other runtime arguments 32-bit integers (sizes and strides). With ``ones``, every integer argument is
    instead the constant 1, as the JIT specialises an integer argument equal to 1 (B = 1, unit strides...):
    this checks that no kernel applies a tensor method to such an argument."""
    sig, consts = {}, dict(constexprs)
    for i, name in enumerate(fn.arg_names):
        if i in fn.constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + overrides.get(name, dtype)
        elif ones:
            sig[name] = "constexpr"
            consts[name] = 1
        else:
            sig[name] = "i32"
    return sig, consts


def _ptxas_report(ptx: str, arch: int) -> Optional[str]:
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, f"-arch=sm_{arch}a" if arch >= 90 else f"-arch=sm_{arch}", "-v", src,
                              "-o", os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    lines = [line.split("info    : ")[-1].strip() for line in (out.stdout + out.stderr).splitlines()
             if "registers" in line or "spill" in line]
    return "; ".join(lines)


def compile_all(arch: int = 90, dtypes=("fp32",), registers: bool = False, ones: bool = False) -> List[str]:
    """Compile every variant for ``sm_<arch>`` (and, with ``ones``, once more in float32 with every integer
    argument specialised to 1); returns one line per kernel. Raises on the first failure."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    report = []
    passes = [(dtype, False) for dtype in dtypes] + ([("fp32", True)] if ones else [])
    for dtype, all_ones in passes:
        for module, (kernel, overrides, constexprs, warps) in variants():
            fn = getattr(module, kernel)
            sig, consts = _signature(fn, dtype, overrides, constexprs, all_ones)
            compiled = triton.compile(ASTSource(fn, sig, consts), target=target, options={"num_warps": warps})
            line = f"{kernel} {dtype}{' ints=1' if all_ones else ''} {constexprs} num_warps={warps}: ok"
            if registers:
                line += f" ({_ptxas_report(compiled.asm['ptx'], arch)})"
            report.append(line)
    return report


def trace_ops() -> List[str]:
    """Trace every registered op through AOTAutograd's functionalisation (what ``torch.compile`` does) with
    CPU tensors and no interpreter, i.e. as the ``triton_op`` s a GPU machine registers: the op bodies must
    decompose into ``triton_kernel_wrapper_functional`` nodes (one per launch) without running a kernel.
    Checks the GPU-only Python (autotuned grids, device guards, fake-tensor-safe launchers) on a CPU."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: under the interpreter the ops are plain custom ops")
    import logging

    import torch
    from torch._functorch.aot_autograd import aot_function

    # Without a GPU, torch cannot lower a kernel to TTIR to find which arguments it writes and logs a warning
    # with a traceback per launch (on the "torch._dynamo" logger) before assuming all of them; irrelevant here.
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    samples = TraceSamples()
    cases = [case for module in op_modules() for case in module.trace_samples(samples)]

    class _Traced(Exception):
        pass

    report = []
    for name, fn, args in cases:
        graph = {}

        def compiler(gm, example_inputs):
            graph["gm"] = gm

            def never_run(*a):  # the graph would launch real kernels: stop after tracing
                raise _Traced()
            return never_run
        try:
            aot_function(fn, fw_compiler=compiler)(*args)
        except _Traced:
            pass
        launches = [n for n in graph["gm"].graph.nodes if "triton_kernel_wrapper" in str(n.target)]
        if not launches:
            raise AssertionError(f"{name}: no Triton kernel launch in the traced graph:\n{graph['gm'].code}")
        report.append(f"{name}: traced, {len(launches)} kernel launch(es)")
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80, 90")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "fp64"], choices=["fp32", "fp64"])
    parser.add_argument("--registers", action="store_true", help="report registers/spills (ptxas -v)")
    parser.add_argument("--ones", action="store_true", help="also compile with every integer argument = 1")
    parser.add_argument("--trace", action="store_true", help="also trace the ops as triton_ops (no compile)")
    args = parser.parse_args(argv)
    if args.trace:
        for line in trace_ops():
            print(line)
    for line in compile_all(args.arch, args.dtypes, args.registers, args.ones):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
