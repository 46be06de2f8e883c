// BSR int8 GEMM, AVX2: tiles of 4 rows x 16 channels (two ymm of 8 int32
// lanes) of one block row. Per group of 4 inputs: the sign trick
// (vpmaddubsw(|a|, sign(w, a)): pair sums <= 2 * 127 * 127 never saturate),
// vpmaddwd with ones, vpaddd. Signed activations: no offset to subtract.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "block_sparse/block_sparse.h"
#include "int8_gemm/int8_gemm.h"

namespace pyaccel {
namespace block_sparse {
namespace {

template <int R>
inline void tile(const GemmArgsI8& g, int64_t m, int64_t r, int ch0) {
  __m256i acc[R][2];
  for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* a0 = g.a + m * g.lda;
  const int64_t groups = g.bw4 / 4;
  for (int64_t b = g.rowptr[r]; b < g.rowptr[r + 1]; ++b) {
    const int8_t* w = g.blocks + b * g.bw4 * g.bh_pad + ch0 * 4;
    const int8_t* ac = a0 + g.colk[b];
    for (int64_t q = 0; q < groups; ++q) {
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + q * g.bh_pad * 4));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + q * g.bh_pad * 4 + 32));
      for (int i = 0; i < R; ++i) {
        int32_t a32;
        std::memcpy(&a32, ac + i * g.lda + 4 * q, 4);
        const __m256i a = _mm256_set1_epi32(a32), aa = _mm256_abs_epi8(a);
        acc[i][0] = _mm256_add_epi32(acc[i][0], _mm256_madd_epi16(_mm256_maddubs_epi16(aa, _mm256_sign_epi8(w0, a)), ones));
        acc[i][1] = _mm256_add_epi32(acc[i][1], _mm256_madd_epi16(_mm256_maddubs_epi16(aa, _mm256_sign_epi8(w1, a)), ones));
      }
    }
  }
  const int64_t end = std::min<int64_t>(r * g.bh + g.bh, g.n);
  for (int i = 0; i < R; ++i) {
    alignas(32) int32_t t[16];
    _mm256_store_si256(reinterpret_cast<__m256i*>(t), acc[i][0]);
    _mm256_store_si256(reinterpret_cast<__m256i*>(t + 8), acc[i][1]);
    const int8_gemm::ScaleSplit s = int8_gemm::split_scale(g.a_scale[m + i]);
    for (int c = 0; c < 16 && r * g.bh + ch0 + c < end; ++c) {
      const int64_t n = r * g.bh + ch0 + c;
      int8_gemm::store_output(g.y, g.ldy, g.y_bf16, g.bias, m + i, n,
                              (static_cast<float>(t[c]) * s.lo) * (s.hi * g.w_scale[n]));
    }
  }
}

}  // namespace

void qs8_bsr_gemm_avx2(const GemmArgsI8& g, int64_t m0, int64_t m1, int64_t r0, int64_t r1) {
  const int64_t mc = std::max<int64_t>(8, (int64_t(256) << 10) / std::max<int64_t>(1, g.lda) / 4 * 4);
  for (int64_t ma = m0; ma < m1; ma += mc) {
    const int64_t mb = std::min(m1, ma + mc);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t end = std::min<int64_t>(r * g.bh + g.bh, g.n);
      for (int ch = 0; ch < g.bh_pad && r * g.bh + ch < end; ch += 16) {
        int64_t m = ma;
        for (; m + 4 <= mb; m += 4) tile<4>(g, m, r, ch);
        switch (mb - m) {
          case 3: tile<3>(g, m, r, ch); break;
          case 2: tile<2>(g, m, r, ch); break;
          case 1: tile<1>(g, m, r, ch); break;
          default: break;
        }
      }
    }
  }
}

}  // namespace block_sparse
}  // namespace pyaccel
