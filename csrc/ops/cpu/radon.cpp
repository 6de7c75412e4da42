// CPU kernels of tonno_fast::radon (fused plane sums) and its adjoint tonno_fast::radon_backward.
//
//   radon: volume (B,C,D,H,W), maps (N,3,4) -> (B,C,N,S),
//     out[b,c,n,k] = scale * sum_ij trilinear(volume[b,c], maps[n] @ (k,i,j,1))   (no slice is written)
//   radon_backward: grad (B,C,N,S) -> (B,C,D,H,W), the exact adjoint.
#include "common.h"

namespace tonno_fast {
namespace cpu {
namespace {

template <typename T>
void radon_kernel(const T* vol, const T* maps, int64_t BC, int64_t D, int64_t H, int64_t W, int64_t N, int64_t S,
                  int64_t h, int64_t w, T scale, T* out) {
  using Acc = at::acc_type<T, /*is_cuda=*/false>;  // double sums for float32: ~h*w terms per plane
  const int64_t DHW = D * H * W;
  parallel_for_dynamic(N * S, [&](int64_t nk) {
    const int64_t n = nk / S, k = nk % S;
    const T* M = maps + 12 * n;
    std::vector<Acc> acc(BC, Acc(0));
    for (int64_t i = 0; i < h; ++i) {
      T x[3], step[3];
      map_row(M, T(k), T(i), x, step);
      sum_row<T, Acc>(vol, D, H, W, BC, DHW, x, step, w, acc.data());
    }
    for (int64_t q = 0; q < BC; ++q) out[(q * N + n) * S + k] = static_cast<T>(Acc(scale) * acc[q]);
  });
}

at::Tensor radon_cpu(const at::Tensor& volume, const at::Tensor& maps, int64_t n_slices, int64_t height,
                     int64_t width, double scale) {
  const int64_t N = checks::check_radon(at::kCPU, volume, maps, n_slices, height, width);
  const at::Tensor vol = volume.contiguous(), m = maps.contiguous();
  const int64_t B = vol.size(0), C = vol.size(1);
  at::Tensor out = at::empty({B, C, N, n_slices}, vol.options());
  AT_DISPATCH_FLOATING_TYPES(vol.scalar_type(), "tonno_fast::radon", [&] {
    radon_kernel<scalar_t>(vol.const_data_ptr<scalar_t>(), m.const_data_ptr<scalar_t>(), B * C, vol.size(2),
                           vol.size(3), vol.size(4), N, n_slices, height, width, static_cast<scalar_t>(scale),
                           out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor radon_backward_cpu(const at::Tensor& grad, const at::Tensor& maps, int64_t height, int64_t width,
                              double scale, at::IntArrayRef volume_shape) {
  checks::check_radon_backward(at::kCPU, grad, maps, height, width, volume_shape);
  const at::Tensor g = grad.contiguous(), m = maps.contiguous();
  const int64_t B = g.size(0), C = g.size(1), N = g.size(2), S = g.size(3);
  const int64_t D = volume_shape[0], H = volume_shape[1], W = volume_shape[2];
  at::Tensor out = at::zeros({B, C, D, H, W}, g.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "tonno_fast::radon_backward", [&] {
    using T = scalar_t;
    const T* gp = g.const_data_ptr<T>();
    const T sc = static_cast<T>(scale);
    // Every pixel of plane (n, k) carries scale * grad[b, c, n, k].
    scatter_slices<T>(
        out.mutable_data_ptr<T>(), D, H, W, m.const_data_ptr<T>(), N, S, height, width, B * C,
        [&](int64_t n, int64_t q, int64_t k, int64_t, int64_t) { return sc * gp[(q * N + n) * S + k]; });
  });
  return out;
}

}  // namespace

TONNO_FAST_KERNELS(CPU, radon, radon_cpu, radon_backward_cpu)

}  // namespace cpu
}  // namespace tonno_fast
