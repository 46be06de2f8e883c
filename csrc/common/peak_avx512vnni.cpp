// AVX-512 VNNI throughput probe (see peak.h): vpdpbusd zmm, 16 chains of
// 64 u8*s8 products.
#include <immintrin.h>

#include "common/peak.h"

namespace pyaccel {
namespace peak {

int64_t int8_vnni(int64_t iters) {
  __m512i a = _mm512_set1_epi8(3), w = _mm512_set1_epi8(-5);
  __m512i c0 = _mm512_setzero_si512(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0,
          c8 = c0, c9 = c0, c10 = c0, c11 = c0, c12 = c0, c13 = c0, c14 = c0, c15 = c0;
  for (int64_t i = 0; i < iters; ++i) {
#define PYACCEL_PEAK_STEP(ACC) __asm__ volatile("vpdpbusd %[w], %[a], %[x]" : [x] "+v"(ACC) : [a] "v"(a), [w] "v"(w));
    PYACCEL_PEAK_STEP(c0) PYACCEL_PEAK_STEP(c1) PYACCEL_PEAK_STEP(c2) PYACCEL_PEAK_STEP(c3)
    PYACCEL_PEAK_STEP(c4) PYACCEL_PEAK_STEP(c5) PYACCEL_PEAK_STEP(c6) PYACCEL_PEAK_STEP(c7)
    PYACCEL_PEAK_STEP(c8) PYACCEL_PEAK_STEP(c9) PYACCEL_PEAK_STEP(c10) PYACCEL_PEAK_STEP(c11)
    PYACCEL_PEAK_STEP(c12) PYACCEL_PEAK_STEP(c13) PYACCEL_PEAK_STEP(c14) PYACCEL_PEAK_STEP(c15)
#undef PYACCEL_PEAK_STEP
  }
  __asm__ volatile("" ::"v"(c0), "v"(c1), "v"(c2), "v"(c3), "v"(c4), "v"(c5), "v"(c6), "v"(c7));
  __asm__ volatile("" ::"v"(c8), "v"(c9), "v"(c10), "v"(c11), "v"(c12), "v"(c13), "v"(c14), "v"(c15));
  return iters * 16 * 64 * 2;
}

}  // namespace peak
}  // namespace pyaccel
