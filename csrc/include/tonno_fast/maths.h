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

// Trilinear interpolation of a strided 3D array `a` (sizes n0, n1, n2; element strides s0, s1, s2) at
// continuous index (x0, x1, x2). Out-of-bounds corners read zero.
template <typename T, typename Acc = T>
TF_HD Acc trilinear(const T* a, int64_t n0, int64_t n1, int64_t n2, int64_t s0, int64_t s1, int64_t s2,
                    Acc x0, Acc x1, Acc x2) {
  Taps<Acc> t0, t1, t2;
  if (!linear_taps(x0, n0, t0) || !linear_taps(x1, n1, t1) || !linear_taps(x2, n2, t2)) return Acc(0);
  const int64_t o00 = t0.i0 * s0 + t1.i0 * s1, o01 = t0.i0 * s0 + t1.i1 * s1;
  const int64_t o10 = t0.i1 * s0 + t1.i0 * s1, o11 = t0.i1 * s0 + t1.i1 * s1;
  const int64_t a0 = t2.i0 * s2, a1 = t2.i1 * s2;
  const Acc r00 = t2.w0 * Acc(a[o00 + a0]) + t2.w1 * Acc(a[o00 + a1]);
  const Acc r01 = t2.w0 * Acc(a[o01 + a0]) + t2.w1 * Acc(a[o01 + a1]);
  const Acc r10 = t2.w0 * Acc(a[o10 + a0]) + t2.w1 * Acc(a[o10 + a1]);
  const Acc r11 = t2.w0 * Acc(a[o11 + a0]) + t2.w1 * Acc(a[o11 + a1]);
  return t0.w0 * (t1.w0 * r00 + t1.w1 * r01) + t0.w1 * (t1.w0 * r10 + t1.w1 * r11);
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

}  // namespace maths
}  // namespace tonno_fast
