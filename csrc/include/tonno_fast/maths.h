// Per-point maths shared by the CPU (C++/OpenMP) and CUDA kernels of tonno_fast.
//
// Everything geometric has already been reduced, in Python (tonno_fast/geometry.py), to index-space
// affine maps: a row-major 3x4 matrix M takes a grid point (a, b, c) to the continuous index
// M @ (a, b, c, 1) in the array being read. Kernels only apply maps and interpolate, so the CPU tests
// exercise exactly the formulas the GPU runs.
//
// Conventions (identical to the reference backend, i.e. grid_sample(padding_mode="zeros")):
//  * index x of an axis of size n is valid when 0 <= x <= n-1; trilinear/linear interpolation reads each
//    corner (tap) separately and a corner outside [0, n-1] contributes zero (or `fill`, see slice_volume);
//  * a point whose coordinate is NaN, or lies at or beyond one cell outside the array, has no valid corner.
//    The comparison `!(x > -1 && x < n)` is written so that NaN fails it before any integer cast.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define TF_HD __host__ __device__ __forceinline__
#else
#define TF_HD inline
#endif

namespace tonno_fast {
namespace maths {

#ifndef __CUDA_ARCH__
// Host code: make floor/ceil/fabs below resolve to the float overloads for float arguments. Without these,
// <cmath> leaves only ::floor(double) visible here, so float code converts to double and back, which
// halves the width of (or prevents) vectorised CPU loops. Results are identical (these are exact).
// Device code uses the CUDA overloads.
using std::ceil;
using std::fabs;
using std::floor;
#endif

// (x0, x1, x2) = M @ (a, b, c, 1) for a row-major 3x4 map M.
template <typename T>
TF_HD void apply_affine(const T* M, T a, T b, T c, T& x0, T& x1, T& x2) {
  x0 = M[0] * a + M[1] * b + M[2] * c + M[3];
  x1 = M[4] * a + M[5] * b + M[6] * c + M[7];
  x2 = M[8] * a + M[9] * b + M[10] * c + M[11];
}

// One row of a 3x4 map: r @ (a, b, c, 1).
template <typename T>
TF_HD T apply_row(const T* r, T a, T b, T c) {
  return r[0] * a + r[1] * b + r[2] * c + r[3];
}

// Linear interpolation along one axis of size n at continuous index x: taps i0 and i0 + 1 with weights
// w0 = 1 - f and w1 = f. A tap outside [0, n-1] gets weight 0 and a clamped (safe) index, so callers can
// read or write both taps unconditionally. Returns false when neither tap is valid.
template <typename T>
struct Taps {
  int64_t i0, i1;
  T w0, w1;
};

template <typename T>
TF_HD bool linear_taps(T x, int64_t n, Taps<T>& t) {
  if (!(x > T(-1) && x < T(n))) {  // NaN-safe
    t.i0 = t.i1 = 0;
    t.w0 = t.w1 = T(0);
    return false;
  }
  const T fl = floor(x);
  const int64_t i = static_cast<int64_t>(fl);
  const T f = x - fl;
  const bool v0 = i >= 0;          // i <= n-1 holds since x < n
  const bool v1 = i + 1 <= n - 1;  // i + 1 >= 0 holds since x > -1
  t.i0 = v0 ? i : 0;
  t.i1 = v1 ? i + 1 : 0;
  t.w0 = v0 ? T(1) - f : T(0);
  t.w1 = v1 ? f : T(0);
  return true;
}

// Derivative of the interpolation weights with respect to x (for gradients with respect to the map):
// d w0 / dx = -1 and d w1 / dx = +1 for valid taps, 0 otherwise.
template <typename T>
TF_HD void linear_taps_dx(const Taps<T>& t, T x, int64_t n, T& d0, T& d1) {
  if (!(x > T(-1) && x < T(n))) {
    d0 = d1 = T(0);
    return;
  }
  const int64_t i = static_cast<int64_t>(floor(x));
  d0 = (i >= 0) ? T(-1) : T(0);
  d1 = (i + 1 <= n - 1) ? T(1) : T(0);
  (void)t;
}

// Trilinear combination of the eight corners given precomputed taps of the three axes (offsets already
// clamped, weights of invalid taps 0 — see linear_taps), so one set of taps serves every batch item and
// channel. `a` points at the first element of one (n0, n1, n2) array with strides s0, s1, s2.
template <typename T, typename Acc = T>
TF_HD Acc trilinear_taps(const T* a, int64_t s0, int64_t s1, int64_t s2, const Taps<Acc>& t0,
                         const Taps<Acc>& t1, const Taps<Acc>& t2) {
  const int64_t o00 = t0.i0 * s0 + t1.i0 * s1, o01 = t0.i0 * s0 + t1.i1 * s1;
  const int64_t o10 = t0.i1 * s0 + t1.i0 * s1, o11 = t0.i1 * s0 + t1.i1 * s1;
  const int64_t a0 = t2.i0 * s2, a1 = t2.i1 * s2;
  const Acc r00 = t2.w0 * Acc(a[o00 + a0]) + t2.w1 * Acc(a[o00 + a1]);
  const Acc r01 = t2.w0 * Acc(a[o01 + a0]) + t2.w1 * Acc(a[o01 + a1]);
  const Acc r10 = t2.w0 * Acc(a[o10 + a0]) + t2.w1 * Acc(a[o10 + a1]);
  const Acc r11 = t2.w0 * Acc(a[o11 + a0]) + t2.w1 * Acc(a[o11 + a1]);
  return t0.w0 * (t1.w0 * r00 + t1.w1 * r01) + t0.w1 * (t1.w0 * r10 + t1.w1 * r11);
}

// Trilinear interpolation of a strided 3D array `a` (sizes n0, n1, n2; element strides s0, s1, s2) at
// continuous index (x0, x1, x2). Out-of-bounds corners read zero.
template <typename T, typename Acc = T>
TF_HD Acc trilinear(const T* a, int64_t n0, int64_t n1, int64_t n2, int64_t s0, int64_t s1, int64_t s2,
                    Acc x0, Acc x1, Acc x2) {
  Taps<Acc> t0, t1, t2;
  if (!linear_taps(x0, n0, t0) || !linear_taps(x1, n1, t1) || !linear_taps(x2, n2, t2)) return Acc(0);
  return trilinear_taps<T, Acc>(a, s0, s1, s2, t0, t1, t2);
}

// Sum of the trilinear weights of the valid corners at (x0, x1, x2): 1 inside the array, less near
// and beyond its faces. slice_volume with a fill value adds fill * (1 - inside_weight).
template <typename Acc>
TF_HD Acc inside_weight(int64_t n0, int64_t n1, int64_t n2, Acc x0, Acc x1, Acc x2) {
  Taps<Acc> t0, t1, t2;
  if (!linear_taps(x0, n0, t0) || !linear_taps(x1, n1, t1) || !linear_taps(x2, n2, t2)) return Acc(0);
  return (t0.w0 + t0.w1) * (t1.w0 + t1.w1) * (t2.w0 + t2.w1);
}

// The eight corners of a trilinear interpolation: flat offsets (with strides) and weights; invalid
// corners have weight 0 and offset 0. Used by the adjoint (scatter) kernels. Returns false if no corner
// is valid.
template <typename Acc>
TF_HD bool trilinear_corners(int64_t n0, int64_t n1, int64_t n2, int64_t s0, int64_t s1, int64_t s2,
                             Acc x0, Acc x1, Acc x2, int64_t off[8], Acc w[8]) {
  Taps<Acc> t0, t1, t2;
  if (!linear_taps(x0, n0, t0) || !linear_taps(x1, n1, t1) || !linear_taps(x2, n2, t2)) return false;
  const int64_t i0[2] = {t0.i0 * s0, t0.i1 * s0}, i1[2] = {t1.i0 * s1, t1.i1 * s1},
                i2[2] = {t2.i0 * s2, t2.i1 * s2};
  const Acc w0[2] = {t0.w0, t0.w1}, w1[2] = {t1.w0, t1.w1}, w2[2] = {t2.w0, t2.w1};
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    const int a = (c >> 2) & 1, b = (c >> 1) & 1, d = c & 1;
    off[c] = i0[a] + i1[b] + i2[d];
    w[c] = w0[a] * w1[b] * w2[d];
  }
  return true;
}

// Trilinear value and its gradient with respect to the continuous index (x0, x1, x2) — for the gradient
// of affine_grid_sample with respect to theta. Out-of-bounds corners read zero (as grid_sample).
template <typename T, typename Acc = T>
TF_HD Acc trilinear_with_grad(const T* a, int64_t n0, int64_t n1, int64_t n2, int64_t s0, int64_t s1,
                              int64_t s2, Acc x0, Acc x1, Acc x2, Acc& g0, Acc& g1, Acc& g2) {
  g0 = g1 = g2 = Acc(0);
  Taps<Acc> t0, t1, t2;
  if (!linear_taps(x0, n0, t0) || !linear_taps(x1, n1, t1) || !linear_taps(x2, n2, t2)) return Acc(0);
  Acc d0[2], d1[2], d2[2];
  linear_taps_dx(t0, x0, n0, d0[0], d0[1]);
  linear_taps_dx(t1, x1, n1, d1[0], d1[1]);
  linear_taps_dx(t2, x2, n2, d2[0], d2[1]);
  const int64_t i0[2] = {t0.i0 * s0, t0.i1 * s0}, i1[2] = {t1.i0 * s1, t1.i1 * s1},
                i2[2] = {t2.i0 * s2, t2.i1 * s2};
  const Acc w0[2] = {t0.w0, t0.w1}, w1[2] = {t1.w0, t1.w1}, w2[2] = {t2.w0, t2.w1};
  Acc val = Acc(0);
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    const int p = (c >> 2) & 1, q = (c >> 1) & 1, r = c & 1;
    const Acc v = Acc(a[i0[p] + i1[q] + i2[r]]);
    val += w0[p] * w1[q] * w2[r] * v;
    g0 += d0[p] * w1[q] * w2[r] * v;
    g1 += w0[p] * d1[q] * w2[r] * v;
    g2 += w0[p] * w1[q] * d2[r] * v;
  }
  return val;
}

