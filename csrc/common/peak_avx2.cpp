// AVX2 throughput probes (see peak.h). Inline asm keeps every instruction: the
// compiler may neither fold the chains nor hoist loop-invariant products.
#include <immintrin.h>

#include "common/cpu_features.h"  // PYACCEL_VEX_PREFIX
#include "common/peak.h"

namespace pyaccel {
namespace peak {

// 12 steps per iteration on 6 accumulator chains; step(c) issues one step's
// asm into accumulator c (the lambdas inline).
template <class Step>
inline void int_chains(int64_t iters, const Step& step) {
  __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0;
  for (int64_t i = 0; i < iters; ++i) {
    step(c0), step(c1), step(c2), step(c3), step(c4), step(c5);
    step(c0), step(c1), step(c2), step(c3), step(c4), step(c5);
  }
  __asm__ volatile("" ::"x"(c0), "x"(c1), "x"(c2), "x"(c3), "x"(c4), "x"(c5));
}

// u8*s8 pairs -> s16 (vpmaddubsw), pairs -> s32 (vpmaddwd by 1), accumulate
// (vpaddd): 32 products per step.
int64_t int8_avx2(int64_t iters) {
  const __m256i a = _mm256_set1_epi8(3), w = _mm256_set1_epi8(-5), ones = _mm256_set1_epi16(1);
  int_chains(iters, [&](__m256i& c) {
    __m256i t;
    __asm__ volatile(
        "vpmaddubsw %[w], %[a], %[t]\n\t"
        "vpmaddwd %[o], %[t], %[t]\n\t"
        "vpaddd %[t], %[c], %[c]"
        : [c] "+x"(c), [t] "=&x"(t)
        : [a] "x"(a), [w] "x"(w), [o] "x"(ones));
  });
  return iters * 12 * 32 * 2;
}

// The cheapest exact mix for 8-bit x 8-bit products on AVX2 (what the int8
// GEMM's int16 tile issues): int16 pairs -> s32 (vpmaddwd, 16 products),
// accumulate (vpaddd), twice per 32 products.
int64_t int8_exact_avx2(int64_t iters) {
  const __m256i a = _mm256_set1_epi16(3), w = _mm256_set1_epi16(-5);
  int_chains(iters, [&](__m256i& c) {
    __m256i t;
    __asm__ volatile(
        "vpmaddwd %[w], %[a], %[t]\n\t"
        "vpaddd %[t], %[c], %[c]"
        : [c] "+x"(c), [t] "=&x"(t)
        : [a] "x"(a), [w] "x"(w));
  });
  return iters * 12 * 16 * 2;
}

// vpdpbusd on ymm (the AVX-VNNI level): 32 u8*s8 products per step, 12
// chains (latency 4 - 5, up to 2 per cycle). Vex: the VEX encoding (AVX-VNNI),
// else the EVEX one (AVX-512 VNNI + VL), as the level's GEMM kernel picks.
template <bool Vex>
int64_t int8_vnni_ymm(int64_t iters) {
  const __m256i a = _mm256_set1_epi8(3), w = _mm256_set1_epi8(-5);
  __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0,
          c8 = c0, c9 = c0, c10 = c0, c11 = c0;
  for (int64_t i = 0; i < iters; ++i) {
#define PYACCEL_PEAK_DP(C)                                                                              \
  if constexpr (Vex)                                                                                    \
    __asm__ volatile(PYACCEL_VEX_PREFIX "vpdpbusd %[w], %[a], %[c]" : [c] "+x"(C) : [a] "x"(a), [w] "x"(w)); \
  else                                                                                                  \
    __asm__ volatile("vpdpbusd %[w], %[a], %[c]" : [c] "+x"(C) : [a] "x"(a), [w] "x"(w));
    PYACCEL_PEAK_DP(c0) PYACCEL_PEAK_DP(c1) PYACCEL_PEAK_DP(c2) PYACCEL_PEAK_DP(c3)
    PYACCEL_PEAK_DP(c4) PYACCEL_PEAK_DP(c5) PYACCEL_PEAK_DP(c6) PYACCEL_PEAK_DP(c7)
    PYACCEL_PEAK_DP(c8) PYACCEL_PEAK_DP(c9) PYACCEL_PEAK_DP(c10) PYACCEL_PEAK_DP(c11)
#undef PYACCEL_PEAK_DP
  }
  __asm__ volatile("" ::"x"(c0), "x"(c1), "x"(c2), "x"(c3), "x"(c4), "x"(c5));
  __asm__ volatile("" ::"x"(c6), "x"(c7), "x"(c8), "x"(c9), "x"(c10), "x"(c11));
  return iters * 12 * 32 * 2;
}
// (flatten: each one function, for the encoding test)
__attribute__((flatten, noinline)) int64_t int8_avxvnni_vex(int64_t iters) { return int8_vnni_ymm<true>(iters); }
__attribute__((flatten, noinline)) int64_t int8_avxvnni_evex(int64_t iters) { return int8_vnni_ymm<false>(iters); }

// 12 independent FMA chains (latency 4-5, 2 per cycle) of 8 lanes.
int64_t fp32_avx2(int64_t iters) {
  __m256 x = _mm256_set1_ps(0.999f), y = _mm256_set1_ps(1e-3f);
  __m256 c0 = _mm256_set1_ps(1.f), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0,
         c8 = c0, c9 = c0, c10 = c0, c11 = c0;
  for (int64_t i = 0; i < iters; ++i) {
    __asm__ volatile(
        "vfmadd231ps %[x], %[y], %[c0]\n\tvfmadd231ps %[x], %[y], %[c1]\n\t"
        "vfmadd231ps %[x], %[y], %[c2]\n\tvfmadd231ps %[x], %[y], %[c3]\n\t"
        "vfmadd231ps %[x], %[y], %[c4]\n\tvfmadd231ps %[x], %[y], %[c5]\n\t"
        "vfmadd231ps %[x], %[y], %[c6]\n\tvfmadd231ps %[x], %[y], %[c7]\n\t"
        "vfmadd231ps %[x], %[y], %[c8]\n\tvfmadd231ps %[x], %[y], %[c9]\n\t"
        "vfmadd231ps %[x], %[y], %[c10]\n\tvfmadd231ps %[x], %[y], %[c11]"
        : [c0] "+x"(c0), [c1] "+x"(c1), [c2] "+x"(c2), [c3] "+x"(c3), [c4] "+x"(c4), [c5] "+x"(c5),
          [c6] "+x"(c6), [c7] "+x"(c7), [c8] "+x"(c8), [c9] "+x"(c9), [c10] "+x"(c10), [c11] "+x"(c11)
        : [x] "x"(x), [y] "x"(y));
  }
  return iters * 12 * 8 * 2;
}

}  // namespace peak
}  // namespace pyaccel
