// The AVX2 int8 GEMM tiles, shared by the AVX2 and AVX-VNNI kernels (include
// only from sources compiled with the AVX2 flags). A kernel supplies its multiply-add
// step as a policy S:
//   S::weights(b)                  weight register of the row tile (8 channels x 4 k)
//   S::step(c, wr, a, b, ones)     c += w * a for 8 channels x 4 k (a: broadcast activations)
//   S::row_a(a)                    per-k-group form of a row's activations (row path)
//   S::row_step(c, ra, b, ones)    row path: c += w(at b) * a
//   S::finish(g, acc, m, n0)       int32 correction of row m, channels [n0, n0 + 8), before
//                                  the epilogue (encoding offset, pair-safe correction)
//   S::kRowPathRows                calls of up to this many rows take the row path
//   S::kRowPathRowsHuge            the same on layers of >= kRowPathHugeWeights weights
//   S::kTileRows                   rows of the tile (4, or 6 where the step needs no
//                                  temporaries: 12 accumulators + 2 weights + 1 broadcast)
// qs8_gemm_4x16c4u7_avx2.cpp: 7-bit activations as q + 64, 3 instructions per step
// (both tiles).
// qs8_gemm_6x8c4_avx2.cpp: 8-bit activations; uses only tile_rows_kb (sign trick,
// 4 instructions per step) and has its own int16 tile for more rows.
// qs8_gemm_6x16c4_avxvnni.cpp: vpdpbusd, 1 instruction per step, 6-row tile.
#pragma once
#include <immintrin.h>

#include <cstring>

#include "common/row_tiles.h"
#include "common/tile_rows.h"
#include "int8_gemm/int8_gemm.h"

namespace pyaccel {
namespace int8_gemm {
namespace avx2_tile {

inline __m128i cvt_fp32_bf16(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x400000)), nan);
  r = _mm256_srli_epi32(r, 16);
  // pack 8 x u32 (< 65536) into 8 x u16
  const __m128i lo = _mm256_castsi256_si128(r), hi = _mm256_extracti128_si256(r, 1);
  return _mm_packus_epi32(lo, hi);
}

// c += w * u for 8 channels x 4 k with u unsigned (vpmaddubsw's first
// operand) and every int16 pair sum u0 * w0 + u1 * w1 in range (the caller's
// encoding guarantees it): vpmaddubsw + vpmaddwd + vpaddd, the 3-instruction
// budget. Inline asm: with the intrinsics GCC copies accumulators around the
// step; w in a register or in memory ("xm").
inline void maddubs_step(__m256i& c, const __m256i& w, __m256i u, __m256i ones) {
  __m256i t;
  __asm__(
      "vpmaddubsw %[w], %[u], %[t]\n\t"
      "vpmaddwd %[ones], %[t], %[t]\n\t"
      "vpaddd %[t], %[c], %[c]"
      : [c] "+x"(c), [t] "=&x"(t)
      : [w] "xm"(w), [u] "x"(u), [ones] "x"(ones));
}

// float(acc) * sa * w_scale (+ bias) for 8 channels, in split_scale's order
// without its multiplications by 1 (same results); vw, vb: the channels'
// scales and bias (vb read only when g.bias).
inline __m256 scale8(const GemmArgs& g, __m256i acc, float sa, __m256 vw, __m256 vb) {
  const __m256 a = _mm256_cvtepi32_ps(acc), vs = _mm256_set1_ps(sa);
  __m256 v = sa < 1.f ? _mm256_mul_ps(_mm256_mul_ps(a, vs), vw) : _mm256_mul_ps(a, _mm256_mul_ps(vs, vw));
  return g.bias ? _mm256_add_ps(v, vb) : v;
}

// store8 with the 8 channels' scales vw and bias vb already in registers
// (all 8 channels valid)
inline void store_full8(const GemmArgs& g, __m256i acc, float sa, __m256 vw, __m256 vb, int64_t m, int64_t n0) {
  const __m256 v = scale8(g, acc, sa, vw, vb);
  if (g.c_bf16)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(g.c) + m * g.ldc + n0), cvt_fp32_bf16(v));
  else
    _mm256_storeu_ps(static_cast<float*>(g.c) + m * g.ldc + n0, v);
}

