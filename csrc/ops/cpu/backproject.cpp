// CPU kernels of tonno_fast::backproject and its adjoint tonno_fast::backproject_backward.
//
//   backproject: sinogram (B,K,N,S), maps (N,3,4) (volume maps; only row 0, the continuous slice index t, is
//     used), weights (N,) -> (B,K,D,H,W):
//     out[b,k,d,h,w] = sum_n weights[n] * lerp(sinogram[b,k,n,:], t_n(d,h,w)),  t_n = maps[n,0] @ (d,h,w,1),
//     taps outside [0, S-1] read zero.
//   backproject_backward: grad (B,K,D,H,W) -> (B,K,N,S), the exact adjoint.
#include <type_traits>

#include "common.h"
#include "simd.h"

namespace tonno_fast {
namespace cpu {
namespace {

// Zero-padded rows (maths::padded_tap): row r of the sinogram at values[r * P + 1 ...], zeros around, and
// the differences to the next value, diffs[r * P + m] = values[r * P + m + 1] - values[r * P + m] (zero past
// the row; the vector path reads these, the portable path subtracts itself, with the same result). The
// stride P = S + 9 leaves room for the vector path's windows of 8 values from a lower tap <= S + 1. BK*N*P
// values each: small, they stay in L1/L2.
constexpr int64_t kRowPadding = 9;

template <typename T>
struct PaddedRows {
  std::vector<T> values, diffs;
  PaddedRows(const T* sino, int64_t rows, int64_t S) : values(rows * (S + kRowPadding), T(0)), diffs(values.size()) {
    const int64_t P = S + kRowPadding;
    for (int64_t r = 0; r < rows; ++r) {
      T* v = values.data() + r * P;
      std::copy(sino + r * S, sino + (r + 1) * S, v + 1);
      for (int64_t m = 0; m + 1 < P; ++m) diffs[r * P + m] = v[m + 1] - v[m];
      diffs[r * P + P - 1] = T(0);
    }
  }
};

// Portable path: columns [x0, x1) of voxel row (d, h) of one output array, acc[x - x0] += the N directions'
// contributions, in direction order (values: the array's N padded rows). t = maps[n,0] @ (d,h,x,1) steps by
// maps[n,0,2] along the row; GCC vectorises the loop over x (two gathers per update).
template <typename T>
void backproject_row(const T* values, const T* maps, const T* weights, int64_t N, int64_t S, int64_t d, int64_t h,
                     int32_t x0, int32_t x1, T* __restrict acc) {
  const int64_t P = S + kRowPadding;
  for (int64_t n = 0; n < N; ++n) {
    const T* r = maps + 12 * n;  // row 0 of maps[n]
    const T t0 = maths::apply_row(r, T(d), T(h), T(0)), dt = r[2], wn = weights[n];
    const T* __restrict row = values + n * P;
#pragma omp simd
    for (int32_t x = x0; x < x1; ++x) acc[x - x0] += wn * maths::lerp_zero_padded(row, S, t0 + T(x) * dt);
  }
}

#if TF_SIMD_AVX2
// Vector path (float32): blocks of 4 columns x 2 rows (h, h + 1), one block per 8-lane vector, summed over
// the N directions in registers. u = t + 1 is affine in the column and the row, so within a block it spans
// 3|dt_w| + |dt_h| (dt_w = maps[n,0,2], dt_h = maps[n,0,1]; at most sqrt(10) for steps of at most one
// slice per voxel) and the eight lower taps lie in a window of 8 consecutive values that starts at the tap
// of the block's smallest u: one load and one permute each for the values and their differences
// (window_gather) instead of two gathers. The window starts are computed for all blocks of a direction
// before the accumulation, eight blocks per vector, and the clamp of padded_tap_shifted is skipped for the
// directions whose u stays within [0, S + 1] on the row pair (the usual case: slices that cover the volume).
// Directions whose window could be wider than 8 (3|dt_w| + |dt_h| > 6, or NaN) gather.
struct PairDirection {
  simd::F32x8 u0;        // u at column 0 of rows h (lanes 0-3) and h + 1 (lanes 4-7)
  simd::F32x8 du, w;     // u step per column, weight
  const float* values;   // padded row
  const float* diffs;    // its differences
  const int32_t* start;  // window start of every block
  bool clamp;            // some u of the row pair lies outside [0, S + 1] (or is NaN)
  bool window;           // the taps of a block fit in a window of 8
};

// u of the block's lanes: the single rounding of fmadd makes the window starts (computed from the same
// operands) the exact lower taps of the smallest lanes.
inline simd::F32x8 block_u(simd::F32x8 col, const PairDirection& b) { return simd::fmadd(col, b.du, b.u0); }

template <bool kClamp>
inline void block_tap(simd::F32x8 u, int64_t S, simd::I32x8& i, simd::F32x8& f) {
  if constexpr (kClamp) {
    maths::padded_tap_shifted(u, S, i, f);
  } else {
    i = simd::to_int32(u);  // u >= 0: truncation is floor
    f = u - simd::F32x8(i);
  }
}

// acc[g] += w * lerp over the G blocks starting at block k0, for one direction.
template <int G, bool kClamp, bool kWindow>
inline void accumulate_blocks(const PairDirection& b, int64_t S, int32_t k0, const simd::F32x8* col,
                              simd::F32x8* acc) {
  for (int g = 0; g < G; ++g) {
    simd::I32x8 i;
    simd::F32x8 f, v, dv;
    block_tap<kClamp>(block_u(col[g], b), S, i, f);
    if constexpr (kWindow) {
      const int32_t m = b.start[k0 + g];
      const simd::I32x8 l = i - simd::I32x8(m);
      v = simd::window_gather(b.values, m, l);
      dv = simd::window_gather(b.diffs, m, l);
    } else {
      v = simd::gather(b.values, i);
      dv = simd::gather(b.diffs, i);
    }
    acc[g] = acc[g] + b.w * maths::lerp_difference(v, dv, f);
  }
}

// Blocks k0 .. k0 + G - 1 (columns 4*k0 ...) of the row pair: G registers of sums (4 is the most that fits
// in the 16 AVX2 registers with their columns).
template <int G>
inline void backproject_blocks(const PairDirection* dirs, int64_t N, int64_t S, int32_t k0, float* out0,
                               float* out1) {
  simd::F32x8 acc[G], col[G];
  for (int g = 0; g < G; ++g) {
    acc[g] = simd::F32x8(0.f);
    col[g] = simd::F32x8(float(4 * (k0 + g))) + simd::columns4x2();
  }
  for (int64_t n = 0; n < N; ++n) {
    const PairDirection& b = dirs[n];
    if (!b.window) {
      accumulate_blocks<G, true, false>(b, S, k0, col, acc);
    } else if (b.clamp) {
      accumulate_blocks<G, true, true>(b, S, k0, col, acc);
    } else {
      accumulate_blocks<G, false, true>(b, S, k0, col, acc);
    }
  }
  for (int g = 0; g < G; ++g) acc[g].store_halves(out0 + 4 * (k0 + g), out1 + 4 * (k0 + g));
}

// Columns [0, 4 * (W / 4)) of rows h and h + 1 (out0, out1) of one output array.
inline void backproject_row_pair(const float* values, const float* diffs, const float* maps, const float* weights,
                                 int64_t N, int64_t S, int64_t d, int64_t h, int64_t W, float* out0, float* out1) {
  const int32_t blocks = static_cast<int32_t>(W / 4), stride = (blocks + 7) / 8 * 8;
  const int64_t P = S + kRowPadding;
  thread_local std::vector<PairDirection> dirs;
  thread_local std::vector<int32_t> starts;
  dirs.resize(N);
  starts.resize(N * stride);
  for (int64_t n = 0; n < N; ++n) {
    const float* r = maps + 12 * n;
    const float ua = maths::apply_row(r, float(d), float(h), 0.f) + 1.f;
    const float ub = maths::apply_row(r, float(d), float(h + 1), 0.f) + 1.f;
    PairDirection& b = dirs[n];
    b.u0 = simd::rows4x2(ua, ub);
    b.du = simd::F32x8(r[2]);
    b.w = simd::F32x8(weights[n]);
    b.values = values + n * P;
    b.diffs = diffs + n * P;
    b.start = starts.data() + n * stride;
    b.window = 3.f * std::fabs(r[2]) + std::fabs(r[1]) <= 6.f;  // false for NaN
    // u is monotone in the column and the row, so its extremes over the blocks are at the corner lanes
    // (computed as the lanes compute them), and the smallest lane of every block is the same one.
    const float last = float(4 * blocks - 1);
    const float corner[4] = {ua, ub, std::fma(last, r[2], ua), std::fma(last, r[2], ub)};
    b.clamp = false;
    for (const float c : corner) b.clamp = b.clamp || !(c >= 0.f && c <= float(S + 1));
    const float first_col = r[2] < 0.f ? 3.f : 0.f, first_u0 = r[1] < 0.f ? ub : ua;
    for (int32_t k = 0; k < blocks; k += 8) {
      const simd::F32x8 col(_mm256_setr_ps(0.f, 4.f, 8.f, 12.f, 16.f, 20.f, 24.f, 28.f));
      const simd::F32x8 u = simd::fmadd(simd::F32x8(float(4 * k) + first_col) + col, b.du, simd::F32x8(first_u0));
      simd::I32x8 i;
      simd::F32x8 f;
      if (b.clamp) {
        block_tap<true>(u, S, i, f);
      } else {
        block_tap<false>(u, S, i, f);
      }
      i.store(starts.data() + n * stride + k);
    }
  }
  int32_t k = 0;
  for (; k + 4 <= blocks; k += 4) backproject_blocks<4>(dirs.data(), N, S, k, out0, out1);
  for (; k < blocks; ++k) backproject_blocks<1>(dirs.data(), N, S, k, out0, out1);
}
#endif  // TF_SIMD_AVX2

template <typename T>
void backproject_kernel(const T* sino, const T* maps, const T* weights, int64_t BK, int64_t N, int64_t S,
                        int64_t D, int64_t H, int64_t W, T* out) {
  const int64_t P = S + kRowPadding, DHW = D * H * W, pairs = (H + 1) / 2;
  const PaddedRows<T> padded(sino, BK * N, S);
  // One task per pair of voxel rows (d, h), (d, h + 1): every output element is written once, by one task,
  // and summed over the directions in the same order whatever the thread count.
  parallel_for_dynamic(D * pairs, [&](int64_t task) {
    const int64_t d = task / pairs, h = 2 * (task % pairs), rows = std::min<int64_t>(2, H - h);
    std::vector<T> acc(W);
    for (int64_t q = 0; q < BK; ++q) {
      const T* values = padded.values.data() + q * N * P;
      T* o = out + q * DHW + (d * H + h) * W;
      int64_t done = 0;  // columns written by the vector path
#if TF_SIMD_AVX2
      if constexpr (std::is_same_v<T, float>) {
        if (rows == 2 && W >= 4) {
          backproject_row_pair(values, padded.diffs.data() + q * N * P, maps, weights, N, S, d, h, W, o, o + W);
          done = W / 4 * 4;
        }
      }
#endif
      for (int64_t r = 0; r < rows && done < W; ++r) {
        std::fill(acc.begin(), acc.end(), T(0));
        backproject_row<T>(values, maps, weights, N, S, d, h + r, static_cast<int32_t>(done), static_cast<int32_t>(W),
                           acc.data());
        std::copy(acc.begin(), acc.begin() + (W - done), o + r * W + done);
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
