// BSR fp32 GEMM, AVX2 + FMA: tiles of 6 rows x 16 channels (two ymm) of one
// block row: 12 accumulators, 2 weight vectors and a broadcast fit the 16 ymm
// registers. Rows of x are visited in L2-sized chunks, as on AVX-512.
#include <immintrin.h>

#include <algorithm>

#include "block_sparse/block_sparse.h"

namespace pyaccel {
namespace block_sparse {
namespace {

inline void store8(const GemmArgs& g, __m256 v, int64_t m, int64_t n0, int valid) {
  alignas(32) float t[8];
  _mm256_store_ps(t, v);
  for (int i = 0; i < valid; ++i) store_scalar(g, m, n0 + i, t[i]);
}

template <int R>
inline void tile(const GemmArgs& g, int64_t m, int64_t r, int ch0) {
  __m256 acc[R][2];
  for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  const float* x0 = g.x + m * g.ldx;
  for (int64_t b = g.rowptr[r]; b < g.rowptr[r + 1]; ++b) {
    const int64_t c = g.colk[b];
    const int jn = static_cast<int>(std::min<int64_t>(g.bw, g.k - c));
    const float* w = g.blocks + b * g.bw * g.bh_pad + ch0;
    const float* xc = x0 + c;
    for (int j = 0; j < jn; ++j) {
      const __m256 w0 = _mm256_loadu_ps(w + j * g.bh_pad), w1 = _mm256_loadu_ps(w + j * g.bh_pad + 8);
      for (int i = 0; i < R; ++i) {
        const __m256 a = _mm256_broadcast_ss(xc + i * g.ldx + j);
        acc[i][0] = _mm256_fmadd_ps(a, w0, acc[i][0]);
        acc[i][1] = _mm256_fmadd_ps(a, w1, acc[i][1]);
      }
    }
  }
  const int64_t n0 = r * g.bh + ch0, end = std::min<int64_t>(r * g.bh + g.bh, g.n);
  for (int v = 0; v < 2; ++v) {
    const int64_t nv = n0 + 8 * v;
    if (nv >= end) break;
    const int valid = static_cast<int>(std::min<int64_t>(8, end - nv));
    for (int i = 0; i < R; ++i) {
      if (valid == 8 && !g.y_bf16) {
        __m256 o = acc[i][v];
        if (g.bias) o = _mm256_add_ps(o, _mm256_loadu_ps(g.bias + nv));
        _mm256_storeu_ps(static_cast<float*>(g.y) + (m + i) * g.ldy + nv, o);
      } else {
        store8(g, acc[i][v], m + i, nv, valid);
      }
    }
  }
}

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