// One row's 8 channels n0 .. (clipped to n): all 8 valid, straight vector
// loads of the scales and bias; fewer, through zero-padded copies.
inline void store8(const GemmArgs& g, __m256i acc, float sa, int64_t m, int64_t n0) {
  const int64_t left = g.n - n0;
  if (left <= 0) return;
  if (left >= 8) {
    const __m256 vb = g.bias ? _mm256_loadu_ps(g.bias + n0) : _mm256_setzero_ps();
    store_full8(g, acc, sa, _mm256_loadu_ps(g.w_scale + n0), vb, m, n0);
    return;
  }
  const int cnt = static_cast<int>(left);
  alignas(32) float ws[8] = {0}, bs[8] = {0};
  std::memcpy(ws, g.w_scale + n0, cnt * 4);
  if (g.bias) std::memcpy(bs, g.bias + n0, cnt * 4);
  const __m256 v = scale8(g, acc, sa, _mm256_load_ps(ws), _mm256_load_ps(bs));
  if (g.c_bf16) {
    alignas(16) uint16_t th[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(th), cvt_fp32_bf16(v));
    std::memcpy(static_cast<uint16_t*>(g.c) + m * g.ldc + n0, th, cnt * 2);
  } else {
    alignas(32) float tmp[8];
    _mm256_store_ps(tmp, v);
    std::memcpy(static_cast<float*>(g.c) + m * g.ldc + n0, tmp, cnt * 4);
  }
}

