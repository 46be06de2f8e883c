// The driver shared by the AVX2 paths on split weights (w = s + r, a
// PsHeader section): the 8-bit pair-safe one (qs8_gemm_4x16c4ps_avx2.cpp)
// and the 7-bit quad-safe one (qs8_gemm_4x16c4qs_avx2.cpp). They differ only
// in the activation encoding and the 4 x 16 tile over s. Include only from
// sources compiled with the AVX2 flags.
#pragma once
#include <cstring>
#include <vector>

#include "common/packed_header.h"
#include "int8_gemm/pair_safe_avx2.h"
#include "int8_gemm/qs8_gemm_avx2_tile.h"

namespace pyaccel {
namespace int8_gemm {
namespace split_linear {

// The calling thread's residual sums of one panel (one buffer program-wide).
inline std::vector<int32_t>& corr_buffer() {
  thread_local std::vector<int32_t> v;
  return v;
}

// Of the row tiles over one quarter, the first kPfSpreadTiles (rounded down
// to a power of 2) each prefetch an equal share of the next quarter; the rest
// re-touch their own quarter.
constexpr int64_t kPfSpreadTiles = 8;

// Rows [m0, m1) (m0 a multiple of 16) x panels [p0, p1) on the section's
// panels: per panel its residual sums (GemmArgs::corr, indexed by the
// absolute row), then tile(g, m, h, sub, n0, pf) over its 16-channel quarters
// in TileRows-row tiles (h: for_each_row_tile's row count constant). In
// kPsQuarters order (g.w_quarters) a quarter and the next one (on into the
// next panel) are contiguous, and the quarter's row tiles share the stream
// that pulls the next one into L2: with T tiles (T a power of 2 up to
// kPfSpreadTiles), tile t prefetches its t-th T-th, 64 / T bytes per k group,
// so the stream runs the whole time the quarter computes rather than
// during its first tile only (NR64K4 order: each tile prefetches the whole
// next quarter, avx2_tile::next_quarter_lines).
template <int TileRows, typename Tile>
void gemm(const GemmArgs& g0, const pair_safe::Residuals& res, int64_t m0, int64_t m1, int64_t p0, int64_t p1,
          const Tile& tile) {
  const int64_t groups = g0.k_pad / kKGroup;
  const int64_t n_pad16 = (g0.n + 15) / 16 * 16;
  std::vector<int32_t>& corr = corr_buffer();
  if (corr.size() < static_cast<size_t>((m1 - m0) * kPanel)) corr.resize((m1 - m0) * kPanel);
  GemmArgs g = g0;
  g.corr = reinterpret_cast<const int32_t*>(reinterpret_cast<uintptr_t>(corr.data()) - m0 * kPanel * 4);
  for (int64_t p = p0; p < p1; ++p) {
    pair_safe::panel_residuals<kPanel>(res, g.ut, g.ldt, m0, m1, p * kPanel, corr.data());
    const int8_t* panel = g.w + p * groups * kPanel * kKGroup;
    for (int s = 0; s < kPanel / 16; ++s) {
      const int64_t n0 = p * kPanel + 16 * s;
      if (n0 >= g.n) break;
      if (!g.w_quarters) {
        const int8_t* sub = panel + 16 * s * kKGroup;
        const int8_t* pf = avx2_tile::next_quarter_lines(g, panel, p, s);
        for_each_row_tile<TileRows>(m0, m1, [&](int64_t m, auto h) { tile(g, m, h, sub, n0, pf); });
        continue;
      }
      const int64_t qbytes = 16 * g.k_pad;
      const int8_t* sub = panel + s * qbytes;
      // the next quarter; after the layer's last one, none (the tiles re-touch their own)
      const bool next = n0 + 16 < n_pad16;
      const int64_t tiles = (m1 - m0 + TileRows - 1) / TileRows;
      int64_t share = 1;
      while (next && share * 2 <= tiles && share * 2 <= kPfSpreadTiles) share *= 2;
      int64_t t = 0;
      for_each_row_tile<TileRows>(m0, m1, [&](int64_t m, auto h) {
        GemmArgs gt = g;
        const bool streams = next && t < share;
        gt.pf_step = streams ? 64 / share : 64;
        tile(gt, m, h, sub, n0, streams ? sub + qbytes + t * (qbytes / share) : sub);
        ++t;
      });
    }
  }
}

// Whole linear on a packing with a section: activations quantized with
// (a_zero, qmax) and transposed (pair_safe::affine_passes from 64 rows a
// thread, else transposed_passes), then gemm_rows(g, res, m0, m1, p0, p1)
// over panels x row chunks.
template <typename GemmRows>
void linear(QuantizeRowsFn quantize, uint8_t a_zero, int qmax, const void* x, int64_t ldx, bool x_bf16, int64_t m,
            int64_t k, const uint8_t* packed, const float* w_scale, const float* bias, void* y, int64_t ldy,
            bool y_bf16, int nthreads, const GemmRows& gemm_rows) {
  PackedHeader h;
  std::memcpy(&h, packed, sizeof(h));
  const pair_safe::Section sec = pair_safe::section_of(packed + h.ps_offset);
  const size_t ysize = y_bf16 ? 2 : 4;
  auto pass_args = [&](const int8_t* q, const float* qs, int64_t lda, const uint8_t* ut, int64_t ldt, int64_t r0,
                       int64_t rows) {
    GemmArgs g{q, lda, qs, reinterpret_cast<const int8_t*>(sec.panels),
               reinterpret_cast<const int32_t*>(packed + h.comp_offset), w_scale, bias,
               static_cast<char*>(y) + r0 * ldy * ysize, ldy, y_bf16, rows, h.n, h.k_pad};
    g.ut = ut;
    g.ldt = ldt;
    g.w_quarters = sec.panel_order == kPsQuarters;
    return g;
  };
  if (pair_safe::affine_passes(quantize, a_zero, qmax, x, ldx, x_bf16, m, k, h.k_pad, kPanel, h.n_pad / kPanel,
                               nthreads, [&](const pair_safe::PassView& v, int64_t p, int64_t a0, int64_t a1) {
                                 gemm_rows(pass_args(v.q, v.qs, v.lda, v.ut, v.ldt, v.r0, v.rows), sec.res, a0, a1,
                                           p, p + 1);
                               }))
    return;
  pair_safe::transposed_passes(
      quantize, a_zero, qmax, x, ldx, x_bf16, m, k, h.k_pad, kPanel, nthreads,
      [&](const int8_t* q, const float* qs, int64_t lda, const uint8_t* ut, int64_t ldt, int64_t r0, int64_t rows) {
        const GemmArgs g = pass_args(q, qs, lda, ut, ldt, r0, rows);
        parallel_units_rows(h.n_pad / kPanel, rows, 16, nthreads,
                            [&](int64_t p, int64_t a0, int64_t a1) { gemm_rows(g, sec.res, a0, a1, p, p + 1); });
      });
}

}  // namespace split_linear
}  // namespace int8_gemm
}  // namespace pyaccel
