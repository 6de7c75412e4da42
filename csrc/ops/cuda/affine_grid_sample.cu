// CUDA kernels for tonno_fast::affine_sample and tonno_fast::affine_sample_backward, on which
// tonno_fast::affine_grid_sample is built (tonno_fast/ops/native.py folds its theta into the maps).
//
//   affine_sample(volume (N,C,D,H,W), maps (N,3,4), size [N,C,Do,Ho,Wo]): output point (d, h, w) of batch
//   item n reads volume[n] at M[n] @ (d, h, w, 1), trilinear, zero padding.
//
// Forward (a gather): one thread per output point (consecutive threads = consecutive w: coalesced writes),
// corners computed once and reused for every channel, volume read through the read-only cache.
// Backward:
//  * volume gradient: the scatter of grad onto the eight corners, with atomicAdd (float/double, sm_60+) by
//    default, not bitwise reproducible; under torch.use_deterministic_algorithms(True) the same kernel emits
//    its contributions, summed in a fixed order (run_scatter in common.cuh);
//  * map gradient (deterministic): each thread accumulates dL/dM[n] = sum_p,c grad * d trilinear/dx (p, 1)
//    (maths::trilinear_with_grad) for its points, each block reduces its 12 sums with a fixed tree into
//    its own slot, and the slots are summed by ATen in float64 (the result's dtype).
#include "common.cuh"

namespace tonno_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kThetaBlocks = 256;  // blocks per batch item for the map gradient (partial slots)

// Grid: x (looped) over output points, y (looped) over batch items.
template <typename scalar_t>
__global__ void affine_sample_kernel(const scalar_t* __restrict__ volume, const scalar_t* __restrict__ maps,
                                     scalar_t* __restrict__ out, int64_t N, int64_t C, int64_t D, int64_t H,
                                     int64_t W, int64_t Do, int64_t Ho, int64_t Wo) {
  const int64_t P = Do * Ho * Wo;
  const int64_t vol_size = D * H * W;
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    scalar_t M[12];
    load_map(maps, n, M);
    for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < P; p += int64_t(gridDim.x) * blockDim.x) {
      scalar_t a, b, c3;
      grid_point(p, Ho, Wo, a, b, c3);
      int64_t off[8];
      scalar_t wt[8];
      const bool any = map_corners(M, a, b, c3, D, H, W, off, wt);
#pragma unroll 1  // unrolling the channel loop only raises register pressure (125 registers on sm_90)
      for (int64_t c = 0; c < C; ++c) {
        out[(n * C + c) * P + p] = any ? gather_corners(volume + (n * C + c) * vol_size, off, wt) : scalar_t(0);
      }
    }
  }
}

// Volume gradient: grid as the forward kernel; contributions through `sink` (run_scatter). Work: outer items =
// the batch items [n0, n1), inner items = the output points [p0, p1); slot of point p of item n, channel c,
// corner r: (((n - n0) * (p1 - p0) + p - p0) * C + c) * 8 + r.
template <typename scalar_t, typename Sink>
__global__ void affine_volume_grad_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ maps,
                                          Sink sink, int64_t C, int64_t D, int64_t H, int64_t W, int64_t Do,
                                          int64_t Ho, int64_t Wo, int64_t n0, int64_t n1, int64_t p0, int64_t p1) {
  const int64_t P = Do * Ho * Wo;
  const int64_t vol_size = D * H * W;
  for (int64_t n = n0 + blockIdx.y; n < n1; n += gridDim.y) {
    scalar_t M[12];
    load_map(maps, n, M);
    for (int64_t p = p0 + int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < p1;
         p += int64_t(gridDim.x) * blockDim.x) {
      scalar_t a, b, c3;
      grid_point(p, Ho, Wo, a, b, c3);
      int64_t off[8];
      scalar_t wt[8];
      if (!map_corners(M, a, b, c3, D, H, W, off, wt)) continue;
      const int64_t point_slot = ((n - n0) * (p1 - p0) + p - p0) * C;
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t g = ldg(grad + (n * C + c) * P + p);
        if (g != scalar_t(0)) scatter_corners(sink, (point_slot + c) * 8, (n * C + c) * vol_size, off, wt, g);
      }
    }
  }
}

// Map gradient partials: block (x, n) writes partial[n, x, 12]. gridDim.x == kThetaBlocks (or fewer).
template <typename scalar_t>
__global__ void affine_map_grad_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ volume,
                                       const scalar_t* __restrict__ maps, scalar_t* __restrict__ partial, int64_t N,
                                       int64_t C, int64_t D, int64_t H, int64_t W, int64_t Do, int64_t Ho,
                                       int64_t Wo) {
  __shared__ scalar_t scratch[12 * 32];
  const int64_t P = Do * Ho * Wo;
  const int64_t vol_size = D * H * W;
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    scalar_t M[12];
    load_map(maps, n, M);
    scalar_t s[12];
#pragma unroll
    for (int e = 0; e < 12; ++e) s[e] = scalar_t(0);
    for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < P; p += int64_t(gridDim.x) * blockDim.x) {
      scalar_t col[4];
      grid_point(p, Ho, Wo, col[0], col[1], col[2]);
      col[3] = scalar_t(1);
      scalar_t x0, x1, x2;
      maths::apply_affine(M, col[0], col[1], col[2], x0, x1, x2);
      scalar_t gx[3] = {scalar_t(0), scalar_t(0), scalar_t(0)};
#pragma unroll 1
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t g = ldg(grad + (n * C + c) * P + p);
        scalar_t g0, g1, g2;
        maths::trilinear_with_grad<scalar_t, scalar_t>(volume + (n * C + c) * vol_size, D, H, W, H * W, W,
                                                       int64_t(1), x0, x1, x2, g0, g1, g2);
        gx[0] += g * g0;
        gx[1] += g * g1;
        gx[2] += g * g2;
      }
