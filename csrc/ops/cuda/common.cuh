// Helpers shared by the CUDA kernels of tonno_fast (csrc/ops/cuda/*.cu): input checks, launch sizes,
// read-only loads, atomics and a deterministic block reduction.
//
// Every kernel file includes this header and csrc/include/tonno_fast/maths.h (the per-point maths shared
// with the CPU kernels). Conventions used throughout:
//  * all element offsets are int64_t (volumes and slice stacks easily exceed 2^31 elements);
//  * kernels are launched on c10::cuda::getCurrentCUDAStream() under a c10::cuda::CUDAGuard for the device
//    of the main input, and every launch is followed by C10_CUDA_KERNEL_LAUNCH_CHECK();
//  * inputs are made contiguous on the host, so kernels index with plain row-major strides.
#pragma once

// Only the ATen headers that are used, not <ATen/ATen.h>: every .cu is parsed three times (host, and device
// for each architecture), and the full header costs about a third more compile time.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: it needs cuSPARSE/cuBLAS headers, which a
                                  // toolkit-only CUDA_HOME (CI) lacks
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "tonno_fast/maths.h"

namespace tonno_fast {
namespace cuda {

// ---------------------------------------------------------------------------------------------------
// Host-side checks. Every message names the argument, what was given and what was expected.
// ---------------------------------------------------------------------------------------------------

// `t` is a CUDA float32/float64 tensor with `ndim` dimensions; `what` describes the expected shape.
inline void check_float_cuda(const at::Tensor& t, const char* name, int64_t ndim, const char* what) {
  TORCH_CHECK(t.defined(), "tonno_fast: ", name, " must be a defined tensor");
  TORCH_CHECK(t.is_cuda(), "tonno_fast: ", name, " must be a CUDA tensor for the CUDA kernels, got a tensor on ",
              t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "tonno_fast: ", name,
              " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == ndim, "tonno_fast: ", name, " must have shape ", what, ", got ", t.sizes());
}

// `t` has the same device and dtype as `ref` (the op's main tensor input, named `ref_name`).
inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.defined(), "tonno_fast: ", name, " must be a defined tensor");
  TORCH_CHECK(t.device() == ref.device(), "tonno_fast: ", name, " must be on the device of ", ref_name, " (",
              ref.device(), "), got ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "tonno_fast: ", name, " must have the dtype of ", ref_name, " (",
              ref.scalar_type(), "), got ", t.scalar_type());
}

// Index-space maps (N, 3, 4) with the dtype/device of `ref`; returns N.
inline int64_t check_maps(const at::Tensor& maps, const at::Tensor& ref, const char* ref_name) {
  check_like(maps, "maps", ref, ref_name);
  TORCH_CHECK(maps.dim() == 3 && maps.size(1) == 3 && maps.size(2) == 4,
              "tonno_fast: maps must have shape (N, 3, 4) (row-major 3x4 index-space affine maps), got ",
              maps.sizes());
  TORCH_CHECK(maps.size(0) >= 1, "tonno_fast: maps must hold at least one direction, got shape ", maps.sizes());
  return maps.size(0);
}

// Quadrature weights (N,) with the dtype/device of `ref`.
inline void check_weights(const at::Tensor& weights, int64_t n, const at::Tensor& ref, const char* ref_name) {
  check_like(weights, "weights", ref, ref_name);
  TORCH_CHECK(weights.dim() == 1 && weights.size(0) == n, "tonno_fast: weights must have shape (N,) = (", n,
              ",) (one per direction of maps), got ", weights.sizes());
}

// A list of `count` positive sizes, e.g. volume_shape = (D, H, W).
inline void check_shape_list(at::IntArrayRef shape, size_t count, const char* name, const char* what) {
  TORCH_CHECK(shape.size() == count, "tonno_fast: ", name, " must have ", count, " entries ", what, ", got ", shape);
  for (auto s : shape) TORCH_CHECK(s >= 1, "tonno_fast: ", name, " entries must be positive ", what, ", got ", shape);
}

inline void check_positive(int64_t v, const char* name) {
  TORCH_CHECK(v >= 1, "tonno_fast: ", name, " must be a positive integer, got ", v);
}

// Kernels that index one slice / one line with 32-bit ints (faster division) need that extent below 2^31.
inline void check_int32(int64_t v, const char* what) {
  TORCH_CHECK(v < std::numeric_limits<int32_t>::max(), "tonno_fast: ", what, " = ", v,
              " is too large for the CUDA kernels (must be below 2^31)");
}

// ---------------------------------------------------------------------------------------------------
// Launch helpers.
// ---------------------------------------------------------------------------------------------------

// Number of blocks for a grid-stride loop over `work` items with `threads` per block. The cap keeps the
// grid legal (gridDim.x <= 2^31 - 1); kernels loop when the work is larger.
inline unsigned int blocks_for(int64_t work, int threads) {
  const int64_t b = (work + threads - 1) / threads;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(b, int64_t(1) << 30)));
}

