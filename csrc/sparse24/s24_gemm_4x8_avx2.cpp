// 2:4 sparse GEMM, AVX2: 4 rows x 8 channels (half a 16-channel panel).
// The 4 x values are repeated in both 128-bit halves; the in-lane vpermilps
// uses the low 2 bits of the position byte, picking x[4g + i0], and byte >> 2
// picks x[4g + i1].
#include <immintrin.h>

#include <cstring>

#include "int8_gemm/int8_gemm.h"  // fp32_to_bf16
#include "sparse24/sparse24.h"

namespace pyaccel {
namespace sparse24 {
namespace {

inline void store8(const GemmArgs& g, __m256 v, int64_t m, int64_t n0) {
  const int64_t left = g.n - n0;
  if (left <= 0) return;
  const int cnt = left >= 8 ? 8 : static_cast<int>(left);
  alignas(32) float t[8];
  _mm256_store_ps(t, v);
  for (int i = 0; i < cnt; ++i) int8_gemm::store_output(g.y, g.ldy, g.y_bf16, g.bias, m, n0 + i, t[i]);
}

template <int MR>
inline void tile(const GemmArgs& g, int64_t m, int64_t p, int half) {
  const int64_t blocks = g.groups_pad / kBlockGroups;
  __m256 c[MR];
  for (int r = 0; r < MR; ++r) c[r] = _mm256_setzero_ps();
  const uint8_t* blk = g.w + p * blocks * kBlockBytes;
  for (int64_t b = 0; b < blocks; ++b, blk += kBlockBytes) {
#pragma GCC unroll 4
    for (int j = 0; j < kBlockGroups; ++j) {
      const int64_t gi = b * kBlockGroups + j;
      int64_t pos8;
      std::memcpy(&pos8, blk + pos_at(j) + 8 * half, 8);
      const __m256 v0 = _mm256_loadu_ps(reinterpret_cast<const float*>(blk + v0_at(j)) + 8 * half);
      const __m256 v1 = _mm256_loadu_ps(reinterpret_cast<const float*>(blk + v1_at(j)) + 8 * half);
      const __m256i i0 = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(pos8));
      const __m256i i1 = _mm256_srli_epi32(i0, 2);
#pragma GCC unroll 4
      for (int r = 0; r < MR; ++r) {
        const __m256 xb = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(g.x + (m + r) * g.ldx + 4 * gi));
        c[r] = _mm256_fmadd_ps(_mm256_permutevar_ps(xb, i0), v0, c[r]);
        c[r] = _mm256_fmadd_ps(_mm256_permutevar_ps(xb, i1), v1, c[r]);
      }
    }
  }
  for (int r = 0; r < MR; ++r) store8(g, c[r], m + r, p * kPanel + 8 * half);
}

}  // namespace

void s24_gemm_4x8_avx2(const GemmArgs& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    for (int half = 0; half < 2; ++half) {
      if (p * kPanel + 8 * half >= g.n) break;
      int8_gemm::for_each_row_tile<4>(m0, m1, [&](int64_t m, auto h) { tile<h()>(g, m, p, half); });
    }
  }
}

}  // namespace sparse24
}  // namespace pyaccel
