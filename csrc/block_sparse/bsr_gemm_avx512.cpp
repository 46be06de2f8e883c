// BSR fp32 GEMM, AVX-512: tiles of MR rows x a chunk of V 16-channel vectors
// of one block row (V = 4, 3, 2, 1 with MR = 6, 8, 8, 12: at most 24
// accumulators). Per input j of a block: V weight loads, MR broadcasts of x
// from memory, MR * V FMAs. Rows of x are visited in chunks that stay in L2
// while every block row of the range passes over them.
#include <immintrin.h>

#include <algorithm>

#include "block_sparse/block_sparse.h"
#include "common/bf16_avx512.h"

namespace pyaccel {
namespace block_sparse {
namespace {

inline void store16(const GemmArgs& g, __m512 v, int64_t m, int64_t n0, int valid) {
  const __mmask16 mask = valid >= 16 ? __mmask16(0xffff) : __mmask16((1u << valid) - 1);
  if (g.bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, g.bias + n0));
  if (g.y_bf16) {
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(g.y) + m * g.ldy + n0, mask, cvt_fp32_bf16_avx512(v));
  } else {
    _mm512_mask_storeu_ps(static_cast<float*>(g.y) + m * g.ldy + n0, mask, v);
  }
}

// Rows [m, m + R) x channels [ch0, ch0 + 16 V) of block row r.
template <int R, int V>
inline void tile(const GemmArgs& g, int64_t m, int64_t r, int ch0) {
  __m512 acc[R][V];
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < V; ++v) acc[i][v] = _mm512_setzero_ps();
  const int64_t b0 = g.rowptr[r], b1 = g.rowptr[r + 1];
  const float* x0 = g.x + m * g.ldx;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t c = g.colk[b];
    const int jn = static_cast<int>(std::min<int64_t>(g.bw, g.k - c));
    const float* w = g.blocks + b * g.bw * g.bh_pad + ch0;
    const float* xc = x0 + c;
    for (int j = 0; j < jn; ++j) {
      __m512 wv[V];
      for (int v = 0; v < V; ++v) wv[v] = _mm512_loadu_ps(w + j * g.bh_pad + 16 * v);
      for (int i = 0; i < R; ++i) {
        const __m512 a = _mm512_set1_ps(xc[i * g.ldx + j]);
        for (int v = 0; v < V; ++v) acc[i][v] = _mm512_fmadd_ps(a, wv[v], acc[i][v]);
      }
    }
  }
  const int64_t n0 = r * g.bh + ch0;
  const int64_t end = std::min<int64_t>(r * g.bh + g.bh, g.n);  // channels of this block row that exist
  for (int v = 0; v < V; ++v) {
    const int64_t nv = n0 + 16 * v;
    if (nv >= end) break;
    const int valid = static_cast<int>(std::min<int64_t>(16, end - nv));
    for (int i = 0; i < R; ++i) store16(g, acc[i][v], m + i, nv, valid);
  }
}

template <int MR, int V>
inline void rows_of_chunk(const GemmArgs& g, int64_t m0, int64_t m1, int64_t r, int ch0) {
  int64_t m = m0;
  for (; m + MR <= m1; m += MR) tile<MR, V>(g, m, r, ch0);
  const int64_t left = m1 - m;
  if constexpr (MR > 1) {
    if (left > 0) {
      // the remainder, one smaller tile (R = left)
      switch (left) {
#define PYACCEL_BSR_CASE(R) \
  case R:                   \
    if constexpr (R < MR) tile<R, V>(g, m, r, ch0); \
    break;
        PYACCEL_BSR_CASE(1) PYACCEL_BSR_CASE(2) PYACCEL_BSR_CASE(3) PYACCEL_BSR_CASE(4) PYACCEL_BSR_CASE(5)
        PYACCEL_BSR_CASE(6) PYACCEL_BSR_CASE(7) PYACCEL_BSR_CASE(8) PYACCEL_BSR_CASE(9) PYACCEL_BSR_CASE(10)
        PYACCEL_BSR_CASE(11)
#undef PYACCEL_BSR_CASE
        default:
          break;
      }
    }
  }
}

}  // namespace

void bsr_gemm_avx512(const GemmArgs& g, int64_t m0, int64_t m1, int64_t r0, int64_t r1) {
  // rows of x per chunk: ~256 KiB of x, so a chunk stays in L2 across block rows
  const int64_t mc = std::max<int64_t>(12, (int64_t(256) << 10) / std::max<int64_t>(1, 4 * g.k) / 24 * 24);
  for (int64_t ma = m0; ma < m1; ma += mc) {
    const int64_t mb = std::min(m1, ma + mc);
    for (int64_t r = r0; r < r1; ++r) {
      int ch = 0;
      for (; ch + 64 <= g.bh_pad; ch += 64) rows_of_chunk<6, 4>(g, ma, mb, r, ch);
      switch (g.bh_pad - ch) {
        case 48: rows_of_chunk<8, 3>(g, ma, mb, r, ch); break;
        case 32: rows_of_chunk<8, 2>(g, ma, mb, r, ch); break;
        case 16: rows_of_chunk<12, 1>(g, ma, mb, r, ch); break;
        default: break;
      }
    }
  }
}

}  // namespace block_sparse
}  // namespace pyaccel
