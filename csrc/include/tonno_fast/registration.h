// How a kernel file registers its kernels: one op and its adjoint op, for one dispatch key.
//
//   TONNO_FAST_KERNELS(CPU, radon, radon_cpu, radon_backward_cpu)
//
// registers radon_cpu for tonno_fast::radon and radon_backward_cpu for tonno_fast::radon_backward on the CPU
// key. The schemas are defined by tonno_fast/ops/contract.py; the dispatcher checks each kernel's signature
// against its schema when the contract defines the op.
#pragma once

#include <torch/library.h>

#define TONNO_FAST_KERNELS(key, op, forward, adjoint) \
  TORCH_LIBRARY_IMPL(tonno_fast, key, m) {             \
    m.impl(#op, &forward);                             \
    m.impl(#op "_backward", &adjoint);                 \
  }
