// 2:4 int8 GEMM, AVX2: 4 rows x 16 channels (half a panel, as two halves of 8).
// Gather as in the VNNI kernel (vpshufb with per-channel control dwords),
// multiply with int8_gemm's AVX2 sign trick: |a| x (v with a's sign), so the
// int16 pair sums of vpmaddubsw never saturate.
#include <immintrin.h>

#include <cstring>

#include "int8_gemm/int8_gemm.h"  // fp32_to_bf16
#include "sparse24/sparse24_int8.h"

namespace pyaccel {
namespace sparse24_int8 {
namespace {

// 8 channels' position dwords (pos_dw >> 8 j holds pair j's byte in bits 0-7)
// -> 8 vpshufb control dwords [i0, i1, 4 + j0, 4 + j1].
inline __m256i control8(__m256i t) {
  __m256i c = _mm256_and_si256(t, _mm256_set1_epi32(3));
  c = _mm256_or_si256(c, _mm256_and_si256(_mm256_slli_epi32(t, 6), _mm256_set1_epi32(0x300)));
  c = _mm256_or_si256(c, _mm256_and_si256(_mm256_slli_epi32(t, 12), _mm256_set1_epi32(0x30000)));
  c = _mm256_or_si256(c, _mm256_and_si256(_mm256_slli_epi32(t, 18), _mm256_set1_epi32(0x3000000)));
  return _mm256_or_si256(c, _mm256_set1_epi32(0x04040000));
}

inline void store8(const GemmArgs& g, __m256i acc, float sa, int64_t m, int64_t n0) {
  alignas(32) int32_t t[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(t), acc);
  for (int i = 0; i < 8 && n0 + i < g.n; ++i)
    int8_gemm::store_output(g.y, g.ldy, g.y_bf16, g.bias, m, n0 + i,
                            static_cast<float>(t[i]) * (sa * g.w_scale[n0 + i]));
}

template <int MR>
inline void tile(const GemmArgs& g, int64_t m, int64_t p, int half) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i c[MR][2];
  for (int r = 0; r < MR; ++r) c[r][0] = c[r][1] = _mm256_setzero_si256();
  const uint8_t* b = g.w + p * g.quads * kQuadBytes + 64 * half;  // channels 16 * half ..
  for (int64_t qb = 0; qb < g.quads; ++qb, b += kQuadBytes) {
    const __m256i pos0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + kQuadPosOffset));
    const __m256i pos1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + kQuadPosOffset + 32));
#pragma GCC unroll 4
    for (int j = 0; j < kQuadPairs; ++j) {
      const uint8_t* bj = b + kQuadValOffset + j * kPairBytes;
      const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bj));
      const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bj + 32));
      const __m128i sh = _mm_cvtsi32_si128(8 * j);
      const __m256i k0 = control8(_mm256_srl_epi32(pos0, sh)), k1 = control8(_mm256_srl_epi32(pos1, sh));
#pragma GCC unroll 4
      for (int r = 0; r < MR; ++r) {
        int64_t a8;
        std::memcpy(&a8, g.a + (m + r) * g.lda + kQuadInputs * qb + 8 * j, 8);
        const __m256i ab = _mm256_set1_epi64x(a8);
        const __m256i x0 = _mm256_shuffle_epi8(ab, k0), x1 = _mm256_shuffle_epi8(ab, k1);
        const __m256i p0 = _mm256_maddubs_epi16(_mm256_abs_epi8(x0), _mm256_sign_epi8(v0, x0));
        const __m256i p1 = _mm256_maddubs_epi16(_mm256_abs_epi8(x1), _mm256_sign_epi8(v1, x1));
        c[r][0] = _mm256_add_epi32(c[r][0], _mm256_madd_epi16(p0, ones));
        c[r][1] = _mm256_add_epi32(c[r][1], _mm256_madd_epi16(p1, ones));
      }
    }
  }
  for (int r = 0; r < MR; ++r) {
    store8(g, c[r][0], g.a_scale[m + r], m + r, p * kPanel + 16 * half);
    store8(g, c[r][1], g.a_scale[m + r], m + r, p * kPanel + 16 * half + 8);
  }
}

}  // namespace

void qs8_s24_gemm_4x16_avx2(const GemmArgs& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    for (int half = 0; half < 2 && p * kPanel + 16 * half < g.n; ++half)
      int8_gemm::for_each_row_tile<4>(m0, m1, [&](int64_t m, auto h) { tile<h()>(g, m, p, half); });
  }
}

}  // namespace sparse24_int8
}  // namespace pyaccel
