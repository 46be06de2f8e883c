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
#include "common/transpose_avx2.h"
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

// The residual entries of a packing (PsHeader).
struct Residuals {
  const int32_t *lane, *ek, *er;
};

// 16 rows (r[i] + k) x 32 bytes -> dst[(k + j) * ldt + i], j < 32: a 16 x 16
// byte transpose in each 128-bit lane (4 rounds of unpacks: the low lane
// holds k .. k + 15, the high lane k + 16 .. k + 31).
inline void transpose16x32(const int8_t* const r[16], int64_t k, uint8_t* dst, int64_t ldt) {
  __m256i a[16], t[16];
  for (int i = 0; i < 16; ++i) a[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r[i] + k));
  for (int i = 0; i < 8; ++i) {  // t[i]: (row 2i, 2i+1) byte pairs of k 0-7; t[i + 8]: of k 8-15
    t[i] = _mm256_unpacklo_epi8(a[2 * i], a[2 * i + 1]);
    t[i + 8] = _mm256_unpackhi_epi8(a[2 * i], a[2 * i + 1]);
  }
  for (int h = 0; h < 16; h += 8)
    for (int i = 0; i < 4; ++i) {  // a[h/2 + i]: rows 4i .. 4i+3 of k h/2 .. h/2+3; a[h/2 + 4 + i]: of k h/2+4 ..
      a[h + i] = _mm256_unpacklo_epi16(t[h + 2 * i], t[h + 2 * i + 1]);
      a[h + 4 + i] = _mm256_unpackhi_epi16(t[h + 2 * i], t[h + 2 * i + 1]);
    }
  for (int q = 0; q < 16; q += 4)
    for (int i = 0; i < 2; ++i) {  // t[q + i]: rows 8i .. 8i+7 of k q, q+1; t[q + 2 + i]: of k q+2, q+3
      t[q + i] = _mm256_unpacklo_epi32(a[q + 2 * i], a[q + 2 * i + 1]);
      t[q + 2 + i] = _mm256_unpackhi_epi32(a[q + 2 * i], a[q + 2 * i + 1]);
    }
  for (int q = 0; q < 16; q += 4) {
    const __m256i col[4] = {_mm256_unpacklo_epi64(t[q], t[q + 1]), _mm256_unpackhi_epi64(t[q], t[q + 1]),
                            _mm256_unpacklo_epi64(t[q + 2], t[q + 3]), _mm256_unpackhi_epi64(t[q + 2], t[q + 3])};
    for (int j = 0; j < 4; ++j) {  // col[j]: the 16 rows of k + q + j (low lane) and of k + 16 + q + j (high)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (k + q + j) * ldt), _mm256_castsi256_si128(col[j]));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (k + 16 + q + j) * ldt), _mm256_extracti128_si256(col[j], 1));
    }
  }
}

// Rows [0, rows) of encoded activations (row stride lda) -> their bytes,
// column-major: ut[k * ldt + m] (GemmArgs::ut, ldt a multiple of 64; rows up
// to the next multiple of 16 repeat the last one).
void transpose_rows(const int8_t* q, int64_t lda, int64_t rows, int64_t k_pad, uint8_t* ut, int64_t ldt) {
  for (int64_t b = 0; b * 16 < rows; ++b) {
    const int8_t* r[16];
    for (int i = 0; i < 16; ++i) r[i] = q + (16 * b + std::min<int64_t>(i, rows - 16 * b - 1)) * lda;
    uint8_t* dst = ut + 16 * b;
    int64_t k = 0;
    for (; k + 32 <= k_pad; k += 32) transpose16x32(r, k, dst, ldt);
    for (; k < k_pad; ++k) {
      for (int i = 0; i < 16; ++i) dst[k * ldt + i] = static_cast<uint8_t>(r[i][k]);
    }
  }
}

// Residual sums of NB 16-row blocks from row mb (ut's column index) for the
// 8 channels c0 .. c0 + 7 into t[j][2 * b + h]: channel c0 + j, rows mb + 16 b
// + 2 i + h in lane i (vpmaddwd with (r, 0) takes the even rows of an int16
// vector, with (0, r) the odd ones).
template <int NB>
void group_residuals(const Residuals& res, const uint8_t* ut, int64_t ldt, int64_t mb, int64_t c0, __m256i t[8][8]) {
  for (int j = 0; j < 8; ++j) {
    __m256i acc[2 * NB];
    for (int v = 0; v < 2 * NB; ++v) acc[v] = _mm256_setzero_si256();
    for (int32_t e = res.lane[c0 + j]; e < res.lane[c0 + j + 1]; ++e) {
      const __m256i r_even = _mm256_set1_epi32(res.er[e]), r_odd = _mm256_slli_epi32(r_even, 16);
      const uint8_t* x = ut + static_cast<int64_t>(res.ek[e]) * ldt + mb;
      for (int b = 0; b < NB; ++b) {
        const __m256i u = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + 16 * b)));
        acc[2 * b] = _mm256_add_epi32(acc[2 * b], _mm256_madd_epi16(u, r_even));
        acc[2 * b + 1] = _mm256_add_epi32(acc[2 * b + 1], _mm256_madd_epi16(u, r_odd));
      }
    }
    for (int v = 0; v < 2 * NB; ++v) t[j][v] = acc[v];
  }
}

