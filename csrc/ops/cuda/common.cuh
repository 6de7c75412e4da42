// Helpers shared by the CUDA kernels of tonno_fast (csrc/ops/cuda/*.cu): launch sizes, read-only loads,
// atomics and a deterministic block reduction (argument checks: tonno_fast/checks.h, shared with the CPU).
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

#include "tonno_fast/checks.h"
#include "tonno_fast/registration.h"
#include "tonno_fast/maths.h"

namespace tonno_fast {
namespace cuda {

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

// The row-major 3x4 map maps[n] (index-space affine map, see maths.h) into registers, through the
// read-only path.
template <typename scalar_t>
__device__ __forceinline__ void load_map(const scalar_t* __restrict__ maps, int64_t n, scalar_t (&M)[12]) {
#pragma unroll
  for (int q = 0; q < 12; ++q) M[q] = ldg(maps + n * 12 + q);
}

// Flat index p of a row-major (n0, n1, n2) grid -> its index (a, b, c) as coordinates (n0 itself is not
// needed). 64-bit: grids of output points / voxels may exceed 2^31.
template <typename scalar_t>
__device__ __forceinline__ void grid_point(int64_t p, int64_t n1, int64_t n2, scalar_t& a, scalar_t& b,
                                           scalar_t& c) {
  const int64_t aa = p / (n1 * n2);
  const int64_t rem = p - aa * n1 * n2;
  const int64_t bb = rem / n2;
  a = scalar_t(aa);
  b = scalar_t(bb);
  c = scalar_t(rem - bb * n2);
}

// Trilinear corners (maths::trilinear_corners) of the point M @ (a, b, c, 1) in a contiguous (n0, n1, n2)
// array; false if no corner is valid.
template <typename scalar_t>
__device__ __forceinline__ bool map_corners(const scalar_t (&M)[12], scalar_t a, scalar_t b, scalar_t c,
                                            int64_t n0, int64_t n1, int64_t n2, int64_t (&off)[8],
                                            scalar_t (&wt)[8]) {
  scalar_t x0, x1, x2;
  maths::apply_affine(M, a, b, c, x0, x1, x2);
  return maths::trilinear_corners(n0, n1, n2, n1 * n2, n2, int64_t(1), x0, x1, x2, off, wt);
}

// ---------------------------------------------------------------------------------------------------
// Adjoint of sampling slices from a volume (slice_volume_backward, radon_backward): for every pixel (i, j)
// of every slice k of every stack n, the point maps[n] @ (k, i, j, 1) scatters
//   grad_value(b, c, n, k, p)        (p = i * w + j)
// onto its eight corners in out[b, c] (B, C, D, H, W), with atomicAdd (not bitwise deterministic: the host
// calls alert_atomic_scatter). The ops differ only in where the value of a pixel comes from, so GradFn is
// a small device functor with `scalar_t operator()(int64_t b, int64_t c, int64_t n, int64_t k, int32_t p)`.
//
// Grid: x over the pixels of one slice (one thread per pixel, 32-bit: h * w < 2^31 is checked by the
// caller), y (looped) over the N * S slices. Corners are computed once per pixel and reused for every (b, c).
template <typename scalar_t, typename GradFn>
__global__ void scatter_slices_kernel(GradFn grad_value, const scalar_t* __restrict__ maps,
                                      scalar_t* __restrict__ out, int64_t B, int64_t C, int64_t D, int64_t H,
                                      int64_t W, int64_t N, int64_t S, int32_t h, int32_t w) {
  const int32_t p = static_cast<int32_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= h * w) return;
  const int32_t i = p / w;
  const int32_t j = p - i * w;
  const int64_t vol_size = D * H * W;
  for (int64_t slice = blockIdx.y; slice < N * S; slice += gridDim.y) {
    const int64_t n = slice / S;
    const int64_t k = slice - n * S;
    scalar_t M[12];
    load_map(maps, n, M);
    int64_t off[8];
    scalar_t wt[8];
    if (!map_corners(M, scalar_t(k), scalar_t(i), scalar_t(j), D, H, W, off, wt)) continue;
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t g = grad_value(b, c, n, k, p);
        if (g != scalar_t(0)) scatter_corners(out + (b * C + c) * vol_size, off, wt, g);
      }
    }
  }
}

// Launch scatter_slices_kernel on the current stream for `out` (B, C, D, H, W) (zeroed, contiguous),
// `maps` (N, 3, 4) (contiguous) and slices of S x h x w pixels.
template <typename scalar_t, typename GradFn>
void launch_scatter_slices(const GradFn& grad_value, const at::Tensor& maps, at::Tensor& out, int64_t S,
                           int64_t h, int64_t w) {
  constexpr int kScatterThreads = 256;
  const int64_t N = maps.size(0);
  const dim3 grid(blocks_for(h * w, kScatterThreads), grid_yz(N * S));
  scatter_slices_kernel<scalar_t, GradFn><<<grid, kScatterThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      grad_value, maps.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), out.size(0), out.size(1),
      out.size(2), out.size(3), out.size(4), N, S, static_cast<int32_t>(h), static_cast<int32_t>(w));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace tonno_fast
