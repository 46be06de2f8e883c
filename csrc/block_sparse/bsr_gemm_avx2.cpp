// BSR fp32 GEMM, AVX2 + FMA: tiles of 6 rows x 16 channels (two ymm) of one
// block row: 12 accumulators, 2 weight vectors and a broadcast fit the 16 ymm
// registers. Rows of x are visited in L2-sized chunks, as on AVX-512.
#include <immintrin.h>

#include <algorithm>

#include "block_sparse/block_sparse.h"

namespace pyaccel {
namespace block_sparse {
namespace {

// Accumulators are named variables (c<row><half>): with an array GCC kept
// them in memory and stored all 12 after every input.
#define PYACCEL_BSR_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)
template <int R>
inline void tile(const GemmArgs& g, int64_t m, int64_t r, int ch0) {
#define PYACCEL_BSR_DECL(i) __m256 c##i##0 = _mm256_setzero_ps(), c##i##1 = _mm256_setzero_ps();
  PYACCEL_BSR_ROWS(PYACCEL_BSR_DECL)
#undef PYACCEL_BSR_DECL
  const float* x0 = g.x + m * g.ldx;
  const int64_t ldx = g.ldx, ldw = g.bh_pad;
  for (int64_t b = g.rowptr[r]; b < g.rowptr[r + 1]; ++b) {
    const int64_t c = g.colk[b];
    const int64_t jn = std::min<int64_t>(g.bw, g.k - c);
    const float* w = g.blocks + b * g.bw * ldw + ch0;
    const float* xc = x0 + c;
    for (int64_t j = 0; j < jn; ++j, w += ldw) {
      const __m256 w0 = _mm256_loadu_ps(w), w1 = _mm256_loadu_ps(w + 8);
#define PYACCEL_BSR_FMA(i)                                   \
  if constexpr (R > i) {                                     \
    const __m256 a = _mm256_broadcast_ss(xc + i * ldx + j);  \
    c##i##0 = _mm256_fmadd_ps(a, w0, c##i##0);               \
    c##i##1 = _mm256_fmadd_ps(a, w1, c##i##1);               \
  }
      PYACCEL_BSR_ROWS(PYACCEL_BSR_FMA)
#undef PYACCEL_BSR_FMA
    }
  }
  // the sums leave the registers once, for the epilogue
  alignas(32) float res[R][16];
#define PYACCEL_BSR_OUT(i)                    \
  if constexpr (R > i) {                      \
    _mm256_store_ps(res[i], c##i##0);         \
    _mm256_store_ps(res[i] + 8, c##i##1);     \
  }
  PYACCEL_BSR_ROWS(PYACCEL_BSR_OUT)
#undef PYACCEL_BSR_OUT
  const int64_t n0 = r * g.bh + ch0, end = std::min<int64_t>(r * g.bh + g.bh, g.n);
  for (int v = 0; v < 2; ++v) {
    const int64_t nv = n0 + 8 * v;
    if (nv >= end) break;
    const int valid = static_cast<int>(std::min<int64_t>(8, end - nv));
    for (int i = 0; i < R; ++i) {
      if (valid == 8 && !g.y_bf16) {
        __m256 o = _mm256_load_ps(res[i] + 8 * v);
        if (g.bias) o = _mm256_add_ps(o, _mm256_loadu_ps(g.bias + nv));
        _mm256_storeu_ps(static_cast<float*>(g.y) + (m + i) * g.ldy + nv, o);
      } else {
        for (int l = 0; l < valid; ++l) store_scalar(g, m + i, nv + l, res[i][8 * v + l]);
      }
    }
  }
}

#undef PYACCEL_BSR_ROWS

}  // namespace

void bsr_gemm_avx2(const GemmArgs& g, int64_t m0, int64_t m1, int64_t r0, int64_t r1) {
  const int64_t mc = std::max<int64_t>(6, (int64_t(256) << 10) / std::max<int64_t>(1, 4 * g.k) / 6 * 6);
  for (int64_t ma = m0; ma < m1; ma += mc) {
    const int64_t mb = std::min(m1, ma + mc);
    for (int64_t r = r0; r < r1; ++r) {
      for (int ch = 0; ch < g.bh_pad && r * g.bh + ch < std::min<int64_t>(r * g.bh + g.bh, g.n); ch += 16) {
        int64_t m = ma;
        for (; m + 6 <= mb; m += 6) tile<6>(g, m, r, ch);
        switch (mb - m) {
          case 5: tile<5>(g, m, r, ch); break;
          case 4: tile<4>(g, m, r, ch); break;
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