// ---------------------------------------------------------------------------------------------------------
// Helpers of the fused CPU kernels.

// Integer range [first, last) of t in [0, n) that contains every t for which the interval
// [amin + t*b, amax + t*b] meets the open interval (lo, hi); a superset (widened by a margin that absorbs
// rounding of the per-point coordinates), so points outside it are certain to lie outside (lo, hi).
// Kernels use it to skip, per row or per plane, the samples that read only padding: with slices that cover
// the bounding sphere most samples are outside the volume. For a single line pass amin == amax.
// NaN inputs give the full range (the per-point checks then decide).
template <typename T>
TF_HD void clip_range(T amin, T amax, T b, T lo, T hi, int64_t n, int64_t& first, int64_t& last) {
  first = 0;
  last = n;
  if (!(amin == amin && amax == amax && b == b && lo == lo && hi == hi)) return;  // NaN: no clipping
  const T m = T(1e-3) + T(1e-5) * (fabs(amin) + fabs(amax) + fabs(b) * T(n) + fabs(lo) + fabs(hi));
  lo -= m;
  hi += m;
  T tmin = T(-1), tmax = T(n + 1);  // clamped so that the integer casts below are safe
  if (b > T(0)) {
    const T u = (hi - amin) / b, l = (lo - amax) / b;
    tmax = u < tmax ? u : tmax;
    tmin = l > tmin ? l : tmin;
  } else if (b < T(0)) {
    const T l = (hi - amin) / b, u = (lo - amax) / b;
    tmax = u < tmax ? u : tmax;
    tmin = l > tmin ? l : tmin;
  } else if (!(amin < hi && amax > lo)) {
    first = last = 0;
    return;
  }
  if (!(tmin <= tmax)) {
    first = last = 0;
    return;
  }
  const int64_t f = static_cast<int64_t>(floor(tmin)), l = static_cast<int64_t>(ceil(tmax)) + 1;
  first = f > 0 ? f : 0;
  last = l < n ? l : n;
  if (last < first) last = first;
}

