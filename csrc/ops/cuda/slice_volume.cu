// CUDA kernels for tonno_fast::slice_volume and its adjoint tonno_fast::slice_volume_backward.
//
//   out[b, n, k, c, i, j] = trilinear(volume[b, c], maps[n] @ (k, i, j, 1))       (B, N, S, C, h, w)
//
// with each corner outside the volume reading `fill` (see maths.h inside_weight):
//   out = sum_valid w v + fill * (1 - sum_valid w).
//
// Forward (a gather, no atomics): one thread owns VEC consecutive pixels of one row of one slice, so a
// warp writes 32 * VEC consecutive output elements of every (b, c) plane: coalesced 16-byte stores (float4,
// double2, or 8 x bf16/fp16). The VEC coordinates stay in registers and are reused for every (b, c); the
// volume is read through the read-only path (__ldg): neighbouring pixels of a slice map to neighbouring
// voxels, so the eight corner loads of a warp hit the same few cache lines.
//
// Adjoint: a scatter of each pixel's gradient onto its eight corners (scatter_slices_kernel of common.cuh):
// with atomicAdd (float/double, sm_60+) by default, which is not bitwise reproducible; under
// torch.use_deterministic_algorithms(True), the same kernel emits its contributions and they are summed in
// a fixed order (run_scatter in common.cuh): bitwise reproducible.
#include "common.cuh"

namespace tonno_fast {
namespace cuda {
namespace {

// VEC values of out_t stored with one instruction (16 bytes when VEC * sizeof(out_t) == 16).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Grid: x over the pixels of one slice in units of VEC (32-bit: h * w < 2^31 is checked), y (looped)
// over the N * S slices.
template <typename scalar_t, typename out_t, int VEC>
__global__ void slice_volume_kernel(const scalar_t* __restrict__ volume, const scalar_t* __restrict__ maps,
                                    out_t* __restrict__ out, int64_t B, int64_t C, int64_t D, int64_t H,
                                    int64_t W, int64_t N, int64_t S, int32_t h, int32_t w, scalar_t fill) {
  const int32_t w_vec = w / VEC;
  const int32_t p = static_cast<int32_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= h * w_vec) return;
  const int32_t i = p / w_vec;
  const int32_t j0 = (p - i * w_vec) * VEC;
  const int64_t plane = int64_t(h) * w;
  const int64_t vol_size = D * H * W;
  for (int64_t slice = blockIdx.y; slice < N * S; slice += gridDim.y) {
    const int64_t n = slice / S;
    const int64_t k = slice - n * S;
    scalar_t M[12];
    load_map(maps, n, M);
    // Continuous volume index of each of the VEC pixels: computed once, kept in registers.
    scalar_t x0[VEC], x1[VEC], x2[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e)
      maths::apply_affine(M, scalar_t(k), scalar_t(i), scalar_t(j0 + e), x0[e], x1[e], x2[e]);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* vol = volume + (b * C + c) * vol_size;
        Pack<out_t, VEC> pack;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          int64_t off[8];
          scalar_t wt[8];
          scalar_t val = scalar_t(0);
          scalar_t inside = scalar_t(0);
          if (maths::trilinear_corners(D, H, W, H * W, W, int64_t(1), x0[e], x1[e], x2[e], off, wt)) {
            val = gather_corners(vol, off, wt);
#pragma unroll
            for (int q = 0; q < 8; ++q) inside += wt[q];
          }
          if (fill != scalar_t(0)) val += fill * (scalar_t(1) - inside);
          pack.v[e] = static_cast<out_t>(val);
        }
        const int64_t o = (((b * N + n) * S + k) * C + c) * plane + int64_t(i) * w + j0;
        *reinterpret_cast<Pack<out_t, VEC>*>(out + o) = pack;
      }
    }
  }
}

// Adjoint (scatter_slices_kernel of common.cuh): the value scattered by pixel p of slice (n, k) into
// volume (b, c) is grad[b, n, k, c, p].
template <typename scalar_t>
struct SliceVolumeGrad {
  const scalar_t* grad;  // (B, N, S, C, h, w), contiguous
  int64_t C, N, S, plane;  // plane = h * w
  __device__ __forceinline__ scalar_t operator()(int64_t b, int64_t c, int64_t n, int64_t k, int32_t p) const {
    return ldg(grad + (((b * N + n) * S + k) * C + c) * plane + p);
  }
};

