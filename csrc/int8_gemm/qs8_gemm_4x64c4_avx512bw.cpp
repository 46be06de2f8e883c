// int8 GEMM micro-kernel, AVX-512 BW without VNNI: 4 rows x 64 channels.
//
// vpmaddubsw (uint8 x int8 -> saturating int16 pairs) is exact only if each
// pair sum stays below 32768, so activations stay signed: |a| goes in the
// unsigned operand and a's sign is moved onto the weight (negate where a < 0).
// Pair sums are then at most 2*127*127 = 32258. vpmaddwd with ones widens to
// int32. 16 accumulators + 4 weights + temporaries.
#include <immintrin.h>

#include <cstring>

#include "int8_gemm/epilogue_avx512.h"
#include "int8_gemm/int8_gemm.h"

namespace pyaccel {
namespace int8_gemm {
namespace {

template <int MR>
inline void tile(const GemmArgs& g, int64_t m, const int8_t* panel, int64_t p) {
  const int64_t groups = g.k_pad / kKGroup;
  const __m512i ones = _mm512_set1_epi16(1);
  const __m512i zero = _mm512_setzero_si512();
  __m512i acc[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_si512();
  const int8_t* a = g.a + m * g.lda;
  const int8_t* b = panel;
  for (int64_t grp = 0; grp < groups; ++grp, b += kPanel * kKGroup) {
    __m512i bv[4];
    for (int j = 0; j < 4; ++j) bv[j] = _mm512_loadu_si512(b + 64 * j);
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      int32_t a4;
      std::memcpy(&a4, a + r * g.lda + grp * kKGroup, 4);
      const __m512i av = _mm512_set1_epi32(a4);
      const __m512i aabs = _mm512_abs_epi8(av);
      const __mmask64 neg = _mm512_movepi8_mask(av);
      for (int j = 0; j < 4; ++j) {
        const __m512i ws = _mm512_mask_sub_epi8(bv[j], neg, zero, bv[j]);
        const __m512i p16 = _mm512_maddubs_epi16(aabs, ws);
        acc[r][j] = _mm512_add_epi32(acc[r][j], _mm512_madd_epi16(p16, ones));
      }
    }
  }
  for (int r = 0; r < MR; ++r) {
    const float sa = g.a_scale[m + r];
    for (int j = 0; j < 4; ++j) avx512::store16(g, acc[r][j], sa, m + r, p * kPanel + 16 * j);
  }
}

}  // namespace

void qs8_gemm_4x64c4_avx512bw(const GemmArgs& g, int64_t m0, int64_t m1, int64_t p0,
                              int64_t p1) {
  const int64_t groups = g.k_pad / kKGroup;
  for (int64_t p = p0; p < p1; ++p) {
    const int8_t* panel = g.w + p * groups * kPanel * kKGroup;
    for_each_row_tile<4>(m0, m1, [&](int64_t m, auto h) { tile<h()>(g, m, panel, p); });
  }
}

}  // namespace int8_gemm
}  // namespace pyaccel
