// CUDA kernels for tonno_fast::radon (plane sums) and its adjoint tonno_fast::radon_backward.
//
//   out[b, c, n, k] = scale * sum_{i, j} trilinear(volume[b, c], maps[n] @ (k, i, j, 1))      (B, C, N, S)
//
// Forward, fused: no slice is ever written. One block owns one slice (n, k) and up to kChannels (b, c)
// planes; its threads stride over the h * w pixels, compute each pixel's corners once, accumulate one
// partial sum per (b, c) in registers and finish with a deterministic tree reduction (block_reduce_sum):
// the result is bitwise reproducible for a given launch configuration. The volume is read through the
// read-only path (__ldg).
//
// Adjoint: out[b, c] += scale * grad[b, c, n, k] * (corner weights) for every pixel (scatter_slices_kernel of
// common.cuh): with atomicAdd by default, not bitwise reproducible; under
// torch.use_deterministic_algorithms(True), emitted contributions summed in a fixed order (run_scatter).
#include "common.cuh"

namespace tonno_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kChannels = 4;  // (b, c) planes summed by one block: the corners are shared across them

// Grid: x (looped) over the N * S slices, y over groups of kChannels (b, c) planes.
template <typename scalar_t>
__global__ void radon_kernel(const scalar_t* __restrict__ volume, const scalar_t* __restrict__ maps,
                             scalar_t* __restrict__ out, int64_t BC, int64_t D, int64_t H, int64_t W, int64_t N,
                             int64_t S, int32_t h, int32_t w, scalar_t scale) {
  __shared__ scalar_t scratch[kChannels * 32];
  const int64_t bc0 = int64_t(blockIdx.y) * kChannels;
  const int64_t vol_size = D * H * W;
  const int32_t n_pix = h * w;
  for (int64_t slice = blockIdx.x; slice < N * S; slice += gridDim.x) {
    const int64_t n = slice / S;
    const int64_t k = slice - n * S;
    scalar_t M[12];
    load_map(maps, n, M);
    scalar_t acc[kChannels];
#pragma unroll
    for (int r = 0; r < kChannels; ++r) acc[r] = scalar_t(0);
    for (int32_t p = threadIdx.x; p < n_pix; p += blockDim.x) {
      const int32_t i = p / w;
      const int32_t j = p - i * w;
      int64_t off[8];
      scalar_t wt[8];
      if (!map_corners(M, scalar_t(k), scalar_t(i), scalar_t(j), D, H, W, off, wt)) continue;
#pragma unroll
      for (int r = 0; r < kChannels; ++r) {
        if (bc0 + r < BC) acc[r] += gather_corners(volume + (bc0 + r) * vol_size, off, wt);
      }
    }
    block_reduce_sum<scalar_t, kChannels>(acc, scratch);
    if (threadIdx.x == 0) {
#pragma unroll
      for (int r = 0; r < kChannels; ++r) {
        if (bc0 + r < BC) out[((bc0 + r) * N + n) * S + k] = scale * acc[r];
      }
    }
    __syncthreads();  // scratch is reused by the next slice of this block
  }
}

// Adjoint (scatter_slices_kernel of common.cuh): every pixel of slice (n, k) scatters
// scale * grad[b, c, n, k] into volume (b, c).
template <typename scalar_t>
struct RadonGrad {
  const scalar_t* grad;  // (B, C, N, S), contiguous
  int64_t C, N, S;
  scalar_t scale;
  __device__ __forceinline__ scalar_t operator()(int64_t b, int64_t c, int64_t n, int64_t k, int32_t) const {
    return scale * ldg(grad + ((b * C + c) * N + n) * S + k);
  }
};

at::Tensor radon_cuda(const at::Tensor& volume_in, const at::Tensor& maps_in, int64_t n_slices, int64_t height,
                      int64_t width, double scale) {
  const int64_t N = checks::check_radon(at::kCUDA, volume_in, maps_in, n_slices, height, width);
  checks::check_int32(height * width, "height * width (pixels per slice)");
  const c10::cuda::CUDAGuard guard(volume_in.device());
  const at::Tensor volume = volume_in.contiguous();
  const at::Tensor maps = maps_in.contiguous();
  const int64_t B = volume.size(0), C = volume.size(1);
  at::Tensor out = at::empty({B, C, N, n_slices}, volume.options());
  const int64_t BC = B * C;
  TORCH_CHECK((BC + kChannels - 1) / kChannels <= 65535, "tonno_fast: volume has B * C = ", BC,
              " channels; the CUDA radon kernel supports at most ", 65535 * kChannels);
  AT_DISPATCH_FLOATING_TYPES(volume.scalar_type(), "tonno_fast::radon (CUDA)", [&] {
    const dim3 grid(blocks_for(N * n_slices, 1), static_cast<unsigned int>((BC + kChannels - 1) / kChannels));
    radon_kernel<scalar_t><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        volume.const_data_ptr<scalar_t>(), maps.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), BC,
        volume.size(2), volume.size(3), volume.size(4), N, n_slices, static_cast<int32_t>(height),
        static_cast<int32_t>(width), static_cast<scalar_t>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor radon_backward_cuda(const at::Tensor& grad_in, const at::Tensor& maps_in, int64_t height,
                               int64_t width, double scale, at::IntArrayRef volume_shape) {
  const int64_t N = checks::check_radon_backward(at::kCUDA, grad_in, maps_in, height, width, volume_shape);
  checks::check_int32(height * width, "height * width (pixels per slice)");
  const int64_t B = grad_in.size(0), C = grad_in.size(1), S = grad_in.size(3);
  const int64_t D = volume_shape[0], H = volume_shape[1], W = volume_shape[2];
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor maps = maps_in.contiguous();
  at::Tensor out = at::zeros({B, C, D, H, W}, grad.options());
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "tonno_fast::radon_backward (CUDA)", [&] {
    launch_scatter_slices<scalar_t>(
        RadonGrad<scalar_t>{grad.const_data_ptr<scalar_t>(), C, N, S, static_cast<scalar_t>(scale)}, maps, out, S,
        height, width);
  });
  return out;
}

}  // namespace

TONNO_FAST_KERNELS(CUDA, radon, radon_cuda, radon_backward_cuda)

}  // namespace cuda
}  // namespace tonno_fast
