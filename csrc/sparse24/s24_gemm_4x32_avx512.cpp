// 2:4 sparse GEMM, AVX-512: 4 rows x 32 channels (two 16-channel panels).
//
// Per group of 4 inputs and row: the 4 x values are broadcast to every
// 128-bit lane (vbroadcastf32x4), so the in-lane vpermilps with the position
// byte as control (only its low 2 bits count) picks x[4g + i0] for each of the
// 16 channels; the byte >> 2 picks x[4g + i1].
// Two FMAs then add x[i0]*v0 + x[i1]*v1: 2 FMAs + 2 permutes replace the 4
// FMAs of a dense 4 x 16 step. Per row the x[i0] terms and the x[i1] terms
// go to two accumulators, added at the end: a row's result is then the same
// whatever the tile height (so whichever thread split a call's rows get), and
// one or two rows do not wait on a chain of two dependent FMAs per group.
// 16 accumulators + 4 values + 4 indices + x. Measured on Zen 4 against the
// former 6-row tile (one accumulator a row from 3 rows): 0.97 - 1.10x at
// M = 1 - 15 on 4096^2, 1024x4096, 1536x384, 384x1536.
#include <immintrin.h>

#include "int8_gemm/epilogue_avx512.h"  // cvt_fp32_bf16; with int8_gemm.h: for_each_row_tile
#include "sparse24/sparse24.h"

namespace pyaccel {
namespace sparse24 {
namespace {

inline void store16(const GemmArgs& g, __m512 v, int64_t m, int64_t n0) {
  const int64_t left = g.n - n0;
  if (left <= 0) return;
  const __mmask16 mask = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
  if (g.bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, g.bias + n0));
  if (g.y_bf16)
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(g.y) + m * g.ldy + n0, mask, int8_gemm::avx512::cvt_fp32_bf16(v));
  else
    _mm512_mask_storeu_ps(static_cast<float*>(g.y) + m * g.ldy + n0, mask, v);
}

#define S24_ROW(r)                                                            \
  if constexpr (MR > r) {                                                     \
    const __m512 xb = _mm512_broadcast_f32x4(_mm_loadu_ps(x##r + 4 * gi));    \
    c##r##0 = _mm512_fmadd_ps(_mm512_permutevar_ps(xb, i00), v00, c##r##0);  \
    c##r##1 = _mm512_fmadd_ps(_mm512_permutevar_ps(xb, i01), v01, c##r##1);  \
    d##r##0 = _mm512_fmadd_ps(_mm512_permutevar_ps(xb, i10), v10, d##r##0);  \
    d##r##1 = _mm512_fmadd_ps(_mm512_permutevar_ps(xb, i11), v11, d##r##1);  \
  }
#define S24_STORE(r)                                                          \
  if constexpr (MR > r) {                                                     \
    store16(g, _mm512_add_ps(c##r##0, d##r##0), m + r, n0);                   \
    if (two) store16(g, _mm512_add_ps(c##r##1, d##r##1), m + r, n0 + kPanel); \
  }

// rows [m, m + MR) x panels p and p + 1 (p + 1 only when `two`)
template <int MR>
inline void tile(const GemmArgs& g, int64_t m, int64_t p, bool two) {
  const int64_t blocks = g.groups_pad / kBlockGroups;
  static_assert(MR >= 1 && MR <= 4, "tiles of 1 - 4 rows");
  __m512 c00 = _mm512_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
  __m512 d00 = c00, d01 = c00, d10 = c00, d11 = c00, d20 = c00, d21 = c00, d30 = c00, d31 = c00;
  const float* x0 = g.x + m * g.ldx;
  const float* x1 = x0 + g.ldx;
  const float* x2 = x1 + g.ldx;
  const float* x3 = x2 + g.ldx;
  const uint8_t* b0 = g.w + p * blocks * kBlockBytes;
  // a missing second panel re-reads the first (results discarded)
  const uint8_t* b1 = two ? b0 + blocks * kBlockBytes : b0;
  for (int64_t b = 0; b < blocks; ++b, b0 += kBlockBytes, b1 += kBlockBytes) {
#pragma GCC unroll 4
    for (int j = 0; j < kBlockGroups; ++j) {
      const int64_t gi = b * kBlockGroups + j;
      const __m512i i00 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b0 + pos_at(j))));
      const __m512i i01 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b1 + pos_at(j))));
      const __m512 v00 = _mm512_loadu_ps(b0 + v0_at(j));
      const __m512 v10 = _mm512_loadu_ps(b0 + v1_at(j));
      const __m512 v01 = _mm512_loadu_ps(b1 + v0_at(j));
      const __m512 v11 = _mm512_loadu_ps(b1 + v1_at(j));
      const __m512i i10 = _mm512_srli_epi32(i00, 2);
      const __m512i i11 = _mm512_srli_epi32(i01, 2);
      S24_ROW(0) S24_ROW(1) S24_ROW(2) S24_ROW(3)
    }
  }
  const int64_t n0 = p * kPanel;
  S24_STORE(0) S24_STORE(1) S24_STORE(2) S24_STORE(3)
}

}  // namespace

void s24_gemm_4x32_avx512(const GemmArgs& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; p += 2) {
    const bool two = p + 1 < p1;
    int8_gemm::for_each_row_tile<4>(m0, m1, [&](int64_t m, auto h) { tile<h()>(g, m, p, two); });
  }
}

}  // namespace sparse24
}  // namespace pyaccel
