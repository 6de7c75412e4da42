// CUDA kernels for tonno_fast::backproject and its adjoint tonno_fast::backproject_backward.
//
//   out[b, k, d, h, w] = sum_n weights[n] * lerp(sinogram[b, k, n, :], t),  t = maps[n, 0] @ (d, h, w, 1)
//
// (maps are the volume maps; only row 0, the continuous slice index, is used; a tap outside [0, S-1]
// contributes zero.)
//
// Forward (a gather, arithmetic-bound: the sinogram is tiny): a block owns kThreads * kVoxels voxels of one
// (b, k) volume; it stages a chunk of directions (row 0 of each map, the weight and the sinogram row,
// zero-padded so the interpolation needs no branch: maths::lerp_zero_padded) in shared memory, then every
// thread loops over the chunk's directions for each of its kVoxels voxels, so a direction's coefficients
// are read once from shared memory (broadcast) and used kVoxels times. When a single sinogram row does not
// fit in shared memory (S > ~5000 in float64), rows are read from global memory through the read-only
// cache instead (maths::linear_taps).
//
// Adjoint (a gather too, deterministic, no atomics): one block per sinogram bin (b, k, n, s). The voxels
// that feed bin s are those with s - 1 < t < s + 1, a slab two slices thick: for each (d, h) line the
// block's threads find the range of w inside the slab (maths::clip_range, with a margin; the exact tap
// test decides), accumulate hat weights * grad, and finish with a deterministic tree reduction.
#include "common.cuh"

namespace tonno_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kVoxels = 4;                  // voxels per thread (forward)
constexpr int64_t kSmemBytes = 40 * 1024;   // shared memory per block for a chunk of directions
constexpr int kBackwardThreads = 128;

