// Eight-lane float32 vectors for the hot loops of the CPU kernels: AVX2 + FMA, the x86-64-v3 baseline the
// extension is compiled for (setup.py), wrapped in small value types with operators.
//
// The per-point formulas live once, in tonno_fast/maths.h, as templates over the value type: they call
// clamp_low, clamp_high and to_int32 unqualified, so with F32x8 arguments the overloads below are found by
// argument-dependent lookup and the same formula runs on eight points at once. What the vectors add is
// how values are fetched (in-register permutes of a loaded window, pairs of adjacent values assembled from
// 64-bit loads), which scalar code and GCC's vectoriser cannot express.
//
// TF_SIMD_AVX2 is 1 when the compiler targets AVX2 + FMA; otherwise kernels keep their portable loops
// (which GCC vectorises as far as it can). Only float32 has vector paths; float64 takes the portable loops.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__)
#define TF_SIMD_AVX2 1
#include <immintrin.h>
#else
#define TF_SIMD_AVX2 0
#endif

namespace tonno_fast {
namespace cpu {
namespace simd {

#if TF_SIMD_AVX2

struct I32x8 {
  __m256i v;
  I32x8() = default;
  explicit I32x8(__m256i x) : v(x) {}
  explicit I32x8(int32_t s) : v(_mm256_set1_epi32(s)) {}
  static I32x8 load(const int32_t* p) { return I32x8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  void store(int32_t* p) const { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
};

struct F32x8 {
  __m256 v;
  F32x8() = default;
  explicit F32x8(__m256 x) : v(x) {}
  explicit F32x8(float s) : v(_mm256_set1_ps(s)) {}
  explicit F32x8(I32x8 i) : v(_mm256_cvtepi32_ps(i.v)) {}  // exact for |i| < 2^24
  static F32x8 load(const float* p) { return F32x8(_mm256_loadu_ps(p)); }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  // Lanes 0-3 and 4-7 as two 4-lane halves (e.g. two rows of four voxels).
  void store_halves(float* lo, float* hi) const {
    _mm_storeu_ps(lo, _mm256_castps256_ps128(v));
    _mm_storeu_ps(hi, _mm256_extractf128_ps(v, 1));
  }
};

// Written with GCC's vector-extension operators (as immintrin.h itself does), so that a * b + c contracts to
// an FMA exactly where the same scalar expression does.
inline F32x8 operator+(F32x8 a, F32x8 b) { return F32x8(a.v + b.v); }
inline F32x8 operator-(F32x8 a, F32x8 b) { return F32x8(a.v - b.v); }
inline F32x8 operator*(F32x8 a, F32x8 b) { return F32x8(a.v * b.v); }
inline I32x8 operator+(I32x8 a, I32x8 b) { return I32x8(_mm256_add_epi32(a.v, b.v)); }
inline I32x8 operator-(I32x8 a, I32x8 b) { return I32x8(_mm256_sub_epi32(a.v, b.v)); }

// a * b + c with a single rounding (vfmadd), where the bits must match another computation of the same value.
inline F32x8 fmadd(F32x8 a, F32x8 b, F32x8 c) { return F32x8(_mm256_fmadd_ps(a.v, b.v, c.v)); }

// maths.h's clamp_low / clamp_high: x > lo ? x : lo and x < hi ? x : hi, lane by lane; vmaxps / vminps return
// their second operand when a lane is NaN, so NaN gives lo (hi), as the scalar versions.
inline F32x8 clamp_low(F32x8 x, F32x8 lo) { return F32x8(_mm256_max_ps(x.v, lo.v)); }
inline F32x8 clamp_high(F32x8 x, F32x8 hi) { return F32x8(_mm256_min_ps(x.v, hi.v)); }
// maths.h's to_int32: truncation toward zero (vcvttps2dq; out of range gives INT32_MIN).
inline I32x8 to_int32(F32x8 x) { return I32x8(_mm256_cvttps_epi32(x.v)); }

// The four-column, two-row pattern (0, 1, 2, 3, 0, 1, 2, 3) and two rows' values (a in lanes 0-3, b in 4-7).
inline F32x8 columns4x2() { return F32x8(_mm256_setr_ps(0.f, 1.f, 2.f, 3.f, 0.f, 1.f, 2.f, 3.f)); }
inline F32x8 rows4x2(float a, float b) { return F32x8(_mm256_setr_ps(a, a, a, a, b, b, b, b)); }

// p[i[k]] for every lane k (vgatherdps).
inline F32x8 gather(const float* p, I32x8 i) { return F32x8(_mm256_i32gather_ps(p, i.v, 4)); }

// p[m + l[k]] for every lane k, where 0 <= l[k] <= 7: one unaligned load of the window p[m .. m + 7] and an
// in-register permute (vpermps) instead of a gather, when the lanes' indices are known to lie within eight
// consecutive values. Only p[m .. m + 7] is read, whatever l holds.
inline F32x8 window_gather(const float* p, int32_t m, I32x8 l) {
  return F32x8(_mm256_permutevar8x32_ps(_mm256_loadu_ps(p + m), l.v));
}

// Adjacent pairs (p[o[k]], p[o[k] + 1]) for the eight offsets o[0..7]: lo[k] = p[o[k]], hi[k] = p[o[k] + 1].
// Eight 64-bit loads assembled in registers (vmovq, vpinsrq, vinsertf128, two in-lane shuffles): on the
// project's AMD EPYC this fetches the corners of a trilinear sample ~2.4x faster than two 4-lane 64-bit
// gathers (vgatherdpd), and those ~1.05x faster than two 8-lane gathers (benchmarks/RESULTS.md, items 16 and 20).
// Only the 16 floats p[o[k]], p[o[k] + 1] are read.
// A pair is 8 bytes at a 4-byte-aligned address: it is copied (memcpy, which compiles to plain 64-bit loads)
// rather than read through a double*, which would be undefined behaviour for an odd index (UBSan reports a
// misaligned load); the two take the same time.
inline void load_pairs(const float* p, const int32_t* o, F32x8& lo, F32x8& hi) {
  const auto pair = [p](int32_t i) {
    double d;
    std::memcpy(&d, p + i, sizeof d);
    return d;
  };
  const __m128d a0 = _mm_set_pd(pair(o[1]), pair(o[0]));  // pairs 0, 1
  const __m128d b0 = _mm_set_pd(pair(o[3]), pair(o[2]));  // pairs 2, 3
  const __m128d a1 = _mm_set_pd(pair(o[5]), pair(o[4]));  // pairs 4, 5
  const __m128d b1 = _mm_set_pd(pair(o[7]), pair(o[6]));  // pairs 6, 7
  const __m256 a = _mm256_castpd_ps(_mm256_insertf128_pd(_mm256_castpd128_pd256(a0), a1, 1));
  const __m256 b = _mm256_castpd_ps(_mm256_insertf128_pd(_mm256_castpd128_pd256(b0), b1, 1));
  lo = F32x8(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0)));
  hi = F32x8(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
}

#endif  // TF_SIMD_AVX2

}  // namespace simd
}  // namespace cpu
}  // namespace tonno_fast
