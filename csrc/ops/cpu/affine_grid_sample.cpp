// CPU kernels of tonno_fast::affine_sample and tonno_fast::affine_sample_backward, on which
// tonno_fast::affine_grid_sample is built (tonno_fast/ops/native.py folds its theta into the maps).
//
//   affine_sample(volume (N,C,D,H,W), maps (N,3,4), size [N,C,Do,Ho,Wo]) -> (N,C,Do,Ho,Wo): output point
//     (d,h,w) of batch item n reads volume[n] at the index M[n] @ (d,h,w,1), trilinear, zero padding; sampled
//     like slice_volume.
//   affine_sample_backward -> (volume gradient: the slice_volume adjoint scatter; map gradient dL/dM (N,3,4),
//     float64, computed with maths::trilinear_with_grad).
#include "common.h"

namespace tonno_fast {
namespace cpu {
namespace {

template <typename T>
void affine_sample_kernel(const T* vol, const T* maps, int64_t N, int64_t C, int64_t D, int64_t H, int64_t W,
                          int64_t Do, int64_t Ho, int64_t Wo, T* out) {
  const int64_t DHW = D * H * W, O = Do * Ho * Wo;
  parallel_for_dynamic(N * Do, [&](int64_t nd) {
    const int64_t n = nd / Do, d = nd % Do;
    const T* M = maps + 12 * n;
    for (int64_t hh = 0; hh < Ho; ++hh) {
      T x[3], step[3];
      map_row(M, T(d), T(hh), x, step);
      sample_row<T, T>(vol + n * C * DHW, D, H, W, 1, 0, 0, C, DHW, O, x, step, Wo, T(0),
                       out + n * C * O + (d * Ho + hh) * Wo);
    }
  });
}

// dL/dM[n] (3x4) = sum over output points p and channels c of grad[n,c,p] * d trilinear / d x_a * (p, 1).
// One task per (n, d) plane writes its own 12 partial sums; they are added in plane order afterwards, so
// the result does not depend on the thread count.
template <typename T>
void affine_map_grad_kernel(const T* grad, const T* vol, const T* maps, int64_t N, int64_t C, int64_t D, int64_t H,
                            int64_t W, int64_t Do, int64_t Ho, int64_t Wo, double* partial /* (N*Do, 12) */) {
  using Acc = at::acc_type<T, /*is_cuda=*/false>;
  const int64_t DHW = D * H * W, O = Do * Ho * Wo;
  parallel_for_dynamic(N * Do, [&](int64_t nd) {
    const int64_t n = nd / Do, d = nd % Do;
    const T* M = maps + 12 * n;
    Acc s[3][4] = {};
    for (int64_t hh = 0; hh < Ho; ++hh) {
      T x[3], step[3];
      map_row(M, T(d), T(hh), x, step);
      const T* g = grad + n * C * O + (d * Ho + hh) * Wo;  // grad[n, 0, d, hh, :]
      const T* v = vol + n * C * DHW;
      // s[a][:] += (sum_c grad * d trilinear / d x_a) * (d, hh, j, 1) at output point (d, hh, j).
      const auto add = [&](int64_t j, const Acc gx[3]) {
        const Acc col[4] = {Acc(d), Acc(hh), Acc(j), Acc(1)};
        for (int a = 0; a < 3; ++a)
          for (int k = 0; k < 4; ++k) s[a][k] += gx[a] * col[k];
      };
      const RowPlan r = plan_row(x, step, D, H, W, Wo);  // points outside [j0, j1) have zero gradient
      if (r.k1 > r.k0) {  // interior: all corners valid
        const InteriorTaps<T>& it = interior_taps(x, step, D, H, W, r.k0, r.k1);
        const int32_t s0 = static_cast<int32_t>(H * W), s1 = static_cast<int32_t>(W);
        for (int64_t j = r.k0; j < r.k1; ++j) {
          const int64_t e = j - r.k0;
          Acc gx[3] = {Acc(0), Acc(0), Acc(0)};
          for (int64_t c = 0; c < C; ++c) {
            T g0, g1, g2;
            maths::trilinear_interior_with_grad<T, T, int32_t>(v + c * DHW, it.off[e], s0, s1, it.f0[e], it.f1[e],
                                                               it.f2[e], g0, g1, g2);
            const Acc gc = Acc(g[c * O + j]);
            gx[0] += gc * Acc(g0);
            gx[1] += gc * Acc(g1);
            gx[2] += gc * Acc(g2);
          }
          add(j, gx);
        }
      }
      const auto edge = [&](int64_t ja, int64_t jb) {  // near the faces: per-tap validity
        for (int64_t j = ja; j < jb; ++j) {
          const T p[3] = {x[0] + T(j) * step[0], x[1] + T(j) * step[1], x[2] + T(j) * step[2]};
          Acc gx[3] = {Acc(0), Acc(0), Acc(0)};
          for (int64_t c = 0; c < C; ++c) {
            T g0, g1, g2;
            maths::trilinear_with_grad<T, T>(v + c * DHW, D, H, W, H * W, W, 1, p[0], p[1], p[2], g0, g1, g2);
            const Acc gc = Acc(g[c * O + j]);
            gx[0] += gc * Acc(g0);
            gx[1] += gc * Acc(g1);
            gx[2] += gc * Acc(g2);
          }
          add(j, gx);
        }
      };
      edge(r.j0, r.k0);
      edge(r.k1, r.j1);
    }
    for (int a = 0; a < 3; ++a)
      for (int k = 0; k < 4; ++k) partial[nd * 12 + a * 4 + k] = static_cast<double>(s[a][k]);
  });
}

at::Tensor affine_sample_cpu(const at::Tensor& volume, const at::Tensor& maps_in, at::IntArrayRef size) {
  checks::check_affine_sample(at::kCPU, volume, maps_in, size);
  const at::Tensor vol = volume.contiguous(), maps = maps_in.contiguous();
  const int64_t N = vol.size(0), C = vol.size(1);
  at::Tensor out = at::empty({N, C, size[2], size[3], size[4]}, vol.options());
  AT_DISPATCH_FLOATING_TYPES(vol.scalar_type(), "tonno_fast::affine_sample", [&] {
    affine_sample_kernel<scalar_t>(vol.const_data_ptr<scalar_t>(), maps.const_data_ptr<scalar_t>(), N, C,
                                   vol.size(2), vol.size(3), vol.size(4), size[2], size[3], size[4],
                                   out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> affine_sample_backward_cpu(const at::Tensor& grad, const at::Tensor& volume,
                                                              const at::Tensor& maps_in, bool volume_grad,
                                                              bool maps_grad) {
  checks::check_affine_sample_backward(at::kCPU, grad, volume, maps_in);
  const at::Tensor g = grad.contiguous(), vol = volume.contiguous(), maps = maps_in.contiguous();
  const int64_t N = vol.size(0), C = vol.size(1), D = vol.size(2), H = vol.size(3), W = vol.size(4);
  const int64_t Do = g.size(2), Ho = g.size(3), Wo = g.size(4);
  // A gradient not asked for is an empty tensor.
  at::Tensor gvol = at::empty({0}, vol.options()), gmaps = at::empty({0}, vol.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(vol.scalar_type(), "tonno_fast::affine_sample_backward", [&] {
    using T = scalar_t;
    const T* gp = g.const_data_ptr<T>();
    const int64_t O = Do * Ho * Wo;
    if (volume_grad) {
      gvol = at::zeros_like(vol);
      // Job n scatters output n into the C arrays of volume n.
      scatter_grid<T>(
          gvol.mutable_data_ptr<T>(), D, H, W, N, maps.const_data_ptr<T>(), Do, Ho, Wo, C,
          [&](int64_t n) { return n * C; },
          [&](int64_t n, int64_t c, int64_t a, int64_t b, int64_t k) { return gp[(n * C + c) * O + (a * Ho + b) * Wo + k]; });
    }
    if (maps_grad) {
      at::Tensor partial = at::empty({N, Do, 3, 4}, vol.options().dtype(at::kDouble));
      affine_map_grad_kernel<T>(gp, vol.const_data_ptr<T>(), maps.const_data_ptr<T>(), N, C, D, H, W, Do, Ho, Wo,
                                partial.mutable_data_ptr<double>());
      // Sum the plane partials in plane order (not at::sum, whose order may depend on the thread count).
      gmaps = at::zeros({N, 3, 4}, partial.options());
      const double* pp = partial.const_data_ptr<double>();
      double* gm = gmaps.mutable_data_ptr<double>();
      for (int64_t n = 0; n < N; ++n)
        for (int64_t d = 0; d < Do; ++d)
          for (int64_t e = 0; e < 12; ++e) gm[n * 12 + e] += pp[(n * Do + d) * 12 + e];
    }
  });
  return {gvol, gmaps};
}

}  // namespace

TONNO_FAST_KERNELS(CPU, affine_sample, affine_sample_cpu, affine_sample_backward_cpu)

}  // namespace cpu
}  // namespace tonno_fast