// ---------------------------------------------------------------------------------------------------------
// Interpolation along zero-padded rows: the backprojection kernels (CUDA, and CPU, whose vector path runs
// these templates on SIMD vectors).

// Building blocks of the formulas below that CPU kernels also run on SIMD vectors (csrc/ops/cpu/simd.h):
// templates over the value type T call these unqualified, and a vector type brings its own overloads
// (found by argument-dependent lookup), so scalar, CUDA and vector code evaluate the same expressions.
// clamp_low(x, lo) = x > lo ? x : lo and clamp_high(x, hi) = x < hi ? x : hi: a NaN x gives the bound.
template <typename T>
TF_HD T clamp_low(T x, T lo) {
  return x > lo ? x : lo;
}
template <typename T>
TF_HD T clamp_high(T x, T hi) {
  return x < hi ? x : hi;
}
// Truncation toward zero to int32 (x must lie in int32's range).
template <typename T>
TF_HD int32_t to_int32(T x) {
  return static_cast<int32_t>(x);
}

// The lower tap and the fraction of linear interpolation at continuous index x of a row of n values stored
// zero-padded, p[0] = 0, p[1 + i] = r[i], p[n + 1] = p[n + 2] = 0 (n + 3 values), given u = x + 1 (the padded
// index): u is clamped to [0, n + 1], where both taps read padding (NaN reads padding too), so truncation is
// floor and i, in [0, n + 1], is the padded index of the lower tap, f = u - i in [0, 1]. Without branches or
// index clamping (the hot loop of a backprojection). n must be below 2^24 - 1 for float, 2^31 - 1 otherwise.
// (Truncation of u and taps p[i], p[i + 1] rather than floor(x) and p[i + 1], p[i + 2]: GCC vectorises this
// form of the CPU loop with gathers and not the other, 1.7 vs 2.8 G updates/s for backproject here.)
template <typename T, typename I>
TF_HD void padded_tap_shifted(T u, int64_t n, I& i, T& f) {
  u = clamp_low(u, T(0));
  u = clamp_high(u, T(n + 1));
  i = to_int32(u);
  f = u - T(i);
}

