// CPU kernels of tonno_fast::backproject_slices and its adjoint tonno_fast::backproject_slices_backward.
//
//   backproject_slices: stacks (B,K,N,S,h,w), maps (N,3,4) (volume maps), weights (N,) -> (B,K,D,H,W):
//     out[b,k,d,h,w] = sum_n weights[n] * trilinear(stacks[b,k,n], maps[n] @ (d,h,w,1)),
//     corners outside the stack read zero.
//   backproject_slices_backward: grad (B,K,D,H,W) -> (B,K,N,S,h,w), the exact adjoint.
#include "common.h"

namespace tonno_fast {
namespace cpu {
namespace {

template <typename T>
void backproject_slices_kernel(const T* stacks, const T* maps, const T* weights, int64_t BK, int64_t N, int64_t S,
                               int64_t h, int64_t w, int64_t D, int64_t H, int64_t W, T* out) {
  const int64_t Shw = S * h * w, DHW = D * H * W;
  // One task per slab of kSlab voxel planes; within it, directions outermost: for n in order, for every
  // row (d, h) of the slab, out[q, d, h, :] += weights[n] * trilinear(stacks[q, n], x(v)) (q = b*K + k).
  // Each voxel receives its N contributions in direction order, whatever the thread count (deterministic).
  // A slab reads one stack at a time, the oblique part of it that the slab maps to, and its planes share
  // most corners: they stay in cache. With the directions inside each voxel row (the order before), every
  // row visited all N stacks (N*S*h*w values, far more than the caches) and missed on almost every
  // corner. Measured per core (64 stacks of 111 x 64² into 64³): directions inside the row 0.58 s, one
  // task per plane 0.64 s (a plane alone has little reuse), directions outermost over the whole volume
  // 0.17 s (but one parallel loop per direction: N barriers, which stall two threads on a loaded machine).
  constexpr int64_t kSlab = 8;
  parallel_for_dynamic((D + kSlab - 1) / kSlab, [&](int64_t slab) {
    const int64_t d0 = slab * kSlab, d1 = std::min(D, d0 + kSlab);
    for (int64_t q = 0; q < BK; ++q) std::fill(out + q * DHW + d0 * H * W, out + q * DHW + d1 * H * W, T(0));
    for (int64_t n = 0; n < N; ++n) {
      const T* M = maps + 12 * n;
      for (int64_t dh = d0 * H; dh < d1 * H; ++dh) {
        T x[3], step[3];
        map_row(M, T(dh / H), T(dh % H), x, step);
        accumulate_row<T>(stacks + n * Shw, S, h, w, BK, N * Shw, x, step, W, weights[n], out + dh * W, DHW);
      }
    }
  });
}

template <typename T>
void backproject_slices_backward_kernel(const T* grad, const T* maps, const T* weights, int64_t BK, int64_t N,
                                        int64_t S, int64_t h, int64_t w, int64_t D, int64_t H, int64_t W, T* out) {
  const int64_t DHW = D * H * W, Shw = S * h * w, hw = h * w;
  // One task per direction n: it owns stacks n of every (b, k) (race-free) and visits the voxels in a fixed
  // order (deterministic whatever the thread count). It zeroes its own stacks first (out comes from
  // at::empty): the first touch of the fresh pages is spread over the threads and the stack is then warm
  // in cache for the scatter.
  parallel_for_dynamic(N, [&](int64_t n) {
    for (int64_t q = 0; q < BK; ++q) std::fill(out + (q * N + n) * Shw, out + (q * N + n + 1) * Shw, T(0));
    const T* M = maps + 12 * n;
    const T wn = weights[n];
    for (int64_t dh = 0; dh < D * H; ++dh) {
      const int64_t d = dh / H, hh = dh % H;
      T x[3], step[3];
      map_row(M, T(d), T(hh), x, step);
      // Scatter g = weights[n] * grad[q, voxel] into the eight corners of the voxel's point in stack n.
      const auto scatter = [&](int64_t v, const int64_t o0[2], const int64_t o1[2], const int64_t o2[2],
                               const T w0[2], const T w1[2], const T w2[2]) {
        for (int64_t q = 0; q < BK; ++q) {
          const T g = wn * grad[q * DHW + dh * W + v];
          T* o = out + (q * N + n) * Shw;
          for (int a = 0; a < 2; ++a) {
            const T ga = g * w0[a];
            for (int b = 0; b < 2; ++b) {
              const T gb = ga * w1[b];
              o[o0[a] + o1[b] + o2[0]] += gb * w2[0];
              o[o0[a] + o1[b] + o2[1]] += gb * w2[1];
            }
          }
        }
      };
      const RowPlan r = plan_row(x, step, S, h, w, W);
      // Interior voxels (all corners valid): taps from the vectorised fast path.
      if (r.k1 > r.k0) {
        const InteriorTaps<T>& it = interior_taps(x, step, S, h, w, r.k0, r.k1);
        for (int64_t v = r.k0; v < r.k1; ++v) {
          const int64_t e = v - r.k0, base = it.off[e];
          const int64_t o0[2] = {base, base + hw}, o1[2] = {0, w}, o2[2] = {0, 1};
          const T w0[2] = {T(1) - it.f0[e], it.f0[e]}, w1[2] = {T(1) - it.f1[e], it.f1[e]},
                  w2[2] = {T(1) - it.f2[e], it.f2[e]};
          scatter(v, o0, o1, o2, w0, w1, w2);
        }
      }
      // Edge voxels: per-tap validity (maths::linear_taps).
      const auto edge = [&](int64_t va, int64_t vb) {
        for (int64_t v = va; v < vb; ++v) {
          Taps<T> t0, t1, t2;
          if (!line_taps3(x, step, v, S, h, w, t0, t1, t2)) continue;
          const int64_t o0[2] = {t0.i0 * hw, t0.i1 * hw}, o1[2] = {t1.i0 * w, t1.i1 * w}, o2[2] = {t2.i0, t2.i1};
          const T w0[2] = {t0.w0, t0.w1}, w1[2] = {t1.w0, t1.w1}, w2[2] = {t2.w0, t2.w1};
          scatter(v, o0, o1, o2, w0, w1, w2);
        }
      };
      edge(r.j0, r.k0);
      edge(r.k1, r.j1);
    }
  });
}

at::Tensor backproject_slices_cpu(const at::Tensor& stacks, const at::Tensor& maps, const at::Tensor& weights,
                                  at::IntArrayRef volume_shape) {
  checks::check_backproject(at::kCPU, stacks, "stacks", 6, "(B, K, N, S, h, w)", maps, weights, volume_shape);
  const at::Tensor s = stacks.contiguous(), m = maps.contiguous(), w = weights.contiguous();
  const int64_t B = s.size(0), K = s.size(1), N = s.size(2);
  const int64_t D = volume_shape[0], H = volume_shape[1], W = volume_shape[2];
  at::Tensor out = at::empty({B, K, D, H, W}, s.options());
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "tonno_fast::backproject_slices", [&] {
    backproject_slices_kernel<scalar_t>(s.const_data_ptr<scalar_t>(), m.const_data_ptr<scalar_t>(),
                                        w.const_data_ptr<scalar_t>(), B * K, N, s.size(3), s.size(4), s.size(5),
                                        D, H, W, out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor backproject_slices_backward_cpu(const at::Tensor& grad, const at::Tensor& maps, const at::Tensor& weights,
                                           at::IntArrayRef stack_shape) {
  const int64_t N = checks::check_backproject_backward(at::kCPU, grad, maps, weights);
  const auto st = checks::check_shape3(stack_shape, "stack_shape", "(S, h, w)");
  const at::Tensor g = grad.contiguous(), m = maps.contiguous(), w = weights.contiguous();
  const int64_t B = g.size(0), K = g.size(1);
  at::Tensor out = at::empty({B, K, N, st[0], st[1], st[2]}, g.options());  // zeroed by the kernel
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "tonno_fast::backproject_slices_backward", [&] {
    backproject_slices_backward_kernel<scalar_t>(g.const_data_ptr<scalar_t>(), m.const_data_ptr<scalar_t>(),
                                                 w.const_data_ptr<scalar_t>(), B * K, N, st[0], st[1], st[2],
                                                 g.size(2), g.size(3), g.size(4), out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

TONNO_FAST_KERNELS(CPU, backproject_slices, backproject_slices_cpu, backproject_slices_backward_cpu)

}  // namespace cpu
}  // namespace tonno_fast