// Residual sums of rows [m0, m1) (m0 a multiple of 16, ut's column index) x
// panel p's 64 channels: corr[(m - m0) * 64 + c] = sum over channel 64p + c's
// entries of u[m, k] * r.
void panel_residuals(const Residuals& res, const uint8_t* ut, int64_t ldt, int64_t m0, int64_t m1, int64_t p,
                     int32_t* corr) {
  for (int64_t mb = m0; mb < m1; mb += 64) {
    const int nb = static_cast<int>(std::min<int64_t>(4, (m1 - mb + 15) / 16));
    for (int cg = 0; cg < kPanel / 8; ++cg) {
      const int64_t c0 = p * kPanel + cg * 8;
      __m256i t[8][8];
      switch (nb) {
        case 1: group_residuals<1>(res, ut, ldt, mb, c0, t); break;
        case 2: group_residuals<2>(res, ut, ldt, mb, c0, t); break;
        case 3: group_residuals<3>(res, ut, ldt, mb, c0, t); break;
        default: group_residuals<4>(res, ut, ldt, mb, c0, t); break;
      }
      for (int v = 0; v < 2 * nb; ++v) {
        __m256 rows[8];
        for (int j = 0; j < 8; ++j) rows[j] = _mm256_castsi256_ps(t[j][v]);
        transpose8x8(rows);  // rows[i]: row mb + 16 (v / 2) + 2 i + v % 2, channels c0 .. c0 + 7
        for (int i = 0; i < 8; ++i) {
          const int64_t m = mb + 16 * (v / 2) + 2 * i + v % 2;
          if (m < m1) _mm256_storeu_ps(reinterpret_cast<float*>(corr + (m - m0) * kPanel + cg * 8), rows[i]);
        }
      }
    }
  }
}

thread_local std::vector<int32_t> t_corr;
thread_local std::vector<uint8_t> t_ut;

// Rows [m0, m1) (m0 a multiple of 16) x panels [p0, p1) on the pair-safe panels.
void gemm_ps(const GemmArgs& g0, const Residuals& res, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  const int64_t groups = g0.k_pad / kKGroup;
  if (t_corr.size() < static_cast<size_t>((m1 - m0) * kPanel)) t_corr.resize((m1 - m0) * kPanel);
  GemmArgs g = g0;
  // finish() indexes corr by the absolute row m
  g.corr = reinterpret_cast<const int32_t*>(reinterpret_cast<uintptr_t>(t_corr.data()) - m0 * kPanel * 4);
  for (int64_t p = p0; p < p1; ++p) {
    panel_residuals(res, g.ut, g.ldt, m0, m1, p, t_corr.data());
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
  PsHeader ps;
  std::memcpy(&ps, packed + h.ps_offset, sizeof(ps));
  const uint8_t* sec = packed + h.ps_offset;
  const Residuals res{reinterpret_cast<const int32_t*>(sec + ps.lane_offset),
                      reinterpret_cast<const int32_t*>(sec + ps.ek_offset),
                      reinterpret_cast<const int32_t*>(sec + ps.er_offset)};
  const int64_t k_pad = h.k_pad, lda = a_stride(k_pad);
  const size_t xsize = x_bf16 ? 2 : 4, ysize = y_bf16 ? 2 : 4;
  // >= ~16K values per thread, in whole 64-row blocks of the transposed copy
  // (no cache line of it written by two threads)
  const int64_t grain = round_up(std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1)), 64);
  for_each_row_pass(m, lda + k_pad, kRowPassBytes, 64, [&](int64_t r0, int64_t r1) {
    const int64_t rows = r1 - r0, ldt = round_up(rows, 64);
    const QuantScratch s = quant_scratch(rows, lda);
    if (t_ut.size() < static_cast<size_t>(ldt * k_pad)) t_ut.resize(ldt * k_pad);
    uint8_t* ut = t_ut.data();
    const void* xr = static_cast<const char*>(x) + r0 * ldx * xsize;
    parallel_for(rows, grain, nthreads, [&](int64_t a0, int64_t a1) {
      kern.quantize(xr, ldx, x_bf16, a0, a1, k, k_pad, lda, 0x80, kQmax8, s.q, s.scale);
      transpose_rows(s.q + a0 * lda, lda, a1 - a0, k_pad, ut + a0, ldt);
    });
    GemmArgs g{s.q, lda, s.scale, reinterpret_cast<const int8_t*>(sec + ps.panels_offset),
               reinterpret_cast<const int32_t*>(packed + h.comp_offset), w_scale, bias,
               static_cast<char*>(y) + r0 * ldy * ysize, ldy, y_bf16, rows, h.n, k_pad};
    g.ut = ut;
    g.ldt = ldt;
    parallel_units_rows(h.n_pad / kPanel, rows, 16, nthreads,
                        [&](int64_t p, int64_t a0, int64_t a1) { gemm_ps(g, res, a0, a1, p, p + 1); });
  });
}

}  // namespace int8_gemm
}  // namespace pyaccel
