// Helpers shared by the CUDA kernels of tonno_fast (csrc/ops/cuda/*.cu): launch sizes, read-only loads,
// a deterministic block reduction and the two sinks of the adjoint (scatter) kernels, atomic or
// deterministic (argument checks: tonno_fast/checks.h, shared with the CPU).
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
#include <ATen/ops/arange.h>
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
#include <cstdlib>
#include <optional>
#include <string>

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
// Used only by AtomicSink (below).
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

// ---------------------------------------------------------------------------------------------------
// Sinks of the adjoint (scatter) kernels.
//
// An adjoint kernel adds contributions `value` to elements `index` (flat, row-major) of its output. Every
// adjoint kernel is written once, templated on where the contributions go:
//  * AtomicSink (the default): out[index] += value with atomicAdd. The fastest, but the order of the
//    additions into one element varies from run to run, hence the last bits of a float result;
//  * EmitSink (under torch.use_deterministic_algorithms(True), see run_scatter): the contribution is written
//    to its own slot of two buffers, (index, value). The kernel numbers the slots from its loop indices, so
//    what lands in which slot does not depend on thread scheduling; reduce_emitted then sums the buffers
//    in a fixed order.
// Both sinks receive the same products w * g: the two paths compute the same adjoint, summed in a
// different order.
//
// Why this design (a deterministic segmented reduction) rather than a gather formulation of each adjoint
// (every output element summing its own contributions): the gather needs, for every voxel, the samples whose
// trilinear stencil touches it, i.e. the preimage of the voxel's neighbourhood under the map. That exists
// only for invertible maps (affine_grid_sample accepts any theta, singular ones included), its size depends
// on the sampling density, and it would be a second kernel per op whose maths must be kept equal to the
// scatter's. The emit path reuses the scatter kernel unchanged and works for any map.

template <typename T>
struct AtomicSink {
  T* out;
  __device__ __forceinline__ void add(int64_t /*slot*/, int64_t index, T value) const {
    atomic_add(out + index, value);
  }
};

template <typename T>
struct EmitSink {
  int64_t* index;  // the chunk's slots: prefilled by run_scatter, see there
  T* value;
  __device__ __forceinline__ void add(int64_t slot, int64_t target, T v) const {
    index[slot] = target;
    value[slot] = v;
  }
};