constexpr int kThreads = 256;

template <typename scalar_t, typename out_t, int VEC>
void launch_forward(const at::Tensor& volume, const at::Tensor& maps, at::Tensor& out, int64_t S, int64_t h,
                    int64_t w, double fill) {
  const int64_t B = volume.size(0), C = volume.size(1), D = volume.size(2), H = volume.size(3),
                W = volume.size(4), N = maps.size(0);
  const dim3 grid(blocks_for(h * (w / VEC), kThreads), grid_yz(N * S));
  slice_volume_kernel<scalar_t, out_t, VEC><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      volume.const_data_ptr<scalar_t>(), maps.const_data_ptr<scalar_t>(), out.mutable_data_ptr<out_t>(), B, C, D,
      H, W, N, S, static_cast<int32_t>(h), static_cast<int32_t>(w), static_cast<scalar_t>(fill));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Pick 16-byte stores when a row holds a whole number of them (rows then start 16-byte aligned, since
// the output is a fresh contiguous allocation), else one element per thread.
template <typename scalar_t, typename out_t>
void dispatch_vec(const at::Tensor& volume, const at::Tensor& maps, at::Tensor& out, int64_t S, int64_t h,
                  int64_t w, double fill) {
  constexpr int kVec = 16 / sizeof(out_t);
  if (w % kVec == 0) {
    launch_forward<scalar_t, out_t, kVec>(volume, maps, out, S, h, w, fill);
  } else {
    launch_forward<scalar_t, out_t, 1>(volume, maps, out, S, h, w, fill);
  }
}

at::Tensor slice_volume_cuda(const at::Tensor& volume_in, const at::Tensor& maps_in, int64_t n_slices,
                             int64_t height, int64_t width, double fill,
                             std::optional<at::ScalarType> out_dtype) {
  const int64_t N = checks::check_slice_volume(at::kCUDA, volume_in, maps_in, n_slices, height, width, out_dtype);
  checks::check_int32(height * width, "height * width (pixels per slice)");
  const at::ScalarType odt = out_dtype.value_or(volume_in.scalar_type());
  const c10::cuda::CUDAGuard guard(volume_in.device());
  const at::Tensor volume = volume_in.contiguous();
  const at::Tensor maps = maps_in.contiguous();
  at::Tensor out = at::empty({volume.size(0), N, n_slices, volume.size(1), height, width},
                             volume.options().dtype(odt));
  AT_DISPATCH_FLOATING_TYPES(volume.scalar_type(), "tonno_fast::slice_volume (CUDA)", [&] {
    switch (odt) {
      case at::kFloat: dispatch_vec<scalar_t, float>(volume, maps, out, n_slices, height, width, fill); break;
      case at::kDouble: dispatch_vec<scalar_t, double>(volume, maps, out, n_slices, height, width, fill); break;
      case at::kBFloat16:
        dispatch_vec<scalar_t, at::BFloat16>(volume, maps, out, n_slices, height, width, fill);
        break;
      default: dispatch_vec<scalar_t, at::Half>(volume, maps, out, n_slices, height, width, fill); break;
    }
  });
  return out;
}

at::Tensor slice_volume_backward_cuda(const at::Tensor& grad_in, const at::Tensor& maps_in,
                                      at::IntArrayRef volume_shape) {
  const int64_t N = checks::check_slice_volume_backward(at::kCUDA, grad_in, maps_in, volume_shape);
  const int64_t B = grad_in.size(0), S = grad_in.size(2), C = grad_in.size(3), h = grad_in.size(4),
                w = grad_in.size(5);
  const int64_t D = volume_shape[0], H = volume_shape[1], W = volume_shape[2];
  checks::check_int32(h * w, "height * width (pixels per slice)");
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor maps = maps_in.contiguous();
  at::Tensor out = at::zeros({B, C, D, H, W}, grad.options());
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "tonno_fast::slice_volume_backward (CUDA)", [&] {
    launch_scatter_slices<scalar_t>(SliceVolumeGrad<scalar_t>{grad.const_data_ptr<scalar_t>(), C, N, S, h * w}, maps,
                                    out, S, h, w);
  });
  return out;
}

}  // namespace

TONNO_FAST_KERNELS(CUDA, slice_volume, slice_volume_cuda, slice_volume_backward_cuda)

}  // namespace cuda
}  // namespace tonno_fast
