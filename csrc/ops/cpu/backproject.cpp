// CPU kernels of tonno_fast::backproject and its adjoint tonno_fast::backproject_backward.
//
//   backproject: sinogram (B,K,N,S), maps (N,3,4) (volume maps; only row 0, the continuous slice index t, is
//     used), weights (N,) -> (B,K,D,H,W):
//     out[b,k,d,h,w] = sum_n weights[n] * lerp(sinogram[b,k,n,:], t_n(d,h,w)),  t_n = maps[n,0] @ (d,h,w,1),
//     taps outside [0, S-1] read zero.
//   backproject_backward: grad (B,K,D,H,W) -> (B,K,N,S), the exact adjoint.
#include "common.h"

namespace tonno_fast {
namespace cpu {
namespace {

template <typename T>
void backproject_kernel(const T* sino, const T* maps, const T* weights, int64_t BK, int64_t N, int64_t S,
                        int64_t D, int64_t H, int64_t W, T* out) {
  const int64_t P = S + 3;
  // Zero-padded copy of every sinogram row (maths::lerp_zero_padded): the inner loop has no branches and
  // vectorises (two gathers per update). BK*N*(S+3) values: small, stays in L1/L2.
  std::vector<T> padded(BK * N * P, T(0));
  for (int64_t qn = 0; qn < BK * N; ++qn) std::copy(sino + qn * S, sino + (qn + 1) * S, padded.begin() + qn * P + 1);
  // One task per voxel row (d, h). t = maps[n,0] @ (d,h,x,1) steps by maps[n,0,2] along the row; the row's
  // accumulators stay in L1 across the N directions.
  for_each_voxel_row(BK, D, H, W, out, [&](int64_t d, int64_t hh, T* acc) {
    for (int64_t q = 0; q < BK; ++q) {
      T* __restrict a = acc + q * W;
      for (int64_t n = 0; n < N; ++n) {
        const T* r = maps + 12 * n;  // row 0 of maps[n]
        const T t0 = maths::apply_row(r, T(d), T(hh), T(0)), dt = r[2], wn = weights[n];
        const T* __restrict row = padded.data() + (q * N + n) * P;
#pragma omp simd
        for (int32_t x = 0; x < static_cast<int32_t>(W); ++x) a[x] += wn * maths::lerp_zero_padded(row, S, t0 + T(x) * dt);
      }
    }
  });
}

template <typename T>
void backproject_backward_kernel(const T* grad, const T* maps, const T* weights, int64_t BK, int64_t N, int64_t S,
                                 int64_t D, int64_t H, int64_t W, T* out) {
  using Acc = at::acc_type<T, /*is_cuda=*/false>;  // each bin sums ~D*H*W/S voxels: double for float32
  const int64_t DHW = D * H * W, NS = N * S, P = S + 3;
  // One task per direction n: it owns out[:, :, n, :] (race-free) and visits the voxels in a fixed order
  // (deterministic whatever the thread count). Bins are padded as in maths::lerp_zero_padded (bin m holds tap
  // m - 1; the padding bins collect the weights of invalid taps and are dropped), so the scatter has no
  // branches either.
  parallel_for_dynamic(N, [&](int64_t n) {
    const T* r = maps + 12 * n;
    std::vector<Acc> acc(BK * P, Acc(0));
    for (int64_t dh = 0; dh < D * H; ++dh) {
      const int64_t d = dh / H, hh = dh % H;
      const T t0 = maths::apply_row(r, T(d), T(hh), T(0)), dt = r[2];
      for (int64_t x = 0; x < W; ++x) {
        T t = t0 + T(x) * dt;
        t = t > T(-1) ? t : T(-1);  // as lerp_zero_padded: outside [-1, S] reads (here: writes) padding only
        t = t < T(S) ? t : T(S);
        const T u = t + T(1);
        const int32_t i = static_cast<int32_t>(u);
        const Acc f = Acc(u - T(i));
        for (int64_t q = 0; q < BK; ++q) {
          const Acc g = Acc(grad[q * DHW + dh * W + x]);
          acc[q * P + i] += (Acc(1) - f) * g;
          acc[q * P + i + 1] += f * g;
        }
      }
    }
    for (int64_t q = 0; q < BK; ++q) {
      for (int64_t s = 0; s < S; ++s) out[q * NS + n * S + s] = static_cast<T>(Acc(weights[n]) * acc[q * P + s + 1]);
    }
  });
}

at::Tensor backproject_cpu(const at::Tensor& sinogram, const at::Tensor& maps, const at::Tensor& weights,
                           at::IntArrayRef volume_shape) {
  checks::check_backproject(at::kCPU, sinogram, "sinogram", 4, "(B, K, N, S)", maps, weights, volume_shape);
  const at::Tensor s = sinogram.contiguous(), m = maps.contiguous(), w = weights.contiguous();
  const int64_t B = s.size(0), K = s.size(1), N = s.size(2), S = s.size(3);
  const int64_t D = volume_shape[0], H = volume_shape[1], W = volume_shape[2];
  at::Tensor out = at::empty({B, K, D, H, W}, s.options());
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "tonno_fast::backproject", [&] {
    backproject_kernel<scalar_t>(s.const_data_ptr<scalar_t>(), m.const_data_ptr<scalar_t>(),
                                 w.const_data_ptr<scalar_t>(), B * K, N, S, D, H, W,
                                 out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor backproject_backward_cpu(const at::Tensor& grad, const at::Tensor& maps, const at::Tensor& weights,
                                    int64_t n_slices) {
  const int64_t N = checks::check_backproject_backward(at::kCPU, grad, maps, weights);
  checks::check_positive(n_slices, "n_slices");
  const at::Tensor g = grad.contiguous(), m = maps.contiguous(), w = weights.contiguous();
  const int64_t B = g.size(0), K = g.size(1);
  at::Tensor out = at::empty({B, K, N, n_slices}, g.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "tonno_fast::backproject_backward", [&] {
    backproject_backward_kernel<scalar_t>(g.const_data_ptr<scalar_t>(), m.const_data_ptr<scalar_t>(),
                                          w.const_data_ptr<scalar_t>(), B * K, N, n_slices, g.size(2), g.size(3),
                                          g.size(4), out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

TONNO_FAST_KERNELS(CPU, backproject, backproject_cpu, backproject_backward_cpu)

}  // namespace cpu
}  // namespace tonno_fast
