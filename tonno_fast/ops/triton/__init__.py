"""Triton kernels of the operators (the ``triton`` backend).

One module per op (named after the forward op) holds its ``@triton.jit`` kernels, forward and adjoint, the
launchers that pick block sizes (one per op of the contract: ``radon.radon``, ``radon.radon_backward``) and, for
:mod:`.compile_check`, the kernel variants the launchers use and small calls to trace. An adjoint that scatters
has an ``EMIT`` constexpr and is launched through ``_common.run_scatter``, which gives it its deterministic path.
:mod:`._common` holds the per-point maths (the Triton twin of ``csrc/include/tonno_fast/maths.h``) and the launch
helpers; :mod:`.backend` defines the ``torch.ops.tonno_fast_triton`` ops from the launchers and the contract
(:mod:`tonno_fast.ops.contract`) and is the backend module the registry loads.

On a GPU the kernels compile; on a CPU they run under ``TRITON_INTERPRET=1``, which must be set before
``triton`` is first imported. Importing this package itself imports nothing (and so never fails): the op
modules need a working ``triton``.
"""
