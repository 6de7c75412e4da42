// CUDA kernels for tonno_fast::backproject_slices and its adjoint tonno_fast::backproject_slices_backward.
//
//   out[b, k, d, h, w] = sum_n weights[n] * trilinear(stacks[b, k, n], maps[n] @ (d, h, w, 1))
//
// stacks (B, K, N, S, h, w), maps = volume maps (N, 3, 4), out (B, K, D, H, W). Corners outside a stack
// read zero.
//
// Forward (a gather, no atomics): one thread per voxel and up to kPlanes (b, k) planes; it loops over the
// directions, computes the voxel's corners in the stack of direction n once and reuses them for its
// planes. Maps and weights (a few hundred bytes) are read through the read-only cache, where every thread
// of the block hits the same address; stack reads go through __ldg too. Output writes are coalesced.
//
// Adjoint: the scatter of weights[n] * grad[b, k, voxel] onto the voxel's eight corners in stack n: with
// atomicAdd (float/double, sm_60+) by default, not bitwise reproducible; under
// torch.use_deterministic_algorithms(True) the same kernel emits its contributions, summed in a fixed order
// (run_scatter in common.cuh).
#include "common.cuh"

namespace tonno_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kPlanes = 4;  // (b, k) planes per thread: the corners are shared across them

// Grid: x (looped) over voxels, y over groups of kPlanes (b, k) planes.
template <typename scalar_t>
__global__ void backproject_slices_kernel(const scalar_t* __restrict__ stacks, const scalar_t* __restrict__ maps,
                                          const scalar_t* __restrict__ weights, scalar_t* __restrict__ out,
                                          int64_t BK, int64_t N, int64_t S, int64_t h, int64_t w, int64_t D,
                                          int64_t H, int64_t W) {
  const int64_t V = D * H * W;
  const int64_t stack_size = S * h * w;
  const int64_t bk0 = int64_t(blockIdx.y) * kPlanes;
  for (int64_t v = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; v < V; v += int64_t(gridDim.x) * blockDim.x) {
    scalar_t cd, ch, cw;
    grid_point(v, H, W, cd, ch, cw);
    scalar_t acc[kPlanes];
#pragma unroll
    for (int r = 0; r < kPlanes; ++r) acc[r] = scalar_t(0);
    for (int64_t n = 0; n < N; ++n) {
      scalar_t M[12];
      load_map(maps, n, M);
      int64_t off[8];
      scalar_t wt[8];
      if (!map_corners(M, cd, ch, cw, S, h, w, off, wt)) continue;
      const scalar_t wn = ldg(weights + n);
#pragma unroll
      for (int r = 0; r < kPlanes; ++r) {
        if (bk0 + r < BK) acc[r] += wn * gather_corners(stacks + ((bk0 + r) * N + n) * stack_size, off, wt);
      }
    }
#pragma unroll
    for (int r = 0; r < kPlanes; ++r) {
      if (bk0 + r < BK) out[(bk0 + r) * V + v] = acc[r];
    }
  }
}

// Adjoint: one thread per voxel, y over (b, k) planes (looped); contributions through `sink` (run_scatter).
// Work: outer items = the directions [n0, n1), inner items = the voxels [v0, v1); slot of voxel v, direction
// n, plane bk, corner r: (((n - n0) * (v1 - v0) + v - v0) * BK + bk) * 8 + r.
template <typename scalar_t, typename Sink>
__global__ void backproject_slices_backward_kernel(const scalar_t* __restrict__ grad,
                                                   const scalar_t* __restrict__ maps,
                                                   const scalar_t* __restrict__ weights, Sink sink, int64_t BK,
                                                   int64_t N, int64_t S, int64_t h, int64_t w, int64_t D, int64_t H,
                                                   int64_t W, int64_t n0, int64_t n1, int64_t v0, int64_t v1) {
  const int64_t V = D * H * W;
  const int64_t stack_size = S * h * w;
  for (int64_t v = v0 + int64_t(blockIdx.x) * blockDim.x + threadIdx.x; v < v1;
       v += int64_t(gridDim.x) * blockDim.x) {
    scalar_t cd, ch, cw;
    grid_point(v, H, W, cd, ch, cw);
    for (int64_t n = n0; n < n1; ++n) {
      scalar_t M[12];
      load_map(maps, n, M);
      int64_t off[8];
      scalar_t wt[8];
      if (!map_corners(M, cd, ch, cw, S, h, w, off, wt)) continue;
      const scalar_t wn = ldg(weights + n);
      const int64_t voxel_slot = ((n - n0) * (v1 - v0) + v - v0) * BK;
      for (int64_t bk = blockIdx.y; bk < BK; bk += gridDim.y) {
        const scalar_t g = wn * ldg(grad + bk * V + v);
        if (g != scalar_t(0)) scatter_corners(sink, (voxel_slot + bk) * 8, (bk * N + n) * stack_size, off, wt, g);
      }
    }
  }
}