#pragma unroll
      for (int r = 0; r < 3; ++r) {
#pragma unroll
        for (int k = 0; k < 4; ++k) s[r * 4 + k] += gx[r] * col[k];
      }
    }
    block_reduce_sum<scalar_t, 12>(s, scratch);
    if (threadIdx.x == 0) {
#pragma unroll
      for (int e = 0; e < 12; ++e) partial[(n * gridDim.x + blockIdx.x) * 12 + e] = s[e];
    }
    __syncthreads();  // scratch is reused by the next batch item of this block
  }
}

at::Tensor affine_sample_cuda(const at::Tensor& volume_in, const at::Tensor& maps_in, at::IntArrayRef size) {
  checks::check_affine_sample(at::kCUDA, volume_in, maps_in, size);
  const c10::cuda::CUDAGuard guard(volume_in.device());
  const at::Tensor volume = volume_in.contiguous(), maps = maps_in.contiguous();
  const int64_t N = volume.size(0), C = volume.size(1), Do = size[2], Ho = size[3], Wo = size[4];
  at::Tensor out = at::empty({N, C, Do, Ho, Wo}, volume.options());
  AT_DISPATCH_FLOATING_TYPES(volume.scalar_type(), "tonno_fast::affine_sample (CUDA)", [&] {
    const dim3 grid(blocks_for(Do * Ho * Wo, kThreads), grid_yz(N));
    affine_sample_kernel<scalar_t><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        volume.const_data_ptr<scalar_t>(), maps.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), N, C,
        volume.size(2), volume.size(3), volume.size(4), Do, Ho, Wo);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> affine_sample_backward_cuda(const at::Tensor& grad_in, const at::Tensor& volume_in,
                                                               const at::Tensor& maps_in, bool volume_grad,
                                                               bool maps_grad) {
  checks::check_affine_sample_backward(at::kCUDA, grad_in, volume_in, maps_in);
  const c10::cuda::CUDAGuard guard(volume_in.device());
  const at::Tensor grad = grad_in.contiguous(), volume = volume_in.contiguous(), maps = maps_in.contiguous();
  const int64_t N = volume.size(0), C = volume.size(1), D = volume.size(2), H = volume.size(3), W = volume.size(4);
  const int64_t Do = grad.size(2), Ho = grad.size(3), Wo = grad.size(4);
  const int64_t P = Do * Ho * Wo;
  // A gradient not asked for is an empty tensor (tonno_fast/ops/contract.py).
  at::Tensor gvol = at::empty({0}, volume.options()), gmaps = at::empty({0}, volume.options().dtype(at::kDouble));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (volume_grad) {
    gvol = at::zeros_like(volume);
    AT_DISPATCH_FLOATING_TYPES(volume.scalar_type(), "tonno_fast::affine_sample_backward (CUDA)", [&] {
      const scalar_t* grad_ptr = grad.const_data_ptr<scalar_t>();
      const scalar_t* maps_ptr = maps.const_data_ptr<scalar_t>();
      run_scatter<scalar_t>(gvol, N, P, 8 * C, [&](int64_t n0, int64_t n1, int64_t p0, int64_t p1, auto sink) {
        const dim3 grid(blocks_for(p1 - p0, kThreads), grid_yz(n1 - n0));
        affine_volume_grad_kernel<scalar_t, decltype(sink)><<<grid, kThreads, 0, stream>>>(
            grad_ptr, maps_ptr, sink, C, D, H, W, Do, Ho, Wo, n0, n1, p0, p1);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  if (maps_grad) {
    const int64_t blocks = std::min<int64_t>(kThetaBlocks, (P + kThreads - 1) / kThreads);
    at::Tensor partial = at::empty({N, blocks, 12}, volume.options());
    AT_DISPATCH_FLOATING_TYPES(volume.scalar_type(), "tonno_fast::affine_sample_backward (CUDA)", [&] {
      const dim3 grid(static_cast<unsigned int>(blocks), grid_yz(N));
      affine_map_grad_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
          grad.const_data_ptr<scalar_t>(), volume.const_data_ptr<scalar_t>(), maps.const_data_ptr<scalar_t>(),
          partial.mutable_data_ptr<scalar_t>(), N, C, D, H, W, Do, Ho, Wo);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    gmaps = partial.to(at::kDouble).sum(1).view({N, 3, 4});
  }
  return {gvol, gmaps};
}

}  // namespace

TONNO_FAST_KERNELS(CUDA, affine_sample, affine_sample_cuda, affine_sample_backward_cuda)

}  // namespace cuda
}  // namespace tonno_fast
