// int8 GEMM micro-kernel, AVX-512 VNNI: 6 rows x 64 channels, 4 k per step.
//
// vpdpbusd multiplies uint8 by int8, so activations arrive as q ^ 0x80
// (= q + 128, see a_xor in dispatch.cpp) and the epilogue subtracts
// comp[n] = 128 * sum_k w[n, k]. 24 zmm accumulators + 4 weight registers +
// 1 broadcast: 29 of 32 registers. No saturation: each vpdpbusd lane adds 4
// products of at most 255*127; int32 overflows only past k ~ 66 000.
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
  __m512i acc[MR][4];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_si512();
  const int8_t* a = g.a + m * g.lda;
  const int8_t* b = panel;
  for (int64_t grp = 0; grp < groups; ++grp, b += kPanel * kKGroup) {
    const __m512i b0 = _mm512_loadu_si512(b);
    const __m512i b1 = _mm512_loadu_si512(b + 64);
    const __m512i b2 = _mm512_loadu_si512(b + 128);
    const __m512i b3 = _mm512_loadu_si512(b + 192);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      int32_t a4;
      std::memcpy(&a4, a + r * g.lda + grp * kKGroup, 4);
      const __m512i av = _mm512_set1_epi32(a4);
      acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], av, b0);
      acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], av, b1);
      acc[r][2] = _mm512_dpbusd_epi32(acc[r][2], av, b2);
      acc[r][3] = _mm512_dpbusd_epi32(acc[r][3], av, b3);
    }
  }
  const int32_t* comp = g.comp + p * kPanel;
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    const float sa = g.a_scale[m + r];
    for (int j = 0; j < 4; ++j) {
      const __m512i v = _mm512_sub_epi32(acc[r][j], _mm512_loadu_si512(comp + 16 * j));
      avx512::store16(g, v, sa, m + r, p * kPanel + 16 * j);
    }
  }
}

}  // namespace

void qs8_gemm_6x64c4_avx512vnni(const GemmArgs& g, int64_t m0, int64_t m1, int64_t p0,
                                int64_t p1) {
  const int64_t groups = g.k_pad / kKGroup;
  for (int64_t p = p0; p < p1; ++p) {
    const int8_t* panel = g.w + p * groups * kPanel * kKGroup;
    int64_t m = m0;
    for (; m + 6 <= m1; m += 6) tile<6>(g, m, panel, p);
    switch (m1 - m) {
      case 5: tile<5>(g, m, panel, p); break;
      case 4: tile<4>(g, m, panel, p); break;
      case 3: tile<3>(g, m, panel, p); break;
      case 2: tile<2>(g, m, panel, p); break;
      case 1: tile<1>(g, m, panel, p); break;
      default: break;
    }
  }
}

}  // namespace int8_gemm
}  // namespace pyaccel