// The same at continuous index x: u = x + 1 first, which gives the same bits as clamping x to [-1, n] first.
template <typename T, typename I>
TF_HD void padded_tap(T x, int64_t n, I& i, T& f) {
  padded_tap_shifted(x + T(1), n, i, f);
}

// Linear interpolation from the lower tap a, the difference d = b - a to the upper tap b and the fraction f.
template <typename T>
TF_HD T lerp_difference(T a, T d, T f) {
  return a + f * d;
}

// Linear interpolation between the taps a (weight 1 - f) and b (weight f).
template <typename T>
TF_HD T lerp_taps(T a, T b, T f) {
  return lerp_difference(a, b - a, f);
}

// Linear interpolation at continuous index x of a row r[0..n-1] stored zero-padded (see padded_tap): for a
// finite row, the same value as linear_taps with taps outside [0, n-1] reading zero (up to rounding), with
// one truncation, two loads, a subtraction and a multiply-add.
template <typename T>
TF_HD T lerp_zero_padded(const T* p, int64_t n, T x) {
  int32_t i;
  T f;
  padded_tap(x, n, i, f);
  return lerp_taps(p[i], p[i + 1], f);
}

// The counterpart of clip_range: integer range [first, last) of t in [0, n) on which lo <= a + t*b <= hi
// holds with a safety margin (a subset; empty for NaN input). For an axis of size m, lo = 0 and hi = m - 1
// give the points whose eight trilinear corners are all valid: the fast interior path below.
template <typename T>
TF_HD void inner_range(T a, T b, T lo, T hi, int64_t n, int64_t& first, int64_t& last) {
  first = last = 0;
  if (!(a == a && b == b && lo == lo && hi == hi)) return;
  const T m = T(1e-3) + T(1e-5) * (fabs(a) + fabs(b) * T(n) + fabs(lo) + fabs(hi));
  lo += m;
  hi -= m;
  if (!(lo <= hi)) return;
  T tmin = T(0), tmax = T(n - 1);
  if (b > T(0)) {
    const T l = (lo - a) / b, u = (hi - a) / b;
    tmin = l > tmin ? l : tmin;
    tmax = u < tmax ? u : tmax;
  } else if (b < T(0)) {
    const T l = (hi - a) / b, u = (lo - a) / b;
    tmin = l > tmin ? l : tmin;
    tmax = u < tmax ? u : tmax;
  } else if (!(a >= lo && a <= hi)) {
    return;
  }
  if (!(tmin <= tmax)) return;  // also rejects inf/NaN bounds before the integer casts
  first = static_cast<int64_t>(ceil(tmin));
  last = static_cast<int64_t>(floor(tmax)) + 1;
  if (first < 0) first = 0;
  if (last > n) last = n;
  if (last < first) last = first;
}