#define PYACCEL_AVX2_ROW_STEP(r)                                                          \
  if constexpr (MR > r) {                                                                 \
    const __m256i av = _mm256_set1_epi32(*reinterpret_cast<const int32_t*>(a##r + off)); \
    S::step(c##r##0, u0, av, b, ones);                                                    \
    S::step(c##r##1, u1, av, b + 32, ones);                                               \
  }
#define PYACCEL_AVX2_ROW_STORE(r)                                \
  if constexpr (MR > r) {                                        \
    const float sa = g.a_scale[m + r];                           \
    store8(g, S::finish(g, c##r##0, m + r, n0), sa, m + r, n0);         \
    store8(g, S::finish(g, c##r##1, m + r, n0 + 8), sa, m + r, n0 + 8); \
  }

// What the tiles of 16-channel quarter s of panel p pull into L2
// (prefetcht1), one line per k group as they go: the lines of the quarter
// read next (s + 1, or the next panel's first; the last panel re-touches its
// own), which are one cache line per k group, kPanel * kKGroup bytes apart.
// The tiles read a panel 64 of every 256 bytes at a time, which the hardware
// prefetchers follow poorly from L3 / DRAM. Prefetching one quarter ahead
// keeps two quarters (2 x 16 KiB per 1024 k) in L2 rather than two whole
// panels, which a 512 KiB L2 (Zen 2 / 3) does not hold at K = 4096.
inline const int8_t* next_quarter_lines(const GemmArgs& g, const int8_t* panel, int64_t p, int s) {
  if (s + 1 < kPanel / 16 && p * kPanel + 16 * (s + 1) < g.n) return panel + 16 * (s + 1) * kKGroup;
  return p + 1 < (g.n + kPanel - 1) / kPanel ? panel + g.k_pad * kPanel : panel;
}

// Rows [m, m + MR) x 16 channels (a quarter of a packed panel: 64 of every 256
// bytes per k group in NR64K4 order, 64 contiguous bytes per k group in a
// pair-safe section's kPsQuarters order, g.w_quarters), MR <= S::kTileRows. 8
// ymm accumulators + 2 weights + temporaries fit the 16 ymm registers (12 + 2
// + 1 at 6 rows). pf: what to pull into L2 (prefetcht1), one prefetch per k
// group, pf advancing g.pf_step bytes a group (0: as the weights).
template <class S, int MR>
inline void tile(const GemmArgs& g, int64_t m, const int8_t* sub, int64_t n0, const int8_t* pf) {
  const int64_t groups = g.k_pad / kKGroup;
  const __m256i ones = _mm256_set1_epi16(1);
  static_assert(MR <= S::kTileRows && S::kTileRows <= 6, "tile rows");
  __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,
          c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  PYACCEL_TILE_ROWS6(const int8_t, a, g.a + m * g.lda, g.lda);
  const int8_t* b = sub;
  const int64_t stride = g.w_quarters ? 16 * kKGroup : kPanel * kKGroup;
  const int64_t pf_step = g.pf_step ? g.pf_step : stride;
#pragma GCC unroll 2
  for (int64_t grp = 0; grp < groups; ++grp, b += stride, pf += pf_step) {
    const int64_t off = grp * kKGroup;
    _mm_prefetch(reinterpret_cast<const char*>(pf), _MM_HINT_T1);
    const __m256i u0 = S::weights(b), u1 = S::weights(b + 32);
    PYACCEL_AVX2_ROW_STEP(0) PYACCEL_AVX2_ROW_STEP(1) PYACCEL_AVX2_ROW_STEP(2) PYACCEL_AVX2_ROW_STEP(3)
    PYACCEL_AVX2_ROW_STEP(4) PYACCEL_AVX2_ROW_STEP(5)
  }
  PYACCEL_AVX2_ROW_STORE(0) PYACCEL_AVX2_ROW_STORE(1) PYACCEL_AVX2_ROW_STORE(2) PYACCEL_AVX2_ROW_STORE(3)
  PYACCEL_AVX2_ROW_STORE(4) PYACCEL_AVX2_ROW_STORE(5)
}
#undef PYACCEL_AVX2_ROW_STEP
#undef PYACCEL_AVX2_ROW_STORE

// Row path step: one row's 4 activations of k group grp (a: the row) times
// the panel's 64 channels at b, into the accumulators c0 .. c7.
#define PYACCEL_AVX2_PANEL_STEP(a, grp, b)                  \
  {                                                         \
    int32_t a4;                                             \
    std::memcpy(&a4, (a) + (grp) * kKGroup, 4);             \
    const auto ra = S::row_a(_mm256_set1_epi32(a4));        \
    S::row_step(c0, ra, (b), ones);                         \
    S::row_step(c1, ra, (b) + 32, ones);                    \
    S::row_step(c2, ra, (b) + 64, ones);                    \
    S::row_step(c3, ra, (b) + 96, ones);                    \
    S::row_step(c4, ra, (b) + 128, ones);                   \
    S::row_step(c5, ra, (b) + 160, ones);                   \
    S::row_step(c6, ra, (b) + 192, ones);                   \
    S::row_step(c7, ra, (b) + 224, ones);                   \
  }

// Rows [m0, m1) (at most kRowsKbMaxRows) x one whole panel, in k-blocks of
// kRowsKbGroups groups (16 KiB of the panel): each row's 8 accumulators run
// over the k-block in address order (PYACCEL_AVX2_PANEL_STEP); the rows
// after the first read it from L1; partial sums wait in `sums` between
// k-blocks. One software stream pulls the panel's bytes into L2 (prefetcht1)
// one k-block ahead, in address order and on into the next panel, spread
// over the rows' steps (4 lines a k group in all: row r of R issues 4 / R,
// the first rows one more where R does not divide 4; rows 4 - 7 of more than
// 4 issue none), so that the weights stream while every row computes. The
// quarter tiles (tile) read a panel 64 of every 256 bytes at a time, which
// L3 and DRAM serve slowly. Measured on Zen 3 (2 threads, 4096^2 / 1024x4096,
// interleaved with torch.ao, weights from DRAM): at 2 - 4 rows x1.00 - x1.12 /
// x1.19 - x1.54 of torch.ao, where on 4096^2 per-row passes over whole panels
// ran x0.73 - x0.94 and the pair-safe quarter tiles x0.58 - x0.71; Golden
// Cove, 4096^2 at 2 - 4 rows, weights from DRAM: AVX-VNNI 1.07 - 1.13 ms with
// the 6-row tile, 0.59 - 0.62 ms here (M = 1: 0.59 - 0.62).
constexpr int64_t kRowsKbGroups = 64;
constexpr int64_t kRowsKbMaxRows = 8;
constexpr int kPanelLinesPerGroup = static_cast<int>(kPanel * kKGroup / 64);  // 64-byte lines
static_assert(kPanelLinesPerGroup == 4, "tile_rows_kb issues 1, 2 or 4 lines a step");
template <class S>
inline void tile_rows_kb(const GemmArgs& g, int64_t m0, int64_t m1, const int8_t* panel, int64_t n0) {
  const int64_t groups = g.k_pad / kKGroup;
  const int64_t rows = m1 - m0;
  const __m256i ones = _mm256_set1_epi16(1);
  alignas(32) int32_t sums[kRowsKbMaxRows][kPanel];
  const char* pf = reinterpret_cast<const char*>(panel) + kRowsKbGroups * kPanel * kKGroup;
  for (int64_t kb = 0; kb < groups; kb += kRowsKbGroups) {
    const int64_t ke = kb + kRowsKbGroups < groups ? kb + kRowsKbGroups : groups;
    for (int64_t r = 0; r < rows; ++r) {
      __m256i* const sm = reinterpret_cast<__m256i*>(sums[r]);
      const __m256i z = _mm256_setzero_si256();
      __m256i c0 = kb ? _mm256_load_si256(sm) : z, c1 = kb ? _mm256_load_si256(sm + 1) : z,
              c2 = kb ? _mm256_load_si256(sm + 2) : z, c3 = kb ? _mm256_load_si256(sm + 3) : z,
              c4 = kb ? _mm256_load_si256(sm + 4) : z, c5 = kb ? _mm256_load_si256(sm + 5) : z,
              c6 = kb ? _mm256_load_si256(sm + 6) : z, c7 = kb ? _mm256_load_si256(sm + 7) : z;
      // this row's share of the group's lines
      const int lines = static_cast<int>(kPanelLinesPerGroup / rows + (r < kPanelLinesPerGroup % rows ? 1 : 0));
      const int8_t* const a = g.a + (m0 + r) * g.lda;
      const int8_t* b = panel + kb * kPanel * kKGroup;
      for (int64_t grp = kb; grp < ke; ++grp, b += kPanel * kKGroup, pf += 64 * lines) {
        if (lines > 0) _mm_prefetch(pf, _MM_HINT_T1);
        if (lines > 1) _mm_prefetch(pf + 64, _MM_HINT_T1);
        if (lines > 2) {
          _mm_prefetch(pf + 128, _MM_HINT_T1);
          _mm_prefetch(pf + 192, _MM_HINT_T1);
        }
        PYACCEL_AVX2_PANEL_STEP(a, grp, b)
      }
      const __m256i acc[8] = {c0, c1, c2, c3, c4, c5, c6, c7};
      if (ke < groups) {
        for (int v = 0; v < 8; ++v) _mm256_store_si256(sm + v, acc[v]);
      } else {
        const float sa = g.a_scale[m0 + r];
        for (int v = 0; v < 8; ++v) store8(g, S::finish(g, acc[v], m0 + r, n0 + 8 * v), sa, m0 + r, n0 + 8 * v);
      }
    }
  }
}

// Rows [m0, m1) x panels [p0, p1): up to S::kRowPathRows rows (on layers of
// >= kRowPathHugeWeights weights S::kRowPathRowsHuge) the k-blocked row path,
// the S::kTileRows-row tile beyond. The count is this call's: where a layer
// has fewer panels than threads want, the driver splits a linear's rows into
// whole-tile chunks (parallel_units_rows), each a call of its own.
template <class S>
inline void gemm(const GemmArgs& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  static_assert(S::kRowPathRows <= kRowsKbMaxRows && S::kRowPathRowsHuge <= kRowsKbMaxRows, "one row-path pass");
  const int64_t groups = g.k_pad / kKGroup;
  const int64_t row_path = g.n * g.k_pad >= kRowPathHugeWeights ? S::kRowPathRowsHuge : S::kRowPathRows;
  for (int64_t p = p0; p < p1; ++p) {
    const int8_t* panel = g.w + p * groups * kPanel * kKGroup;
    if (m1 - m0 <= row_path) {
      tile_rows_kb<S>(g, m0, m1, panel, p * kPanel);
      continue;
    }
    for (int s = 0; s < kPanel / 16; ++s) {
      const int64_t n0 = p * kPanel + 16 * s;
      if (n0 >= g.n) break;
      const int8_t* sub = panel + 16 * s * kKGroup;
      const int8_t* pf = next_quarter_lines(g, panel, p, s);
      for_each_row_tile<S::kTileRows>(m0, m1, [&](int64_t m, auto h) { tile<S, h()>(g, m, sub, n0, pf); });
    }
  }
}

#undef PYACCEL_AVX2_PANEL_STEP

}  // namespace avx2_tile
}  // namespace int8_gemm
}  // namespace pyaccel
