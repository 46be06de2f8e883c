// AVX-512 throughput probes (see peak.h), zmm, 16 chains each. vpdpbusd is
// inline asm (the assembler takes it whatever the -m flags), so the VNNI probe
// lives here too; it runs only where the VNNI level is selected.
#include <immintrin.h>

#include "common/peak.h"

namespace pyaccel {
namespace peak {

#define PYACCEL_PEAK_16(STEP)                                                  \
  STEP(c0) STEP(c1) STEP(c2) STEP(c3) STEP(c4) STEP(c5) STEP(c6) STEP(c7)      \
  STEP(c8) STEP(c9) STEP(c10) STEP(c11) STEP(c12) STEP(c13) STEP(c14) STEP(c15)
// 16 accumulators c0..c15 of type T, all = init
#define PYACCEL_PEAK_ACCS(T, init)                                             \
  T c0 = (init), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0, \
    c8 = c0, c9 = c0, c10 = c0, c11 = c0, c12 = c0, c13 = c0, c14 = c0, c15 = c0
// keeps the chains' results alive
#define PYACCEL_PEAK_SINK()                                                    \
  __asm__ volatile("" ::"v"(c0), "v"(c1), "v"(c2), "v"(c3), "v"(c4), "v"(c5), "v"(c6), "v"(c7)); \
  __asm__ volatile("" ::"v"(c8), "v"(c9), "v"(c10), "v"(c11), "v"(c12), "v"(c13), "v"(c14), "v"(c15))

// 16 accumulator chains of zmm integers; step(c) issues one step's asm into
// accumulator c (the lambdas inline).
template <class Step>
inline void zmm_int_chains(int64_t iters, const Step& step) {
  PYACCEL_PEAK_ACCS(__m512i, _mm512_setzero_si512());
  for (int64_t i = 0; i < iters; ++i) {
#define PYACCEL_PEAK_STEP(ACC) step(ACC);
    PYACCEL_PEAK_16(PYACCEL_PEAK_STEP)
#undef PYACCEL_PEAK_STEP
  }
  PYACCEL_PEAK_SINK();
}

// u8*s8 pairs -> s16 (vpmaddubsw), pairs -> s32 (vpmaddwd by 1), accumulate
// (vpaddd): 64 products a step.
int64_t int8_avx512bw(int64_t iters) {
  const __m512i a = _mm512_set1_epi8(3), w = _mm512_set1_epi8(-5), ones = _mm512_set1_epi16(1);
  zmm_int_chains(iters, [&](__m512i& c) {
    __m512i t;
    __asm__ volatile(
        "vpmaddubsw %[w], %[a], %[t]\n\t"
        "vpmaddwd %[o], %[t], %[t]\n\t"
        "vpaddd %[t], %[c], %[c]"
        : [c] "+v"(c), [t] "=&v"(t)
        : [a] "v"(a), [w] "v"(w), [o] "v"(ones));
  });
  return iters * 16 * 64 * 2;
}

// int16 pairs -> s32 (vpmaddwd, 32 products), accumulate (vpaddd): the exact
// 8-bit mix at this level (the vpmaddubsw mix above saturates on 8-bit
// operands unless a sign step is added, as the BW int8 kernel does).
int64_t int8_exact_avx512bw(int64_t iters) {
  const __m512i a = _mm512_set1_epi16(3), w = _mm512_set1_epi16(-5);
  zmm_int_chains(iters, [&](__m512i& c) {
    __m512i t;
    __asm__ volatile(
        "vpmaddwd %[w], %[a], %[t]\n\t"
        "vpaddd %[t], %[c], %[c]"
        : [c] "+v"(c), [t] "=&v"(t)
        : [a] "v"(a), [w] "v"(w));
  });
  return iters * 16 * 32 * 2;
}

int64_t fp32_avx512(int64_t iters) {
  __m512 x = _mm512_set1_ps(0.999f), y = _mm512_set1_ps(1e-3f);
  PYACCEL_PEAK_ACCS(__m512, _mm512_set1_ps(1.f));
  for (int64_t i = 0; i < iters; ++i) {
#define PYACCEL_PEAK_STEP(ACC) __asm__ volatile("vfmadd231ps %[x], %[y], %[a]" : [a] "+v"(ACC) : [x] "v"(x), [y] "v"(y));
    PYACCEL_PEAK_16(PYACCEL_PEAK_STEP)
#undef PYACCEL_PEAK_STEP
  }
  PYACCEL_PEAK_SINK();
  return iters * 16 * 16 * 2;
}

// vpdpbusd zmm: 64 u8*s8 products per chain step.
int64_t int8_vnni(int64_t iters) {
  __m512i a = _mm512_set1_epi8(3), w = _mm512_set1_epi8(-5);
  PYACCEL_PEAK_ACCS(__m512i, _mm512_setzero_si512());
  for (int64_t i = 0; i < iters; ++i) {
#define PYACCEL_PEAK_STEP(ACC) __asm__ volatile("vpdpbusd %[w], %[a], %[x]" : [x] "+v"(ACC) : [a] "v"(a), [w] "v"(w));
    PYACCEL_PEAK_16(PYACCEL_PEAK_STEP)
#undef PYACCEL_PEAK_STEP
  }
  PYACCEL_PEAK_SINK();
  return iters * 16 * 64 * 2;
}

}  // namespace peak
}  // namespace pyaccel