// Lower corner of an interior point x of an axis (0 <= x <= n-1, see inner_range), given top = n - 2 >= 0:
// floor(x) clamped to [0, top]; the fraction is x - corner, in [0, 1]. The clamp only guards memory (it
// never acts for interior points) and keeps x = n-1 on the last cell with fraction 1. int32 and no
// branches so that CPU loops over points vectorise.
template <typename T>
TF_HD int32_t interior_floor(T x, int32_t top) {
  int32_t k = static_cast<int32_t>(x);  // x >= 0: truncation is floor
  k = k < 0 ? 0 : k;
  return k > top ? top : k;
}

// Trilinear interpolation from the eight corner values v<i0><i1><i2> (i = 0: lower, 1: upper corner along
// each axis) and the fractions f0, f1, f2; Acc may be a SIMD vector type (csrc/ops/cpu/simd.h), whose lanes
// then evaluate the same expression.
template <typename Acc>
TF_HD Acc trilinear_corners(Acc v000, Acc v001, Acc v010, Acc v011, Acc v100, Acc v101, Acc v110, Acc v111, Acc f0,
                            Acc f1, Acc f2) {
  const Acc c00 = v000 + f2 * (v001 - v000);
  const Acc c01 = v010 + f2 * (v011 - v010);
  const Acc c10 = v100 + f2 * (v101 - v100);
  const Acc c11 = v110 + f2 * (v111 - v110);
  const Acc c0 = c00 + f1 * (c01 - c00);
  const Acc c1 = c10 + f1 * (c11 - c10);
  return c0 + f0 * (c1 - c0);
}

// Trilinear interpolation at an interior point: all eight corners valid, lower corner at flat index o,
// strides s0, s1 and 1, fractions f0, f1, f2. Indexed as a[o + ...] (not through a pointer p = a + o) so
// that GCC vectorises loops over points with gathers; I is the index type (int32_t on the CPU fast path).
template <typename T, typename Acc = T, typename I = int64_t>
TF_HD Acc trilinear_interior(const T* a, I o, I s0, I s1, Acc f0, Acc f1, Acc f2) {
  return trilinear_corners(Acc(a[o]), Acc(a[o + 1]), Acc(a[o + s1]), Acc(a[o + s1 + 1]), Acc(a[o + s0]),
                           Acc(a[o + s0 + 1]), Acc(a[o + s0 + s1]), Acc(a[o + s0 + s1 + 1]), f0, f1, f2);
}

// trilinear_interior and its gradient with respect to the continuous index (x0, x1, x2), for an interior
// point (the same values as trilinear_with_grad there, without validity tests).
template <typename T, typename Acc = T, typename I = int64_t>
TF_HD Acc trilinear_interior_with_grad(const T* a, I o, I s0, I s1, Acc f0, Acc f1, Acc f2, Acc& g0, Acc& g1,
                                       Acc& g2) {
  const Acc v000 = Acc(a[o]), v001 = Acc(a[o + 1]), v010 = Acc(a[o + s1]), v011 = Acc(a[o + s1 + 1]);
  const Acc v100 = Acc(a[o + s0]), v101 = Acc(a[o + s0 + 1]), v110 = Acc(a[o + s0 + s1]),
            v111 = Acc(a[o + s0 + s1 + 1]);
  const Acc e00 = v001 - v000, e01 = v011 - v010, e10 = v101 - v100, e11 = v111 - v110;  // d / d x2
  const Acc c00 = v000 + f2 * e00, c01 = v010 + f2 * e01, c10 = v100 + f2 * e10, c11 = v110 + f2 * e11;
  const Acc c0 = c00 + f1 * (c01 - c00), c1 = c10 + f1 * (c11 - c10);
  const Acc e0 = e00 + f1 * (e01 - e00), e1 = e10 + f1 * (e11 - e10);
  g0 = c1 - c0;
  g1 = (c01 - c00) + f0 * ((c11 - c10) - (c01 - c00));
  g2 = e0 + f0 * (e1 - e0);
  return c0 + f0 * g0;
}

}  // namespace maths
}  // namespace tonno_fast
