// int8 GEMM, AVX2, 8-bit activations on pair-safe weights: the exact 8-bit
// result at the 3-instruction budget of vpmaddubsw + vpmaddwd + vpaddd.
//
// vpmaddubsw multiplies unsigned bytes by signed ones and adds adjacent pairs
// with int16 saturation. With u = q + 128 in [1, 255] (the VNNI kernels'
// encoding) and any int8 weights a pair sum can reach 2 * 255 * 127 and
// saturate -- why the plain 8-bit AVX2 kernel multiplies int16 (4
// instructions per 32 products). The packer splits w = s + r (PsHeader,
// int8_gemm.h): in s every pair's same-sign magnitudes sum to at most 128, so
// u0 * s0 + u1 * s1 lies in [-32640, 32640] and the 4x16 tile of the 7-bit
// kernel (qs8_gemm_avx2_tile.h) multiplies s exactly; the sparse residual r
// (one entry per offending pair) is multiplied separately, per panel, from
// the activations transposed to columns: per entry and 16 rows one
// vpmovzxbw, two vpmaddwd (r in the low / high int16 of the broadcast: the
// even / odd rows' exact products) and two vpaddd. The tile's epilogue adds the
// residual sums and subtracts comp = 128 * sum_k w, leaving sum_k q * w
// exactly, the integer every other kernel computes.
#include <algorithm>
#include <vector>

#include "common/packed_header.h"
#include "int8_gemm/pair_safe_avx2.h"
#include "int8_gemm/qs8_gemm_avx2_tile.h"

namespace pyaccel {
namespace int8_gemm {
namespace {

struct PsStep {
  static constexpr int64_t kRowPathRows = 0;  // linear() keeps the few-row calls on the int16 kernel's row path
  static constexpr int kTileRows = 4;         // the step's temporary and ones leave room for 8 accumulators
  static __m256i weights(const int8_t* b) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)); }
  static void step(__m256i& c, __m256i w, __m256i u, const int8_t*, __m256i ones) {
    avx2_tile::maddubs_step(c, w, u, ones);
  }
  // acc + residual sums - 128 * sum_k w for row m, channels [n0, n0 + 8).
  static __m256i finish(const GemmArgs& g, __m256i acc, int64_t m, int64_t n0) {
    const __m256i comp = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g.comp + n0));
    const __m256i corr = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g.corr + m * kPanel + n0 % kPanel));
    return _mm256_sub_epi32(_mm256_add_epi32(acc, corr), comp);
  }
};

using pair_safe::Residuals;

thread_local std::vector<int32_t> t_corr;

// Rows [m0, m1) (m0 a multiple of 16) x panels [p0, p1) on the pair-safe panels.
void gemm_ps(const GemmArgs& g0, const Residuals& res, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  const int64_t groups = g0.k_pad / kKGroup;
  if (t_corr.size() < static_cast<size_t>((m1 - m0) * kPanel)) t_corr.resize((m1 - m0) * kPanel);
  GemmArgs g = g0;
  // finish() indexes corr by the absolute row m
  g.corr = reinterpret_cast<const int32_t*>(reinterpret_cast<uintptr_t>(t_corr.data()) - m0 * kPanel * 4);
  for (int64_t p = p0; p < p1; ++p) {
    pair_safe::panel_residuals<kPanel>(res, g.ut, g.ldt, m0, m1, p * kPanel, t_corr.data());
    const int8_t* panel = g.w + p * groups * kPanel * kKGroup;
    avx2_tile::NextPanelLines pf(g, panel, p);
    for (int s = 0; s < kPanel / 16; ++s) {
      const int64_t n0 = p * kPanel + 16 * s;
      if (n0 >= g.n) break;
      const int8_t* sub = panel + 16 * s * kKGroup;
      for_each_row_tile<PsStep::kTileRows>(
          m0, m1, [&](int64_t m, auto h) { avx2_tile::tile<PsStep, h()>(g, m, sub, n0, pf.take()); });
    }
  }
}

}  // namespace

void linear_ps_avx2(const Kernel& kern, const void* x, int64_t ldx, bool x_bf16, int64_t m, int64_t k,
                    const uint8_t* packed, const float* w_scale, const float* bias, void* y, int64_t ldy,
                    bool y_bf16, int nthreads) {
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
    return g;
  };
  if (pair_safe::affine_passes(kern.quantize, 0x80, kQmax8, x, ldx, x_bf16, m, k, h.k_pad, kPanel, h.n_pad / kPanel, nthreads,
                               [&](const pair_safe::PassView& v, int64_t p, int64_t a0, int64_t a1) {
                                 gemm_ps(pass_args(v.q, v.qs, v.lda, v.ut, v.ldt, v.r0, v.rows), sec.res, a0, a1, p,
                                         p + 1);
                               }))
    return;
  pair_safe::transposed_passes(
      kern.quantize, 0x80, kQmax8, x, ldx, x_bf16, m, k, h.k_pad, kPanel, nthreads,
      [&](const int8_t* q, const float* qs, int64_t lda, const uint8_t* ut, int64_t ldt, int64_t r0, int64_t rows) {
        const GemmArgs g = pass_args(q, qs, lda, ut, ldt, r0, rows);
        parallel_units_rows(h.n_pad / kPanel, rows, 16, nthreads,
                            [&](int64_t p, int64_t a0, int64_t a1) { gemm_ps(g, sec.res, a0, a1, p, p + 1); });
      });
}

}  // namespace int8_gemm
}  // namespace pyaccel