// gridDim.y / gridDim.z are limited to 65535: kernels loop over the rest.
inline unsigned int grid_yz(int64_t n) {
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(n, 65535)));
}

// Adjoint kernels that scatter with atomicAdd are not bitwise reproducible (the order of the additions
// into one address varies from run to run). Under torch.use_deterministic_algorithms(True) this raises a
// RuntimeError naming the op (and only warns in warn_only mode).
inline void alert_atomic_scatter(const char* op) {
  at::globalContext().alertNotDeterministic(op);
}

// ---------------------------------------------------------------------------------------------------
// Device helpers.
// ---------------------------------------------------------------------------------------------------

// Read through the read-only (non-coherent, L1/texture) path: the inputs of a kernel are never written
// by it, so the loads may be cached in L1 and reordered freely.
template <typename T>
__device__ __forceinline__ T ldg(const T* p) {
  return __ldg(p);
}

// atomicAdd on float and double: hardware instructions from sm_60 on (we build for sm_80 and sm_90).
// Used only by adjoint (scatter) kernels, which call alert_atomic_scatter() on the host.
template <typename T>
__device__ __forceinline__ void atomic_add(T* address, T value) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 600
#error "tonno_fast CUDA kernels need sm_60 or newer (atomicAdd on double)"
#endif
  atomicAdd(address, value);
}

// Deterministic sum over the block of NV values per thread: warp shuffles in a fixed pattern, then the
// per-warp partials in a fixed order. blockDim.x must be a multiple of 32 and at most 1024. `scratch`
// holds NV * 32 elements of shared memory. The result is valid in thread 0 only. Call from all threads.
template <typename T, int NV>
__device__ __forceinline__ void block_reduce_sum(T (&v)[NV], T* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int n_warps = blockDim.x >> 5;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v[k] += __shfl_down_sync(0xffffffffu, v[k], off);
  }
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < NV; ++k) scratch[k * 32 + warp] = v[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      v[k] = lane < n_warps ? scratch[k * 32 + lane] : T(0);
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) v[k] += __shfl_down_sync(0xffffffffu, v[k], off);
    }
  }
}

// Trilinear gather through the read-only path at the corners from maths::trilinear_corners (offsets
// relative to `a`, invalid corners have weight 0 and offset 0, so all eight loads are safe).
template <typename T, typename Acc>
__device__ __forceinline__ Acc gather_corners(const T* __restrict__ a, const int64_t (&off)[8],
                                              const Acc (&w)[8]) {
  Acc s = Acc(0);
#pragma unroll
  for (int c = 0; c < 8; ++c) s += w[c] * Acc(ldg(a + off[c]));
  return s;
}

// Adjoint of gather_corners: a[off[c]] += w[c] * g with atomics (skips zero weights: those corners are
// outside the array and must not be written).
template <typename T>
__device__ __forceinline__ void scatter_corners(T* a, const int64_t (&off)[8], const T (&w)[8], T g) {
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    if (w[c] != T(0)) atomic_add(a + off[c], w[c] * g);
  }
}

}  // namespace cuda
}  // namespace tonno_fast
