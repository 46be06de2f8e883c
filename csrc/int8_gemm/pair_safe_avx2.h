// The AVX2 pair-safe paths' residual side (int8_gemm.h, PsHeader), shared by
// the dense int8 kernel (qs8_gemm_4x16c4ps_avx2.cpp) and the 2:4 int8 one
// (sparse24/qs8_s24_gemm_4x16_avx2.cpp): activations transposed to byte
// columns once a row pass, residual sums per panel and row chunk. Include only
// from sources compiled with the AVX2 flags.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/packed_header.h"
#include "common/parallel.h"
#include "common/row_passes.h"
#include "common/transpose_avx2.h"
#include "int8_gemm/int8_gemm.h"

namespace pyaccel {
namespace int8_gemm {
namespace pair_safe {

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
    for (int i = 0; i < 4; ++i) {  // a[h + i]: rows 4i .. 4i+3 of k h .. h+3; a[h + 4 + i]: of k h+4 .. h+7
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
// column-major: ut[k * ldt + m] (GemmArgs::ut, ldt a multiple of 16; rows up
// to the next multiple of 16 repeat the last one).
inline void transpose_rows(const int8_t* q, int64_t lda, int64_t rows, int64_t k_pad, uint8_t* ut, int64_t ldt) {
  for (int64_t b0 = 0; b0 * 16 < rows; b0 += 4) {
    const int64_t b1 = std::min<int64_t>(b0 + 4, (rows + 15) / 16);
    const int8_t* r[4][16];
    for (int64_t b = b0; b < b1; ++b)
      for (int i = 0; i < 16; ++i) r[b - b0][i] = q + (16 * b + std::min<int64_t>(i, rows - 16 * b - 1)) * lda;
    int64_t k = 0;
    for (; k + 32 <= k_pad; k += 32)
      for (int64_t b = b0; b < b1; ++b) transpose16x32(r[b - b0], k, ut + 16 * b, ldt);
    for (; k < k_pad; ++k)
      for (int64_t b = b0; b < b1; ++b)
        for (int i = 0; i < 16; ++i) ut[k * ldt + 16 * b + i] = static_cast<uint8_t>(r[b - b0][i][k]);
  }
}

// Residual sums of NB 16-row blocks from row mb (ut's column index) for the
// 8 channels c0 .. c0 + 7 into t[j][2 * b + h]: channel c0 + j, rows mb + 16 b
// + 2 i + h in lane i (vpmaddwd with (r, 0) takes the even rows of an int16
// vector, with (0, r) the odd ones). With pf_end > 0 (one 16-row block, NB =
// 1) each entry also prefetches (into L1) the column of the entry
// kResidualPfAhead places on, up to entry pf_end - 1 (the panel's last).
constexpr int64_t kResidualPfAhead = 8;
template <int NB>
inline void group_residuals(const Residuals& res, const uint8_t* ut, int64_t ldt, int64_t mb, int64_t c0, __m256i t[8][8],
                            int64_t pf_end = 0) {
  for (int j = 0; j < 8; ++j) {
    __m256i acc[2 * NB];
    for (int v = 0; v < 2 * NB; ++v) acc[v] = _mm256_setzero_si256();
    for (int32_t e = res.lane[c0 + j]; e < res.lane[c0 + j + 1]; ++e) {
      const __m256i r_even = _mm256_set1_epi32(res.er[e]), r_odd = _mm256_slli_epi32(r_even, 16);
      const uint8_t* x = ut + static_cast<int64_t>(res.ek[e]) * ldt + mb;
      if (NB == 1 && pf_end > 0) {
        const int64_t ahead = std::min<int64_t>(e + kResidualPfAhead, pf_end - 1);
        _mm_prefetch(reinterpret_cast<const char*>(ut + static_cast<int64_t>(res.ek[ahead]) * ldt + mb), _MM_HINT_T0);
      }
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
// the Panel channels from c_first: corr[(m - m0) * Panel + c] = sum over
// channel c_first + c's entries of u[m, k] * r.
template <int Panel>
inline void panel_residuals(const Residuals& res, const uint8_t* ut, int64_t ldt, int64_t m0, int64_t m1,
                     int64_t c_first, int32_t* corr) {
  for (int64_t mb = m0; mb < m1; mb += 64) {
    const int nb = static_cast<int>(std::min<int64_t>(4, (m1 - mb + 15) / 16));
    for (int cg = 0; cg < Panel / 8; ++cg) {
      const int64_t c0 = c_first + cg * 8;
      // the columns' lines the entries read (the other core may hold them):
      // one 16-row block, each entry prefetches a later entry's; more, the
      // next channel group's, before this group runs
      if (nb > 1 && cg + 1 < Panel / 8) {
        for (int32_t e = res.lane[c0 + 8]; e < res.lane[c0 + 16]; ++e) {
          const uint8_t* x = ut + static_cast<int64_t>(res.ek[e]) * ldt + mb;
          _mm_prefetch(reinterpret_cast<const char*>(x), _MM_HINT_T0);
          if (nb > 1 && ((reinterpret_cast<uintptr_t>(x) + 16 * nb - 1) >> 6) != (reinterpret_cast<uintptr_t>(x) >> 6))
            _mm_prefetch(reinterpret_cast<const char*>(x) + 16 * nb - 1, _MM_HINT_T0);
        }
      }
      __m256i t[8][8];
      switch (nb) {
        case 1: group_residuals<1>(res, ut, ldt, mb, c0, t, res.lane[c_first + Panel]); break;
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
          if (m < m1) _mm256_storeu_ps(reinterpret_cast<float*>(corr + (m - m0) * Panel + cg * 8), rows[i]);
        }
      }
    }
  }
}

// A section's residual entries and split weights (offsets from its PsHeader).
struct Section {
  Residuals res;
  const uint8_t* panels;
  int64_t panel_order;  // PsHeader::panel_order
};
inline Section section_of(const uint8_t* sec) {
  PsHeader ps;
  std::memcpy(&ps, sec, sizeof(ps));
  return {{reinterpret_cast<const int32_t*>(sec + ps.lane_offset), reinterpret_cast<const int32_t*>(sec + ps.ek_offset),
           reinterpret_cast<const int32_t*>(sec + ps.er_offset)},
          sec + ps.panels_offset, ps.panel_order};
}

// The calling thread's transposed activations (one buffer for every driver
// and pass kind: an inline function's thread_local is one object program-wide).
inline std::vector<uint8_t>& ut_buffer() {
  thread_local std::vector<uint8_t> v;
  return v;
}

// The pair-safe drivers' activation side: x [m, k] quantized per row (u = q +
// a_zero, q in [-qmax, qmax], into k_pad columns: 0x80 and 127 for the 8-bit
// paths, 0x40 and 63 for the 7-bit quad-safe one) and transposed to byte columns, in row passes of
// <= ~8 MiB (each row: its bytes, its transposed copy and panel_width int32
// residual sums); gemm(q, q_scale, lda, ut, ldt, r0, rows) then runs the
// pass. Threads quantize and transpose whole 64-row blocks (no cache line of
// the transposed copy written by two threads).
template <typename Gemm>
void transposed_passes(QuantizeRowsFn quantize, uint8_t a_zero, int qmax, const void* x, int64_t ldx, bool x_bf16,
                       int64_t m, int64_t k, int64_t k_pad, int64_t panel_width, int nthreads, const Gemm& gemm) {
  std::vector<uint8_t>& t_ut = ut_buffer();
  const int64_t lda = a_stride(k_pad);
  const size_t xsize = x_bf16 ? 2 : 4;
  const int64_t grain = round_up(std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1)), 64);  // >= ~16K values
  for_each_row_pass(m, lda + k_pad + 4 * panel_width, kRowPassBytes, 64, [&](int64_t r0, int64_t r1) {
    // a pass one thread transposes alone (rows <= grain: parallel_for's one
    // chunk) keeps its columns 16-row padded; threads that share one write
    // whole 64-row blocks of columns 64 bytes apart (no line of ut written by two)
    const int64_t rows = r1 - r0, ldt = round_up(rows, rows <= grain ? 16 : 64);
    const QuantScratch s = quant_scratch(rows, lda);
    if (t_ut.size() < static_cast<size_t>(ldt * k_pad)) t_ut.resize(ldt * k_pad);
    uint8_t* ut = t_ut.data();
    const void* xr = static_cast<const char*>(x) + r0 * ldx * xsize;
    parallel_for(rows, grain, nthreads, [&](int64_t a0, int64_t a1) {
      quantize(xr, ldx, x_bf16, a0, a1, k, k_pad, lda, a_zero, qmax, s.q, s.scale);
      transpose_rows(s.q + a0 * lda, lda, a1 - a0, k_pad, ut + a0, ldt);
    });
    gemm(s.q, s.scale, lda, static_cast<const uint8_t*>(ut), ldt, r0, rows);
  });
}

// One row pass of affine_passes as an item sees it: the pass's quantized rows
// (q, qs, lda; rows [0, rows) are the call's rows [r0, r0 + rows)) and the
// transposed bytes of the item's chunk, indexed by the pass row as the
// residual code expects: ut[k * ldt + m] (ut points below the chunk's own
// buffer by its first row).
struct PassView {
  const int8_t* q;
  const float* qs;
  int64_t lda;
  const uint8_t* ut;
  int64_t ldt, r0, rows;
};

// Rows per thread from which affine_passes splits a pass by rows.
constexpr int64_t kAffineMinRows = 64;

// transposed_passes for many rows: in each pass, one row chunk per thread
// (multiples of 16 rows, balanced), each with its own transposed copy. A
// thread quantizes and transposes its chunk, then runs the chunk's items --
// item(view, unit, a0, a1) for every unit of [0, units) x sub-chunk of about
// 64 rows, unit-major -- and then takes what is left of the other chunks'
// items. Quiet cores thus read only rows they wrote themselves (the residual
// sums' lines, the tiles' rows); a slow thread's items still go to the other.
// No barrier and no waiting: a thread takes items only from chunks already
// prepared. Returns false (nothing done) when the passes would have fewer
// than kAffineMinRows rows a thread: callers then use transposed_passes.
template <typename Item>
bool affine_passes(QuantizeRowsFn quantize, uint8_t a_zero, int qmax, const void* x, int64_t ldx, bool x_bf16, int64_t m, int64_t k,
                   int64_t k_pad, int64_t panel_width, int64_t units, int nthreads, const Item& item) {
  const int nt = effective_threads(nthreads);
  const int64_t lda = a_stride(k_pad);
  const int64_t row_bytes = lda + k_pad + 4 * panel_width;
  // (a short last pass is split all the same)
  if (nt < 2 || units < 1 || m <= 0 ||
      std::min(m, row_pass_rows(m, row_bytes, kRowPassBytes, 16)) < kAffineMinRows * nt)
    return false;
  std::vector<uint8_t>& t_ut = ut_buffer();
  const size_t xsize = x_bf16 ? 2 : 4;
  for_each_row_pass(m, row_bytes, kRowPassBytes, 16, [&](int64_t r0, int64_t r1) {
    const int64_t rows = r1 - r0;
    // chunk c of parallel_row_chunks' split keeps its transposed copy at
    // ut_off[c], ldt of its own rows rounded to 64
    std::vector<int64_t> ut_off(nt + 1, 0);
    for (int c = 0; c < nt; ++c)
      ut_off[c + 1] =
          ut_off[c] + round_up(row_chunk_start(rows, 16, nt, c + 1) - row_chunk_start(rows, 16, nt, c), 64) * k_pad;
    const QuantScratch s = quant_scratch(rows, lda);
    if (t_ut.size() < static_cast<size_t>(ut_off[nt])) t_ut.resize(ut_off[nt]);
    uint8_t* const ut = t_ut.data();
    const void* xr = static_cast<const char*>(x) + r0 * ldx * xsize;
    std::vector<int64_t> first(nt, 0), ldt(nt, 64);  // each chunk's first row and ldt, set by its prep
    parallel_row_chunks(
        rows, 16, units, 64, nt,
        [&](int c, int64_t a0, int64_t a1) {
          first[c] = a0;
          ldt[c] = round_up(a1 - a0, 64);
          quantize(xr, ldx, x_bf16, a0, a1, k, k_pad, lda, a_zero, qmax, s.q, s.scale);
          transpose_rows(s.q + a0 * lda, lda, a1 - a0, k_pad, ut + ut_off[c], ldt[c]);
        },
        [&](int c, int64_t u, int64_t a0, int64_t a1) {
          item(PassView{s.q, s.scale, lda, ut + ut_off[c] - first[c], ldt[c], r0, rows}, u, a0, a1);
        });
  });
  return true;
}

}  // namespace pair_safe
}  // namespace int8_gemm
}  // namespace pyaccel