// Shared-memory layout of a chunk of `nc` directions: coefficients [nc * 4] | weights [nc] |
// zero-padded rows [nc * (S + 3)] (row q at nc * 5 + q * (S + 3): 0, its S values, 0, 0).
template <typename scalar_t, bool kSmem>
__global__ void backproject_kernel(const scalar_t* __restrict__ sinogram, const scalar_t* __restrict__ maps,
                                   const scalar_t* __restrict__ weights, scalar_t* __restrict__ out, int64_t N,
                                   int64_t S, int64_t D, int64_t H, int64_t W, int64_t chunk) {
  extern __shared__ unsigned char smem_raw[];
  scalar_t* smem = reinterpret_cast<scalar_t*>(smem_raw);
  const int64_t V = D * H * W;
  const int64_t bk = blockIdx.y;
  const scalar_t* sino = sinogram + bk * N * S;
  // This thread's voxels: v = base + r * blockDim.x, so each store of r is coalesced across the block.
  const int64_t base = int64_t(blockIdx.x) * blockDim.x * kVoxels + threadIdx.x;
  scalar_t cd[kVoxels], ch[kVoxels], cw[kVoxels], acc[kVoxels];
#pragma unroll
  for (int r = 0; r < kVoxels; ++r) {
    const int64_t v = std::min<int64_t>(base + int64_t(r) * blockDim.x, V - 1);  // clamp: stores are guarded
    grid_point(v, H, W, cd[r], ch[r], cw[r]);
    acc[r] = scalar_t(0);
  }
  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t nc = std::min<int64_t>(chunk, N - n0);
    if constexpr (kSmem) {
      __syncthreads();  // the previous chunk is no longer read
      for (int64_t q = threadIdx.x; q < nc * 4; q += blockDim.x) smem[q] = ldg(maps + (n0 + q / 4) * 12 + q % 4);
      for (int64_t q = threadIdx.x; q < nc; q += blockDim.x) smem[nc * 4 + q] = ldg(weights + n0 + q);
      // 32-bit index maths: a chunk holds fewer than kSmemBytes / sizeof(scalar_t) values.
      const int32_t stride = static_cast<int32_t>(S + 3), n_pad = static_cast<int32_t>(nc) * stride;
      for (int32_t q = threadIdx.x; q < n_pad; q += blockDim.x) {
        const int32_t row = q / stride, e = q - row * stride - 1;  // e: index in the row, -1 .. S + 1
        smem[nc * 5 + q] = (e >= 0 && e < S) ? ldg(sino + (n0 + row) * S + e) : scalar_t(0);
      }
      __syncthreads();
    }
    for (int64_t q = 0; q < nc; ++q) {
      scalar_t m[4];
      scalar_t wn;
      const scalar_t* row;
      if constexpr (kSmem) {
#pragma unroll
        for (int e = 0; e < 4; ++e) m[e] = smem[q * 4 + e];
        wn = smem[nc * 4 + q];
        row = smem + nc * 5 + q * (S + 3);
      } else {
#pragma unroll
        for (int e = 0; e < 4; ++e) m[e] = ldg(maps + (n0 + q) * 12 + e);
        wn = ldg(weights + n0 + q);
        row = sino + (n0 + q) * S;
      }
#pragma unroll
      for (int r = 0; r < kVoxels; ++r) {
        const scalar_t t = maths::apply_row(m, cd[r], ch[r], cw[r]);
        if constexpr (kSmem) {
          acc[r] += wn * maths::lerp_zero_padded(row, S, t);
        } else {
          maths::Taps<scalar_t> tp;
          if (maths::linear_taps(t, S, tp)) acc[r] += wn * (tp.w0 * ldg(row + tp.i0) + tp.w1 * ldg(row + tp.i1));
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kVoxels; ++r) {
    const int64_t v = base + int64_t(r) * blockDim.x;
    if (v < V) out[bk * V + v] = acc[r];
  }
}

// Adjoint: block per bin (bk, n, s) of the output, looped over x; deterministic (see the file comment).
template <typename scalar_t>
__global__ void backproject_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ maps,
                                            const scalar_t* __restrict__ weights, scalar_t* __restrict__ out,
                                            int64_t BK, int64_t N, int64_t S, int64_t D, int32_t H, int64_t W) {
  __shared__ scalar_t scratch[32];
  const int64_t V = D * H * W;
  const int32_t n_lines = static_cast<int32_t>(D * H);
  for (int64_t bin = blockIdx.x; bin < BK * N * S; bin += gridDim.x) {
    const int64_t s = bin % S;
    const int64_t n = (bin / S) % N;
    const int64_t bk = bin / (S * N);
    scalar_t m[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) m[e] = ldg(maps + n * 12 + e);
    const scalar_t* g = grad + bk * V;
    const scalar_t sf = scalar_t(s);
    scalar_t acc[1] = {scalar_t(0)};
    for (int32_t line = threadIdx.x; line < n_lines; line += blockDim.x) {
      const int32_t d = line / H;
      const int32_t hh = line - d * H;
      // t(w) = a + m[2] w along the line: the range of w with s - 1 < t < s + 1, widened by a margin so
      // that rounding can never drop a voxel; linear_taps below makes the exact decision.
      const scalar_t a = m[0] * scalar_t(d) + m[1] * scalar_t(hh) + m[3];
      int64_t w_first, w_last;
      maths::clip_range(a, a, m[2], sf - scalar_t(1), sf + scalar_t(1), W, w_first, w_last);
      const scalar_t* gl = g + int64_t(line) * W;
      for (int64_t w = w_first; w < w_last; ++w) {
        // The same expression and interpolation weights as the forward kernel (maths.h).
        const scalar_t t = maths::apply_row(m, scalar_t(d), scalar_t(hh), scalar_t(w));
        maths::Taps<scalar_t> tp;
        if (!maths::linear_taps(t, S, tp)) continue;
        const scalar_t hat = (tp.i0 == s ? tp.w0 : scalar_t(0)) + (tp.i1 == s ? tp.w1 : scalar_t(0));
        if (hat != scalar_t(0)) acc[0] += hat * ldg(gl + w);
      }
    }
    block_reduce_sum<scalar_t, 1>(acc, scratch);
    if (threadIdx.x == 0) out[bin] = ldg(weights + n) * acc[0];
    __syncthreads();  // scratch is reused by the next bin of this block
  }
}

at::Tensor backproject_cuda(const at::Tensor& sinogram_in, const at::Tensor& maps_in, const at::Tensor& weights_in,
                            at::IntArrayRef volume_shape) {
  const int64_t N = checks::check_backproject(at::kCUDA, sinogram_in, "sinogram", 4, "(B, K, N, S)", maps_in,
                                              weights_in, volume_shape);
  const int64_t B = sinogram_in.size(0), K = sinogram_in.size(1), S = sinogram_in.size(3);
  const int64_t D = volume_shape[0], H = volume_shape[1], W = volume_shape[2];
  TORCH_CHECK(B * K <= 65535, "tonno_fast: sinogram has B * K = ", B * K,
              "; the CUDA backproject kernel supports at most 65535");
  const c10::cuda::CUDAGuard guard(sinogram_in.device());
  const at::Tensor sinogram = sinogram_in.contiguous();
  const at::Tensor maps = maps_in.contiguous();
  const at::Tensor weights = weights_in.contiguous();
  at::Tensor out = at::empty({B, K, D, H, W}, sinogram.options());
  AT_DISPATCH_FLOATING_TYPES(sinogram.scalar_type(), "tonno_fast::backproject (CUDA)", [&] {
    const int64_t per_dir = (S + 8) * static_cast<int64_t>(sizeof(scalar_t));  // 4 + 1 + padded row
    const int64_t chunk = std::min<int64_t>(N, kSmemBytes / per_dir);
    const int64_t V = D * H * W;
    const dim3 grid(blocks_for(V, kThreads * kVoxels), static_cast<unsigned int>(B * K));
    const auto stream = c10::cuda::getCurrentCUDAStream();
    if (chunk >= 1) {
      backproject_kernel<scalar_t, true><<<grid, kThreads, chunk * per_dir, stream>>>(
          sinogram.const_data_ptr<scalar_t>(), maps.const_data_ptr<scalar_t>(), weights.const_data_ptr<scalar_t>(),
          out.mutable_data_ptr<scalar_t>(), N, S, D, H, W, chunk);
    } else {
      backproject_kernel<scalar_t, false><<<grid, kThreads, 0, stream>>>(
          sinogram.const_data_ptr<scalar_t>(), maps.const_data_ptr<scalar_t>(), weights.const_data_ptr<scalar_t>(),
          out.mutable_data_ptr<scalar_t>(), N, S, D, H, W, N);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor backproject_backward_cuda(const at::Tensor& grad_in, const at::Tensor& maps_in,
                                     const at::Tensor& weights_in, int64_t n_slices) {
  const int64_t N = checks::check_backproject_backward(at::kCUDA, grad_in, maps_in, weights_in);
  checks::check_positive(n_slices, "n_slices");
  const int64_t B = grad_in.size(0), K = grad_in.size(1), D = grad_in.size(2), H = grad_in.size(3),
                W = grad_in.size(4);
  checks::check_int32(D * H, "D * H (lines of the volume)");
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor maps = maps_in.contiguous();
  const at::Tensor weights = weights_in.contiguous();
  at::Tensor out = at::empty({B, K, N, n_slices}, grad.options());
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "tonno_fast::backproject_backward (CUDA)", [&] {
    const dim3 grid(blocks_for(B * K * N * n_slices, 1));
    backproject_backward_kernel<scalar_t><<<grid, kBackwardThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        grad.const_data_ptr<scalar_t>(), maps.const_data_ptr<scalar_t>(), weights.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(), B * K, N, n_slices, D, static_cast<int32_t>(H), W);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TONNO_FAST_KERNELS(CUDA, backproject, backproject_cuda, backproject_backward_cuda)

}  // namespace cuda
}  // namespace tonno_fast
