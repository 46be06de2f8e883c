// BSR int8 GEMM, AVX-512 VNNI: tiles of MR rows x a chunk of V 16-channel
// vectors of one block row (V = 4, 3, 2, 1 with MR = 6, 8, 8, 12). Per group
// of 4 inputs of a block: V weight loads, MR dword broadcasts of uint8
// activations, MR * V vpdpbusd. Accumulators start at -comp (the uint8 offset
// of the kept weights) and end in int8_gemm's dequantization epilogue.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "block_sparse/block_sparse.h"
#include "int8_gemm/epilogue_avx512.h"

namespace pyaccel {
namespace block_sparse {
namespace {

inline int32_t load32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

template <int R, int V>
inline void tile(const GemmArgsI8& g, int64_t m, int64_t r, int ch0) {
  __m512i acc[R][V];
  const int32_t* comp = g.comp + r * g.bh_pad + ch0;
  for (int v = 0; v < V; ++v) {
    const __m512i c = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(comp + 16 * v));
    for (int i = 0; i < R; ++i) acc[i][v] = c;
  }
  const int8_t* a0 = g.a + m * g.lda;
  const int64_t groups = g.bw4 / 4;
  for (int64_t b = g.rowptr[r]; b < g.rowptr[r + 1]; ++b) {
    const int8_t* w = g.blocks + b * g.bw4 * g.bh_pad + ch0 * 4;
    const int8_t* ac = a0 + g.colk[b];
    for (int64_t q = 0; q < groups; ++q) {
      __m512i wv[V];
      for (int v = 0; v < V; ++v) wv[v] = _mm512_loadu_si512(w + (q * g.bh_pad + 16 * v) * 4);
      for (int i = 0; i < R; ++i) {
        const __m512i a = _mm512_set1_epi32(load32(ac + i * g.lda + 4 * q));
        for (int v = 0; v < V; ++v) acc[i][v] = _mm512_dpbusd_epi32(acc[i][v], a, wv[v]);
      }
    }
  }
  const int64_t n0 = r * g.bh + ch0;
  int8_gemm::GemmArgs e{};
  e.w_scale = g.w_scale;
  e.bias = g.bias;
  e.c = g.y;
  e.ldc = g.ldy;
  e.c_bf16 = g.y_bf16;
  e.n = std::min<int64_t>(r * g.bh + g.bh, g.n);  // the channels of this block row that exist
  for (int v = 0; v < V; ++v) {
    if (n0 + 16 * v >= e.n) break;
    for (int i = 0; i < R; ++i) int8_gemm::avx512::store16(e, acc[i][v], g.a_scale[m + i], m + i, n0 + 16 * v);
  }
}

template <int MR, int V>
inline void rows_of_chunk(const GemmArgsI8& g, int64_t m0, int64_t m1, int64_t r, int ch0) {
  int64_t m = m0;
  for (; m + MR <= m1; m += MR) tile<MR, V>(g, m, r, ch0);
  switch (m1 - m) {
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

}  // namespace

void qs8_bsr_gemm_avx512vnni(const GemmArgsI8& g, int64_t m0, int64_t m1, int64_t r0, int64_t r1) {
  // rows of activations per chunk: ~256 KiB, so a chunk stays in L2 across block rows
  const int64_t mc = std::max<int64_t>(24, (int64_t(256) << 10) / std::max<int64_t>(1, g.lda) / 24 * 24);
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
