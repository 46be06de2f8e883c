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
  if (left >= 8 && !g.y_bf16) {  // the common case: one vector add and store
    const __m256 b = g.bias ? _mm256_loadu_ps(g.bias + n0) : _mm256_setzero_ps();
    _mm256_storeu_ps(static_cast<float*>(g.y) + m * g.ldy + n0, g.bias ? _mm256_add_ps(v, b) : v);
    return;
  }
  const int cnt = left >= 8 ? 8 : static_cast<int>(left);
  alignas(32) float t[8];
  _mm256_store_ps(t, v);
  for (int i = 0; i < cnt; ++i) int8_gemm::store_output(g.y, g.ldy, g.y_bf16, g.bias, m, n0 + i, t[i]);
}

template <int MR>
inline void tile(const GemmArgs& g, int64_t m, int64_t p, int half) {
  const int64_t blocks = g.groups_pad / kBlockGroups;
  // per row: c sums the first kept weights' products, d the second ones', as
  // tile_row does, so a row's result is the same whichever path and tile
  // height a call's rows (or a thread's share of them) take
  __m256 c[MR], d[MR];
  for (int r = 0; r < MR; ++r) c[r] = d[r] = _mm256_setzero_ps();
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
        d[r] = _mm256_fmadd_ps(_mm256_permutevar_ps(xb, i1), v1, d[r]);
      }
    }
  }
  for (int r = 0; r < MR; ++r) store8(g, _mm256_add_ps(c[r], d[r]), m + r, p * kPanel + 8 * half);
}

// Up to this many rows the row path wins (measured, Zen 4 capped at AVX2,
// interleaved with the 4-row tile: 1.14 - 2.0x at 1 row, 1.14 - 1.23x at 2;
// 0.82 - 1.12x at 4 - 16 rows, where the tile's reuse of x across rows wins).
constexpr int64_t kRowPathRows = kAvx2RowPathRows;

// One row x the whole 16-channel panel: the block's bytes in address order
// (the tile above reads half of every line per pass, two passes per panel),
// and four independent FMA chains instead of one.
inline void tile_row(const GemmArgs& g, int64_t m, int64_t p) {
  const int64_t blocks = g.groups_pad / kBlockGroups;
  __m256 c0 = _mm256_setzero_ps(), c1 = c0, d0 = c0, d1 = c0;
  const uint8_t* blk = g.w + p * blocks * kBlockBytes;
  const float* x = g.x + m * g.ldx;
  for (int64_t b = 0; b < blocks; ++b, blk += kBlockBytes) {
#pragma GCC unroll 4
    for (int j = 0; j < kBlockGroups; ++j) {
      const __m256 xb = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(x + 4 * (b * kBlockGroups + j)));
      const __m256i i0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + pos_at(j))));
      const __m256i k0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + pos_at(j) + 8)));
      const float* v0 = reinterpret_cast<const float*>(blk + v0_at(j));
      const float* v1 = reinterpret_cast<const float*>(blk + v1_at(j));
      c0 = _mm256_fmadd_ps(_mm256_permutevar_ps(xb, i0), _mm256_loadu_ps(v0), c0);
      c1 = _mm256_fmadd_ps(_mm256_permutevar_ps(xb, k0), _mm256_loadu_ps(v0 + 8), c1);
      d0 = _mm256_fmadd_ps(_mm256_permutevar_ps(xb, _mm256_srli_epi32(i0, 2)), _mm256_loadu_ps(v1), d0);
      d1 = _mm256_fmadd_ps(_mm256_permutevar_ps(xb, _mm256_srli_epi32(k0, 2)), _mm256_loadu_ps(v1 + 8), d1);
    }
  }
  store8(g, _mm256_add_ps(c0, d0), m, p * kPanel);
  store8(g, _mm256_add_ps(c1, d1), m, p * kPanel + 8);
}

}  // namespace

void s24_gemm_4x8_avx2(const GemmArgs& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  if (m1 - m0 <= kRowPathRows) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t m = m0; m < m1; ++m) tile_row(g, m, p);
    return;
  }
  for (int64_t p = p0; p < p1; ++p) {
    for (int half = 0; half < 2; ++half) {
      if (p * kPanel + 8 * half >= g.n) break;
      int8_gemm::for_each_row_tile<4>(m0, m1, [&](int64_t m, auto h) { tile<h()>(g, m, p, half); });
    }
  }
}

}  // namespace sparse24
}  // namespace pyaccel