// Adjoint of gather_corners: the contribution w[c] * g to element base + off[c] for each valid corner c
// (slots slot .. slot + 7). Zero weights are skipped: those corners are outside the array and must not be
// written.
template <typename Sink, typename T>
__device__ __forceinline__ void scatter_corners(const Sink& sink, int64_t slot, int64_t base, const int64_t (&off)[8],
                                                const T (&w)[8], T g) {
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    if (w[c] != T(0)) sink.add(slot + c, base + off[c], w[c] * g);
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
// Running an adjoint (host): the atomic path, or the deterministic one.

// Contribution slots per chunk of the deterministic path: the environment variable
// TONNO_FAST_DETERMINISTIC_CHUNK when set (read at each call; tonno_fast/ops/triton/_common.py reads the same
// one for the Triton kernels), else 2^22.
constexpr int64_t kDefaultDeterministicChunk = int64_t(1) << 22;

inline int64_t deterministic_chunk() {
  const char* env = std::getenv("TONNO_FAST_DETERMINISTIC_CHUNK");
  if (env == nullptr || *env == '\0') return kDefaultDeterministicChunk;
  char* end = nullptr;
  const long long v = std::strtoll(env, &end, 10);
  TORCH_CHECK(end != env && *end == '\0' && v > 0,
              "tonno_fast: TONNO_FAST_DETERMINISTIC_CHUNK must be a positive integer (contribution slots per "
              "chunk of the deterministic adjoints), got '", std::string(env), "'");
  return static_cast<int64_t>(v);
}

// out.view(-1)[index[s]] += value[s] for every slot s, in a fixed order. index_put_(accumulate=True) on CUDA
// sorts the slots by target with a stable radix sort and sums each target's run in a fixed pattern: bitwise
// reproducible. It is what torch.index_add does under torch.use_deterministic_algorithms(True), where torch's
// documentation lists index_add on CUDA among the ops that then "act deterministically".
inline void reduce_emitted(at::Tensor& out, const at::Tensor& index, const at::Tensor& value) {
  c10::List<std::optional<at::Tensor>> indices;
  indices.push_back(index);
  out.view({-1}).index_put_(indices, value, /*accumulate=*/true);
}

// Runs an adjoint kernel into `out` (zeroed, contiguous). `launch(o0, o1, i0, i1, sink)` launches it over the
// outer items [o0, o1) and inner items [i0, i1) of its work; each (outer, inner) pair adds at most `per_pair`
// contributions, which with EmitSink go to slots ((o - o0) * (i1 - i0) + (i - i0)) * per_pair + r, r < per_pair.
//
// By default: one launch over everything with AtomicSink. Under torch.use_deterministic_algorithms(True)
// (warn_only too: there is nothing to warn about): chunks of at most max(cap, per_pair) slots, cap =
// deterministic_chunk() -- ranges of whole outer items when one fits, else ranges of the inner items of one
// outer item --, each launched with EmitSink and summed by reduce_emitted, one after the other.
// Memory: the chunk's buffers, (8 + sizeof(scalar_t)) bytes per slot (64 MiB at 2^22 slots in float64), plus
// index_put_'s sort of them (a few int64 per slot), whatever the problem size.
//
// Slots no contribution writes (invalid corners, zero gradients, threads past the end) keep their prefill:
// value +0 at index s mod out.numel(). Adding +0 changes no element (x + 0 == x for every x but -0, and a sum
// that starts from +0, as out does, is never -0), and spreading those slots over the output keeps the sort
// from piling them onto one element.
template <typename scalar_t, typename Launch>
void run_scatter(at::Tensor& out, int64_t n_outer, int64_t n_inner, int64_t per_pair, const Launch& launch) {
  if (!at::globalContext().deterministicAlgorithms()) {
    launch(int64_t(0), n_outer, int64_t(0), n_inner, AtomicSink<scalar_t>{out.mutable_data_ptr<scalar_t>()});
    return;
  }
  const int64_t numel = out.numel();
  if (numel == 0 || n_outer == 0 || n_inner == 0 || per_pair == 0) return;
  const int64_t pairs = std::max<int64_t>(1, deterministic_chunk() / per_pair);  // (outer, inner) pairs a chunk
  at::Tensor index_buf, value_buf;  // sized for the first chunk, the largest
  auto run = [&](int64_t o0, int64_t o1, int64_t i0, int64_t i1) {
    const int64_t slots = (o1 - o0) * (i1 - i0) * per_pair;
    if (!index_buf.defined()) {
      index_buf = at::empty({slots}, out.options().dtype(at::kLong));
      value_buf = at::empty({slots}, out.options());
    }
    at::Tensor index = index_buf.narrow(0, 0, slots);
    at::Tensor value = value_buf.narrow(0, 0, slots);
    at::arange_out(index, slots);
    if (slots > numel) index.remainder_(numel);
    value.zero_();
    launch(o0, o1, i0, i1,
           EmitSink<scalar_t>{index.mutable_data_ptr<int64_t>(), value.mutable_data_ptr<scalar_t>()});
    reduce_emitted(out, index, value);
  };
  if (n_inner <= pairs) {
    const int64_t step = pairs / n_inner;
    for (int64_t o0 = 0; o0 < n_outer; o0 += step) run(o0, std::min(n_outer, o0 + step), 0, n_inner);
  } else {
    for (int64_t o = 0; o < n_outer; ++o) {
      for (int64_t i0 = 0; i0 < n_inner; i0 += pairs) run(o, o + 1, i0, std::min(n_inner, i0 + pairs));
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Adjoint of sampling slices from a volume (slice_volume_backward, radon_backward): for every pixel (i, j)
// of every slice k of every stack n, the point maps[n] @ (k, i, j, 1) scatters
//   grad_value(b, c, n, k, p)        (p = i * w + j)
// onto its eight corners in out[b, c] (B, C, D, H, W), through `sink` (see run_scatter). The ops differ only
// in where the value of a pixel comes from, so GradFn is a small device functor with
// `scalar_t operator()(int64_t b, int64_t c, int64_t n, int64_t k, int32_t p)`.
//
// Work: outer items = the slices [slice0, slice1) of the N * S (flat n * S + k), inner items = the (b, c)
// planes [bc0, bc1) of the B * C; slot of pixel p, plane bc, corner r:
// (((slice - slice0) * h * w + p) * (bc1 - bc0) + bc - bc0) * 8 + r.
// Grid: x over the pixels of one slice (one thread per pixel, 32-bit: h * w < 2^31 is checked by the
// caller), y (looped) over the slices. Corners are computed once per pixel and reused for every (b, c).
template <typename scalar_t, typename GradFn, typename Sink>
__global__ void scatter_slices_kernel(GradFn grad_value, const scalar_t* __restrict__ maps, Sink sink, int64_t C,
                                      int64_t D, int64_t H, int64_t W, int64_t S, int32_t h, int32_t w,
                                      int64_t slice0, int64_t slice1, int64_t bc0, int64_t bc1) {
  const int32_t p = static_cast<int32_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= h * w) return;
  const int32_t i = p / w;
  const int32_t j = p - i * w;
  const int64_t vol_size = D * H * W;
  for (int64_t slice = slice0 + blockIdx.y; slice < slice1; slice += gridDim.y) {
    const int64_t n = slice / S;
    const int64_t k = slice - n * S;
    scalar_t M[12];
    load_map(maps, n, M);
    int64_t off[8];
    scalar_t wt[8];
    if (!map_corners(M, scalar_t(k), scalar_t(i), scalar_t(j), D, H, W, off, wt)) continue;
    const int64_t pixel_slot = ((slice - slice0) * h * w + p) * (bc1 - bc0);
    for (int64_t bc = bc0; bc < bc1; ++bc) {
      const int64_t b = bc / C;
      const scalar_t g = grad_value(b, bc - b * C, n, k, p);
      if (g != scalar_t(0)) scatter_corners(sink, (pixel_slot + bc - bc0) * 8, bc * vol_size, off, wt, g);
    }
  }
}

// Adjoint of sampling slices into `out` (B, C, D, H, W) (zeroed, contiguous) for `maps` (N, 3, 4) (contiguous)
// and slices of S x h x w pixels: scatter_slices_kernel on the current stream, through run_scatter.
template <typename scalar_t, typename GradFn>
void launch_scatter_slices(const GradFn& grad_value, const at::Tensor& maps, at::Tensor& out, int64_t S,
                           int64_t h, int64_t w) {
  constexpr int kScatterThreads = 256;
  const int64_t N = maps.size(0);
  const int64_t C = out.size(1), D = out.size(2), H = out.size(3), W = out.size(4);
  const scalar_t* maps_ptr = maps.const_data_ptr<scalar_t>();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  run_scatter<scalar_t>(out, N * S, out.size(0) * C, 8 * h * w,
                        [&](int64_t slice0, int64_t slice1, int64_t bc0, int64_t bc1, auto sink) {
    const dim3 grid(blocks_for(h * w, kScatterThreads), grid_yz(slice1 - slice0));
    scatter_slices_kernel<scalar_t, GradFn, decltype(sink)><<<grid, kScatterThreads, 0, stream>>>(
        grad_value, maps_ptr, sink, C, D, H, W, S, static_cast<int32_t>(h), static_cast<int32_t>(w), slice0, slice1,
        bc0, bc1);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cuda
}  // namespace tonno_fast
