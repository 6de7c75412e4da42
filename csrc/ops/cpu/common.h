// Helpers shared by the CPU kernels of csrc/ops/cpu/*.cpp: the parallel loop and the loop nests every op is
// built from (argument checks: tonno_fast/checks.h, shared with the CUDA kernels):
//  * gathers along rows of points x(j) = x + j*step (sample_row, sum_row, accumulate_row): each row is
//    clipped analytically to the array (samples outside it only read padding), its interior (all eight
//    corners valid) runs a branch-free loop that GCC vectorises with AVX2 gathers, and the few points near
//    the faces take the general path with per-tap validity;
//  * the adjoint scatter of a sampled grid into a volume (scatter_grid), partitioned by output slabs so it
//    is race-free and bitwise deterministic without atomics.
//
// All per-point maths comes from tonno_fast/maths.h (shared with the CUDA kernels).
#pragma once

#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "tonno_fast/checks.h"
#include "tonno_fast/registration.h"
#include "tonno_fast/maths.h"
#include "simd.h"

namespace tonno_fast {
namespace cpu {

using maths::Taps;

// ---------------------------------------------------------------------------------------------------------
// Parallel loop over [0, n) with dynamic scheduling (work per item varies a lot: planes near the edge of the
// bounding sphere hold few samples). Uses PyTorch's intra-op thread count so torch.set_num_threads applies;
// runs serially when already inside a parallel region. f must not throw.
template <typename F>
inline void parallel_for_dynamic(int64_t n, const F& f) {
#ifdef _OPENMP
  const int64_t nt = at::in_parallel_region() ? 1 : std::min<int64_t>(at::get_num_threads(), n);
#pragma omp parallel for schedule(dynamic, 1) num_threads(static_cast<int>(nt)) if (nt > 1)
  for (int64_t i = 0; i < n; ++i) f(i);
#else
  for (int64_t i = 0; i < n; ++i) f(i);
#endif
}

// Gathers into a volume, one task per voxel row (d, h) of the (D, H, W) output: f(d, h, acc) adds the row's
// values of the BK output arrays into acc (BK x W, zeroed; it stays in L1 across whatever f loops over),
// which is then stored to out[q, d, h, :] (q in [0, BK), arrays of D*H*W contiguous). Every output element
// is written once, by one task: race-free and deterministic.
template <typename T, typename F>
inline void for_each_voxel_row(int64_t BK, int64_t D, int64_t H, int64_t W, T* out, const F& f) {
  const int64_t DHW = D * H * W;
  parallel_for_dynamic(D * H, [&](int64_t dh) {
    const int64_t d = dh / H, hh = dh % H;
    std::vector<T> acc(BK * W, T(0));
    f(d, hh, acc.data());
    for (int64_t q = 0; q < BK; ++q) std::copy(acc.begin() + q * W, acc.begin() + (q + 1) * W, out + q * DHW + dh * W);
  });
}

// ---------------------------------------------------------------------------------------------------------
// Range [j0, j1) of a line x(j) = x + j*step, j in [0, n), outside which every point lies at or beyond one
// cell outside the (n0, n1, n2) array (so reads only padding): the intersection of the three axes' clips.
template <typename T>
inline void clip_line3(const T x[3], const T step[3], int64_t n0, int64_t n1, int64_t n2, int64_t n,
                       int64_t& j0, int64_t& j1) {
  const int64_t sizes[3] = {n0, n1, n2};
  j0 = 0;
  j1 = n;
  for (int a = 0; a < 3 && j0 < j1; ++a) {
    int64_t f, l;
    maths::clip_range<T>(x[a], x[a], step[a], T(-1), T(sizes[a]), n, f, l);
    j0 = std::max(j0, f);
    j1 = std::min(j1, l);
  }
  if (j1 < j0) j1 = j0;
}

// Trilinear taps of the point x in an (n0, n1, n2) array; false if no corner is valid.
template <typename T>
inline bool taps3(const T x[3], int64_t n0, int64_t n1, int64_t n2, Taps<T>& t0, Taps<T>& t1, Taps<T>& t2) {
  // Evaluate all three (no short circuit) so every tap is initialised.
  const bool a = maths::linear_taps(x[0], n0, t0);
  const bool b = maths::linear_taps(x[1], n1, t1);
  const bool c = maths::linear_taps(x[2], n2, t2);
  return a && b && c;
}

// Taps of the point j of the line x(j) = x + j*step (see taps3); false if no corner is valid.
template <typename T>
inline bool line_taps3(const T x[3], const T step[3], int64_t j, int64_t n0, int64_t n1, int64_t n2, Taps<T>& t0,
                       Taps<T>& t1, Taps<T>& t2) {
  // Written as fused multiply-adds, as interior_taps writes them: the general and the fast path must give a point
  // the same coordinates, bitwise (scatter_grid mixes them by slab, and slabs depend on the thread count).
  const T jj = T(j);
  const T p[3] = {std::fma(jj, step[0], x[0]), std::fma(jj, step[1], x[1]), std::fma(jj, step[2], x[2])};
  return taps3(p, n0, n1, n2, t0, t1, t2);
}

// The row of points M @ (a, b, j, 1), j = 0, 1, ...: its start x = M @ (a, b, 0, 1) and its step M[:, 2]
// (M row-major 3x4). Every kernel walks its sampling grids by such rows (see plan_row below).
//
// x is maths::apply_row with its one ambiguous contraction written out: r[0] a + r[1] b may be fused either
// way (fma(r[1], b, r[0] a) or fma(r[0], a, r[1] b)), and GCC picked per axis and per kernel, differently
// after unrelated edits (slice_volume's float32 samples moved by up to 1.5e-5 when only its corner fetch
// changed). Fused explicitly, the rounding of the row start, hence of every sample, no longer depends on the
// surrounding code, so a kernel change can be checked bitwise against the previous build. The c = 0 term
// stays, so non-finite map entries give non-finite points as in apply_row.
template <typename T>
inline void map_row(const T* M, T a, T b, T x[3], T step[3]) {
  using std::fma;
  for (int ax = 0; ax < 3; ++ax) {
    const T* r = M + 4 * ax;
    x[ax] = fma(r[2], T(0), fma(r[1], b, r[0] * a)) + r[3];
    step[ax] = r[2];
  }
}

// NOTE: walking slices in column tiles of 32 (to keep the voxels of consecutive rows in L1) was measured
// slower (slice_volume 0.178 -> 0.149 G samples/s per core, radon 0.83 -> 0.50): the per-row set-up
// (plan_row, taps) costs more than the cache misses it saves. Measured again with the row plans cached per
// band (benchmarks/RESULTS.md, item 23): tiles of 16-64 pixels 1.1-1.8x slower. Rows are walked whole.

// ---------------------------------------------------------------------------------------------------------
// Row plans. A row of points x(j) = x + j*step, j in [0, n), splits into: points outside [j0, j1) (they read
// only padding), the interior [k0, k1) (all eight corners valid: branch-free, vectorised fast path) and the
// edges in between (general path with per-tap validity, maths::linear_taps).
struct RowPlan {
  int64_t j0, j1, k0, k1;
};

template <typename T>
inline RowPlan plan_row(const T x[3], const T step[3], int64_t n0, int64_t n1, int64_t n2, int64_t n) {
  RowPlan r;
  clip_line3(x, step, n0, n1, n2, n, r.j0, r.j1);
  const int64_t sizes[3] = {n0, n1, n2};
  r.k0 = r.j0;
  r.k1 = r.j1;
  for (int a = 0; a < 3; ++a) {
    int64_t f = 0, l = 0;
    if (sizes[a] >= 2) maths::inner_range<T>(x[a], step[a], T(0), T(sizes[a] - 1), n, f, l);
    r.k0 = std::max(r.k0, f);
    r.k1 = std::min(r.k1, l);
  }
  // Flat int32 offsets in the fast path: arrays of 2^31 elements or more take the general path.
  if (r.k1 <= r.k0 || n0 * n1 * n2 >= (int64_t(1) << 31)) r.k0 = r.k1 = r.j0;
  return r;
}

// Per-thread scratch of the fast path: lower-corner offsets and fractions of the interior points of a row.
template <typename T>
struct InteriorTaps {
  std::vector<int32_t> off;
  std::vector<T> f0, f1, f2;
};

// Fill `it` with the interior points [k0, k1) of the row (vectorised: no branches, no gathers).
template <typename T>
inline InteriorTaps<T>& interior_taps(const T x[3], const T step[3], int64_t n0, int64_t n1, int64_t n2,
                                      int64_t k0, int64_t k1) {
  thread_local InteriorTaps<T> it;
  const int64_t m = k1 - k0;
  if (static_cast<int64_t>(it.off.size()) < m) {
    it.off.resize(m);
    it.f0.resize(m);
    it.f1.resize(m);
    it.f2.resize(m);
  }
  int32_t* __restrict off = it.off.data();
  T* __restrict g0 = it.f0.data();
  T* __restrict g1 = it.f1.data();
  T* __restrict g2 = it.f2.data();
  const int32_t s0 = static_cast<int32_t>(n1 * n2), s1 = static_cast<int32_t>(n2);
  const int32_t top0 = static_cast<int32_t>(n0 - 2), top1 = static_cast<int32_t>(n1 - 2),
                top2 = static_cast<int32_t>(n2 - 2);
  const T x0 = x[0], x1 = x[1], x2 = x[2], d0 = step[0], d1 = step[1], d2 = step[2];
  const int32_t jbase = static_cast<int32_t>(k0);
  // int32 loop counter converted to T: AVX2 has no vector int64 -> float conversion (GCC would not vectorise).
#pragma omp simd
  for (int32_t j = 0; j < static_cast<int32_t>(m); ++j) {
    const T jj = T(jbase + j);
    const T p0 = std::fma(jj, d0, x0), p1 = std::fma(jj, d1, x1), p2 = std::fma(jj, d2, x2);  // as line_taps3
    const int32_t i0 = maths::interior_floor(p0, top0), i1 = maths::interior_floor(p1, top1),
                  i2 = maths::interior_floor(p2, top2);
    g0[j] = p0 - T(i0);
    g1[j] = p1 - T(i1);
    g2[j] = p2 - T(i2);
    off[j] = i0 * s0 + i1 * s1 + i2;
  }
  return it;
}

#if TF_SIMD_AVX2
// Interior points [0, 8 * (m / 8)) of a float32 row (interior_taps): put(j, t) for j = 0, 8, 16, ..., with t the
// eight values trilinear_interior(v, off[j + l], ...), l = 0..7, their corners read as four pairs of adjacent
// values along the last axis (simd::load_pairs: 64-bit loads instead of gathers), by the same expression
// (maths::trilinear_corners), lane by lane, as the scalar loops. Returns the number of points done.
template <typename Put>
inline int32_t interior_pairs(const float* v, const int32_t* off, int32_t s0, int32_t s1, const float* f0,
                              const float* f1, const float* f2, int32_t m, const Put& put) {
  using simd::F32x8;
  int32_t j = 0;
  for (; j + 8 <= m; j += 8) {
    F32x8 v000, v001, v010, v011, v100, v101, v110, v111;
    simd::load_pairs(v, off + j, v000, v001);
    simd::load_pairs(v + s1, off + j, v010, v011);
    simd::load_pairs(v + s0, off + j, v100, v101);
    simd::load_pairs(v + s0 + s1, off + j, v110, v111);
    put(j, maths::trilinear_corners(v000, v001, v010, v011, v100, v101, v110, v111, F32x8::load(f0 + j),
                                    F32x8::load(f1 + j), F32x8::load(f2 + j)));
  }
  return j;
}
#endif

// ---------------------------------------------------------------------------------------------------------
// Gather: sample one row of points x(j) = x + j*step (j in [0, n)) from nb x nc arrays of shape (D, H, W)
// (contiguous within each array; array (b, c) starts at vol + b*vol_sb + c*vol_sc) and write
//   out[b*out_sb + c*out_sc + j] = sum_valid w * v + fill * (1 - sum_valid w)
// in the output type O. Taps are computed once per point and shared by all arrays.
template <typename T, typename O>
inline void sample_row(const T* vol, int64_t D, int64_t H, int64_t W, int64_t nb, int64_t vol_sb, int64_t out_sb,
                       int64_t nc, int64_t vol_sc, int64_t out_sc, const T x[3], const T step[3], int64_t n,
                       T fill, O* out) {
  const RowPlan r = plan_row(x, step, D, H, W, n);
  const int64_t sD = H * W;
  const O fill_out = static_cast<O>(fill);
  // Interior: every corner valid, inside weight 1, so the fill term vanishes.
  if (r.k1 > r.k0) {
    const InteriorTaps<T>& it = interior_taps(x, step, D, H, W, r.k0, r.k1);
    const int32_t* __restrict off = it.off.data();
    const T* __restrict f0 = it.f0.data();
    const T* __restrict f1 = it.f1.data();
    const T* __restrict f2 = it.f2.data();
    const int32_t m = static_cast<int32_t>(r.k1 - r.k0), s0 = static_cast<int32_t>(sD), s1 = static_cast<int32_t>(W);
    for (int64_t b = 0; b < nb; ++b) {
      for (int64_t c = 0; c < nc; ++c) {
        const T* __restrict v = vol + b * vol_sb + c * vol_sc;
        O* __restrict o = out + b * out_sb + c * out_sc + r.k0;
        int32_t j0 = 0;
#if TF_SIMD_AVX2
        if constexpr (std::is_same_v<T, float> && std::is_same_v<O, float>) {
          j0 = interior_pairs(v, off, s0, s1, f0, f1, f2, m, [o](int32_t j, simd::F32x8 t) { t.store(o + j); });
        }
#endif
#pragma omp simd
        for (int32_t j = j0; j < m; ++j) {
          o[j] = static_cast<O>(maths::trilinear_interior<T, T, int32_t>(v, off[j], s0, s1, f0[j], f1[j], f2[j]));
        }
      }
    }
  }
  for (int64_t b = 0; b < nb; ++b) {
    for (int64_t c = 0; c < nc; ++c) {
      O* o = out + b * out_sb + c * out_sc;
      for (int64_t j = 0; j < r.j0; ++j) o[j] = fill_out;
      for (int64_t j = r.j1; j < n; ++j) o[j] = fill_out;
    }
  }
  // Edges: general path.
  const auto edge = [&](int64_t ja, int64_t jb) {
    for (int64_t j = ja; j < jb; ++j) {
      Taps<T> t0, t1, t2;
      const bool any = line_taps3(x, step, j, D, H, W, t0, t1, t2);
      // Invalid taps have weight 0, so the sum of the weights is the inside weight of maths.h.
      const T outside = any ? fill * (T(1) - (t0.w0 + t0.w1) * (t1.w0 + t1.w1) * (t2.w0 + t2.w1)) : fill;
      for (int64_t b = 0; b < nb; ++b) {
        for (int64_t c = 0; c < nc; ++c) {
          const T v = any ? maths::trilinear_taps<T, T>(vol + b * vol_sb + c * vol_sc, sD, W, 1, t0, t1, t2) : T(0);
          out[b * out_sb + c * out_sc + j] = static_cast<O>(v + outside);
        }
      }
    }
  };
  edge(r.j0, r.k0);
  edge(r.k1, r.j1);
}

// Sum over one row: acc[q] += sum_j trilinear(vol + q*vol_sq, x(j)) for q in [0, nq) (zero padding).
template <typename T, typename Acc>
inline void sum_row(const T* vol, int64_t D, int64_t H, int64_t W, int64_t nq, int64_t vol_sq, const T x[3],
                    const T step[3], int64_t n, Acc* acc) {
  const RowPlan r = plan_row(x, step, D, H, W, n);
  const int64_t sD = H * W;
  if (r.k1 > r.k0) {
    const InteriorTaps<T>& it = interior_taps(x, step, D, H, W, r.k0, r.k1);
    const int32_t* __restrict off = it.off.data();
    const T* __restrict f0 = it.f0.data();
    const T* __restrict f1 = it.f1.data();
    const T* __restrict f2 = it.f2.data();
    const int32_t m = static_cast<int32_t>(r.k1 - r.k0), s0 = static_cast<int32_t>(sD), s1 = static_cast<int32_t>(W);
    for (int64_t q = 0; q < nq; ++q) {
      const T* __restrict v = vol + q * vol_sq;
      T s = T(0);  // a row holds at most a few hundred points: summed in T, then added to Acc
#pragma omp simd reduction(+ : s)
      for (int32_t j = 0; j < m; ++j) s += maths::trilinear_interior<T, T, int32_t>(v, off[j], s0, s1, f0[j], f1[j], f2[j]);
      acc[q] += Acc(s);
    }
  }
  const auto edge = [&](int64_t ja, int64_t jb) {
    for (int64_t j = ja; j < jb; ++j) {
      Taps<T> t0, t1, t2;
      if (!line_taps3(x, step, j, D, H, W, t0, t1, t2)) continue;
      for (int64_t q = 0; q < nq; ++q) acc[q] += Acc(maths::trilinear_taps<T, T>(vol + q * vol_sq, sD, W, 1, t0, t1, t2));
    }
  };
  edge(r.j0, r.k0);
  edge(r.k1, r.j1);
}

// Weighted accumulation over one row: acc[q*acc_sq + j] += weight * trilinear(arr + q*arr_sq, x(j)) for
// q in [0, nq), j in [0, n) (zero padding; points outside the array add nothing).
template <typename T>
inline void accumulate_row(const T* arr, int64_t n0, int64_t n1, int64_t n2, int64_t nq, int64_t arr_sq, const T x[3],
                           const T step[3], int64_t n, T weight, T* acc, int64_t acc_sq) {
  const RowPlan r = plan_row(x, step, n0, n1, n2, n);
  const int64_t s01 = n1 * n2;
  if (r.k1 > r.k0) {
    const InteriorTaps<T>& it = interior_taps(x, step, n0, n1, n2, r.k0, r.k1);
    const int32_t* __restrict off = it.off.data();
    const T* __restrict f0 = it.f0.data();
    const T* __restrict f1 = it.f1.data();
    const T* __restrict f2 = it.f2.data();
    const int32_t m = static_cast<int32_t>(r.k1 - r.k0), s0 = static_cast<int32_t>(s01), s1 = static_cast<int32_t>(n2);
    for (int64_t q = 0; q < nq; ++q) {
      const T* __restrict v = arr + q * arr_sq;
      T* __restrict a = acc + q * acc_sq + r.k0;
      int32_t j0 = 0;
#if TF_SIMD_AVX2
      if constexpr (std::is_same_v<T, float>) {
        const simd::F32x8 wv(weight);
        j0 = interior_pairs(v, off, s0, s1, f0, f1, f2, m, [a, wv](int32_t j, simd::F32x8 t) {
          simd::fmadd(wv, t, simd::F32x8::load(a + j)).store(a + j);  // a[j] + weight * t, fused as GCC fuses it
        });
      }
#endif
#pragma omp simd
      for (int32_t j = j0; j < m; ++j) {
        a[j] += weight * maths::trilinear_interior<T, T, int32_t>(v, off[j], s0, s1, f0[j], f1[j], f2[j]);
      }
    }
  }
  const auto edge = [&](int64_t ja, int64_t jb) {
    for (int64_t j = ja; j < jb; ++j) {
      Taps<T> t0, t1, t2;
      if (!line_taps3(x, step, j, n0, n1, n2, t0, t1, t2)) continue;
      for (int64_t q = 0; q < nq; ++q) {
        acc[q * acc_sq + j] += weight * maths::trilinear_taps<T, T>(arr + q * arr_sq, s01, n2, 1, t0, t1, t2);
      }
    }
  };
  edge(r.j0, r.k0);
  edge(r.k1, r.j1);
}

// ---------------------------------------------------------------------------------------------------------
// Scatter (the adjoint of sampling): for every job (a sampled grid of A x Bn x Cn points
// p = M_job @ (a, b, c, 1), maps row-major 3x4 at maps + 12*job) and every point, add
//   value(job, q, a, b, c) * w_corner
// to the eight trilinear corners of p in the output arrays g = target(job) + q, q in [0, Q), each of shape
// (D, H, W) contiguous, at out + g * D*H*W.
//
// Race-free and deterministic: the output is split into slabs along D and each slab is owned by one
// thread, which visits every (job, a, b, c) in the same fixed order and keeps only the corners inside its
// slab. So every voxel receives its contributions in the same order whatever the number of threads or
// slabs: results are bitwise reproducible. Rows and planes that cannot touch the slab are skipped with
// clip_range; a point straddling two slabs is visited by both (a (T+1)/T overhead for slabs T voxels thick).
template <typename T, typename TargetFn, typename ValueFn>
void scatter_grid(T* out, int64_t D, int64_t H, int64_t W, int64_t n_jobs, const T* maps, int64_t A,
                  int64_t Bn, int64_t Cn, int64_t Q, const TargetFn& target, const ValueFn& value) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // Two slabs per thread (one on a single thread), at least 4 voxels thick. Every slab visits every row that
  // crosses it, and the set-up of a row (clipping, taps) costs more than its few points inside a thin slab:
  // radon's adjoint at 64^3 (2 threads) took 0.30-0.35 s with 4 slabs per thread, 0.23-0.25 s with 2 and
  // 0.18-0.20 s with 1 (benchmarks/RESULTS.md, item 24). Two rather than one so that dynamic scheduling can
  // still even out slabs of unequal work (the middle of a sphere of samples holds more than its caps).
  const int64_t per_thread = threads > 1 ? 2 : 1;
  const int64_t thick = std::max<int64_t>(4, (D + per_thread * threads - 1) / (per_thread * threads));
  const int64_t n_slabs = (D + thick - 1) / thick;
  const int64_t DHW = D * H * W, HW = H * W;
  parallel_for_dynamic(n_slabs, [&](int64_t slab) {
    const int64_t dlo = slab * thick, dhi = std::min(D, dlo + thick);
    const T lo[3] = {T(dlo - 1), T(-1), T(-1)}, hi[3] = {T(dhi), T(H), T(W)};
    for (int64_t job = 0; job < n_jobs; ++job) {
      const T* M = maps + 12 * job;
      T* base_out = out + target(job) * DHW;
      for (int64_t a = 0; a < A; ++a) {
        // Plane a: x(b, c) = M[:,0] a + M[:,1] b + M[:,2] c + M[:,3].
        int64_t b0 = 0, b1 = Bn;
        T rowx[3];
        for (int ax = 0; ax < 3; ++ax) {
          const T* r = M + 4 * ax;
          rowx[ax] = r[0] * T(a) + r[3];
          const T span = r[2] * T(Cn - 1);
          int64_t f, l;
          maths::clip_range<T>(rowx[ax] + std::min(T(0), span), rowx[ax] + std::max(T(0), span), r[1], lo[ax],
                               hi[ax], Bn, f, l);
          b0 = std::max(b0, f);
          b1 = std::min(b1, l);
        }
        for (int64_t b = b0; b < b1; ++b) {
          const T x[3] = {rowx[0] + M[1] * T(b), rowx[1] + M[5] * T(b), rowx[2] + M[9] * T(b)};
          const T step[3] = {M[2], M[6], M[10]};
          int64_t c0 = 0, c1 = Cn;
          for (int ax = 0; ax < 3 && c0 < c1; ++ax) {
            int64_t f, l;
            maths::clip_range<T>(x[ax], x[ax], step[ax], lo[ax], hi[ax], Cn, f, l);
            c0 = std::max(c0, f);
            c1 = std::min(c1, l);
          }
          // Adds what point c of the row gives to its eight corners, o + od[k] + oh[m] + ow[n] in each output array
          // (d-taps with keep[k] false belong to another slab). Both paths below call it, so a point's products
          // and their order are the same whichever path takes it.
          const auto spread = [&](int64_t c, const int64_t od[2], const bool keep[2], const int64_t oh[2],
                                  const int64_t ow[2], const T wd[2], const T wh[2], const T ww[2])
#if defined(__GNUC__)
              __attribute__((always_inline))
#endif
          {
            for (int64_t q = 0; q < Q; ++q) {
              const T v = value(job, q, a, b, c);
              T* o = base_out + q * DHW;
              for (int k = 0; k < 2; ++k) {
                if (!keep[k]) continue;
                const T vk = v * wd[k];
                T* ok = o + od[k];
                for (int m = 0; m < 2; ++m) {
                  const T vm = vk * wh[m];
                  ok[oh[m] + ow[0]] = std::fma(vm, ww[0], ok[oh[m] + ow[0]]);
                  ok[oh[m] + ow[1]] = std::fma(vm, ww[1], ok[oh[m] + ow[1]]);
                }
              }
            }
          };
          // General path, one point: per-tap validity, only the d-taps inside this slab.
          const auto point = [&](int64_t c) {
            Taps<T> t0, t1, t2;
            if (!line_taps3(x, step, c, D, H, W, t0, t1, t2)) return;
            const int64_t od[2] = {t0.i0 * HW, t0.i1 * HW};
            const T wd[2] = {t0.w0, t0.w1};
            const bool keep[2] = {wd[0] != T(0) && t0.i0 >= dlo && t0.i0 < dhi,
                                  wd[1] != T(0) && t0.i1 >= dlo && t0.i1 < dhi};
            if (!keep[0] && !keep[1]) return;
            const int64_t oh[2] = {t1.i0 * W, t1.i1 * W}, ow[2] = {t2.i0, t2.i1};
            const T wh[2] = {t1.w0, t1.w1}, ww[2] = {t2.w0, t2.w1};
            spread(c, od, keep, oh, ow, wd, wh, ww);
          };
          // Fast path: the points whose eight corners lie in the array (plan_row's interior) with both d-taps
          // in this slab (0 <= x_d - dlo <= dhi - 1 - dlo, inner_range): lower corners and fractions of the
          // whole run at once (interior_taps, vectorised), no per-tap tests. Same weights as the general path,
          // points still in increasing c: bitwise the same sums.
          int64_t e0 = c1, e1 = c1;
          if (dhi - dlo >= 2) {
            const RowPlan r = plan_row(x, step, D, H, W, Cn);
            int64_t f = 0, l = 0;
            maths::inner_range<T>(x[0], step[0], T(dlo), T(dhi - 1), Cn, f, l);
            const int64_t lo_c = std::max(std::max(c0, r.k0), f), hi_c = std::min(std::min(c1, r.k1), l);
            if (hi_c > lo_c) {
              e0 = lo_c;
              e1 = hi_c;
            }
          }
          for (int64_t c = c0; c < e0; ++c) point(c);
          if (e1 > e0) {
            const InteriorTaps<T>& it = interior_taps(x, step, D, H, W, e0, e1);
            const bool keep[2] = {true, true};
            const int64_t oh[2] = {0, W}, ow[2] = {0, 1};
            for (int64_t e = 0; e < e1 - e0; ++e) {
              const T g0 = it.f0[e], g1 = it.f1[e], g2 = it.f2[e];
              const T wd[2] = {T(1) - g0, g0}, wh[2] = {T(1) - g1, g1}, ww[2] = {T(1) - g2, g2};
              const int64_t od[2] = {it.off[e], it.off[e] + HW};
              spread(e0 + e, od, keep, oh, ow, wd, wh, ww);
            }
          }
          for (int64_t c = e1; c < c1; ++c) point(c);
        }
      }
    }
  });
}

// The adjoint of sampling N stacks of S slices of h x w pixels from BC volumes (slice_volume_backward,
// radon_backward): scatter_grid with one job per stack n (maps[n] maps pixel (k, i, j) to the volume), every
// job writing all BC output arrays q; value(n, q, k, i, j) is what pixel (i, j) of slice k adds.
template <typename T, typename ValueFn>
void scatter_slices(T* out, int64_t D, int64_t H, int64_t W, const T* maps, int64_t N, int64_t S, int64_t h,
                    int64_t w, int64_t BC, const ValueFn& value) {
  scatter_grid<T>(out, D, H, W, N, maps, S, h, w, BC, [](int64_t) { return int64_t(0); }, value);
}

}  // namespace cpu
}  // namespace tonno_fast