at::Tensor backproject_slices_cuda(const at::Tensor& stacks_in, const at::Tensor& maps_in,
                                   const at::Tensor& weights_in, at::IntArrayRef volume_shape) {
  const int64_t N = checks::check_backproject(at::kCUDA, stacks_in, "stacks", 6, "(B, K, N, S, h, w)", maps_in,
                                              weights_in, volume_shape);
  const int64_t B = stacks_in.size(0), K = stacks_in.size(1), S = stacks_in.size(3), h = stacks_in.size(4),
                w = stacks_in.size(5);
  const int64_t D = volume_shape[0], H = volume_shape[1], W = volume_shape[2];
  const int64_t BK = B * K;
  TORCH_CHECK((BK + kPlanes - 1) / kPlanes <= 65535, "tonno_fast: stacks has B * K = ", BK,
              "; the CUDA backproject_slices kernel supports at most ", 65535 * kPlanes);
  const c10::cuda::CUDAGuard guard(stacks_in.device());
  const at::Tensor stacks = stacks_in.contiguous();
  const at::Tensor maps = maps_in.contiguous();
  const at::Tensor weights = weights_in.contiguous();
  at::Tensor out = at::empty({B, K, D, H, W}, stacks.options());
  AT_DISPATCH_FLOATING_TYPES(stacks.scalar_type(), "tonno_fast::backproject_slices (CUDA)", [&] {
    const dim3 grid(blocks_for(D * H * W, kThreads), static_cast<unsigned int>((BK + kPlanes - 1) / kPlanes));
    backproject_slices_kernel<scalar_t><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        stacks.const_data_ptr<scalar_t>(), maps.const_data_ptr<scalar_t>(), weights.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(), BK, N, S, h, w, D, H, W);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor backproject_slices_backward_cuda(const at::Tensor& grad_in, const at::Tensor& maps_in,
                                            const at::Tensor& weights_in, at::IntArrayRef stack_shape) {
  const int64_t N = checks::check_backproject_backward(at::kCUDA, grad_in, maps_in, weights_in);
  checks::check_shape3(stack_shape, "stack_shape", "(S, h, w)");
  const int64_t B = grad_in.size(0), K = grad_in.size(1), D = grad_in.size(2), H = grad_in.size(3),
                W = grad_in.size(4);
  const int64_t S = stack_shape[0], h = stack_shape[1], w = stack_shape[2];
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor maps = maps_in.contiguous();
  const at::Tensor weights = weights_in.contiguous();
  at::Tensor out = at::zeros({B, K, N, S, h, w}, grad.options());
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "tonno_fast::backproject_slices_backward (CUDA)", [&] {
    const scalar_t* grad_ptr = grad.const_data_ptr<scalar_t>();
    const scalar_t* maps_ptr = maps.const_data_ptr<scalar_t>();
    const scalar_t* weights_ptr = weights.const_data_ptr<scalar_t>();
    const auto stream = c10::cuda::getCurrentCUDAStream();
    run_scatter<scalar_t>(out, N, D * H * W, 8 * B * K,
                          [&](int64_t n0, int64_t n1, int64_t v0, int64_t v1, auto sink) {
      const dim3 grid(blocks_for(v1 - v0, kThreads), grid_yz(B * K));
      backproject_slices_backward_kernel<scalar_t, decltype(sink)><<<grid, kThreads, 0, stream>>>(
          grad_ptr, maps_ptr, weights_ptr, sink, B * K, N, S, h, w, D, H, W, n0, n1, v0, v1);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace

TONNO_FAST_KERNELS(CUDA, backproject_slices, backproject_slices_cuda, backproject_slices_backward_cuda)

}  // namespace cuda
}  // namespace tonno_fast
