// int8 GEMM micro-kernel, AVX-512 VNNI: 6 rows x 64 channels, 4 k per step.
//
// vpdpbusd multiplies uint8 by int8, so activations arrive as q ^ 0x80
// (= q + 128, see a_zero in dispatch.cpp) and the epilogue subtracts
// comp[n] = 128 * sum_k w[n, k]. 24 zmm accumulators + 4 weight registers +
// 1 broadcast: 29 of 32 registers. No saturation: each vpdpbusd lane adds 4
// products of at most 255*127; int32 overflows only past k ~ 66 000.
//
// K is blocked only past 8192 (kKcGroups groups of 4), where a 64-channel
// weight panel (64 x K bytes) would outgrow the 1 MiB L2; int32 partial sums
// of the tiles live in a per-thread buffer between blocks. Measured on Zen 4
// (1 thread, M=512, N=1024, K=4096): no blocking 427-450 GOP/s (95-100 % of
// the single-core vpdpbusd peak), 256-k blocks 368-414, 512-k blocks 388-431:
// the hardware prefetcher streams an L2-resident panel well, while every
// block boundary costs a round trip of the 24 accumulators.
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "common/tile_rows.h"
#include "int8_gemm/epilogue_avx512.h"
#include "int8_gemm/int8_gemm.h"

namespace pyaccel {
namespace int8_gemm {
namespace {

// Accumulators are named variables, not an array, and the multiply-add is
// inline asm: with the intrinsic, GCC 12 copies every accumulator around each
// vpdpbusd (and spills), which halves the kernel's speed.
// Mem: let the compiler fold the weight load into the instruction (one
// instruction less per weight vector: 1 - 3 % at M = 1). Only for one-row
// tiles: with more rows GCC folds the load into every row's use.
template <bool Mem = false>
static inline void dpbusd(__m512i& c, __m512i a_u8, __m512i b_s8) {
  if constexpr (Mem)
    __asm__("vpdpbusd %2, %1, %0" : "+v"(c) : "v"(a_u8), "vm"(b_s8));
  else
    __asm__("vpdpbusd %2, %1, %0" : "+v"(c) : "v"(a_u8), "v"(b_s8));
}
constexpr int64_t kKcGroups = 2048;

#define PYACCEL_ROW_INIT(r)                                                   \
  __m512i c##r##0, c##r##1, c##r##2, c##r##3;                                 \
  if (first) {                                                                \
    c##r##0 = c##r##1 = c##r##2 = c##r##3 = _mm512_setzero_si512();           \
  } else {                                                                    \
    c##r##0 = _mm512_loadu_si512(part + (r) * kPanel);                        \
    c##r##1 = _mm512_loadu_si512(part + (r) * kPanel + 16);                   \
    c##r##2 = _mm512_loadu_si512(part + (r) * kPanel + 32);                   \
    c##r##3 = _mm512_loadu_si512(part + (r) * kPanel + 48);                   \
  }
#define PYACCEL_ROW_SAVE(r)                                                   \
  if constexpr (MR > r) {                                                     \
    _mm512_storeu_si512(part + (r) * kPanel, c##r##0);                        \
    _mm512_storeu_si512(part + (r) * kPanel + 16, c##r##1);                   \
    _mm512_storeu_si512(part + (r) * kPanel + 32, c##r##2);                   \
    _mm512_storeu_si512(part + (r) * kPanel + 48, c##r##3);                   \
  }
#define PYACCEL_ROW_STEP(r)                                                   \
  if constexpr (MR > r) {                                                     \
    const __m512i av = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(a##r + off)); \
    dpbusd<MR == 1>(c##r##0, av, b0);                  \
    dpbusd<MR == 1>(c##r##1, av, b1);                  \
    dpbusd<MR == 1>(c##r##2, av, b2);                  \
    dpbusd<MR == 1>(c##r##3, av, b3);                  \
  }
#define PYACCEL_ROW_STORE(r)                                                  \
  if constexpr (MR > r) {                                                     \
    const float sa = g.a_scale[m + r];                                        \
    avx512::store16(g, _mm512_sub_epi32(c##r##0, k0), sa, m + r, n0);         \
    avx512::store16(g, _mm512_sub_epi32(c##r##1, k1), sa, m + r, n0 + 16);    \
    avx512::store16(g, _mm512_sub_epi32(c##r##2, k2), sa, m + r, n0 + 32);    \
    avx512::store16(g, _mm512_sub_epi32(c##r##3, k3), sa, m + r, n0 + 48);    \
  }

// Rows [m, m + MR) x one panel, k groups [g0, g1). `part` holds the tile's
// int32 partial sums (row stride kPanel) between K blocks.
template <int MR>
inline void tile(const GemmArgs& g, int64_t m, const int8_t* panel, int64_t p, int64_t g0,
                 int64_t g1, int32_t* part, bool first, bool last) {
  PYACCEL_ROW_INIT(0)
  PYACCEL_ROW_INIT(1)
  PYACCEL_ROW_INIT(2)
  PYACCEL_ROW_INIT(3)
  PYACCEL_ROW_INIT(4)
  PYACCEL_ROW_INIT(5)
  PYACCEL_TILE_ROWS6(const int8_t, a, g.a + m * g.lda, g.lda);
  const int8_t* b = panel + g0 * kPanel * kKGroup;
#pragma GCC unroll 4
  for (int64_t grp = g0; grp < g1; ++grp, b += kPanel * kKGroup) {
    const int64_t off = grp * kKGroup;
    const __m512i b0 = _mm512_loadu_si512(b);
    const __m512i b1 = _mm512_loadu_si512(b + 64);
    const __m512i b2 = _mm512_loadu_si512(b + 128);
    const __m512i b3 = _mm512_loadu_si512(b + 192);
    PYACCEL_ROW_STEP(0) PYACCEL_ROW_STEP(1) PYACCEL_ROW_STEP(2)
    PYACCEL_ROW_STEP(3) PYACCEL_ROW_STEP(4) PYACCEL_ROW_STEP(5)
  }
  if (!last) {
    PYACCEL_ROW_SAVE(0) PYACCEL_ROW_SAVE(1) PYACCEL_ROW_SAVE(2)
    PYACCEL_ROW_SAVE(3) PYACCEL_ROW_SAVE(4) PYACCEL_ROW_SAVE(5)
    return;
  }
  const int32_t* comp = g.comp + p * kPanel;
  const __m512i k0 = _mm512_loadu_si512(comp), k1 = _mm512_loadu_si512(comp + 16),
                k2 = _mm512_loadu_si512(comp + 32), k3 = _mm512_loadu_si512(comp + 48);
  const int64_t n0 = p * kPanel;
  PYACCEL_ROW_STORE(0) PYACCEL_ROW_STORE(1) PYACCEL_ROW_STORE(2)
  PYACCEL_ROW_STORE(3) PYACCEL_ROW_STORE(4) PYACCEL_ROW_STORE(5)
}

thread_local std::vector<int32_t> t_partial;

}  // namespace

void qs8_gemm_6x64c4_avx512vnni(const GemmArgs& g, int64_t m0, int64_t m1, int64_t p0,
                                int64_t p1) {
  const int64_t groups = g.k_pad / kKGroup;
  const int64_t rows = m1 - m0;
  if (rows <= 0) return;
  const bool blocked = groups > kKcGroups;
  if (blocked && t_partial.size() < static_cast<size_t>(rows * kPanel))
    t_partial.resize(rows * kPanel);
  int32_t* part = t_partial.data();
  for (int64_t p = p0; p < p1; ++p) {
    const int8_t* panel = g.w + p * groups * kPanel * kKGroup;
    for (int64_t k0 = 0; k0 < groups; k0 += kKcGroups) {
      const int64_t k1 = blocked ? std::min<int64_t>(groups, k0 + kKcGroups) : groups;
      const bool first = k0 == 0, last = k1 == groups;
      for_each_row_tile<6>(m0, m1, [&](int64_t m, auto h) {
        tile<h()>(g, m, panel, p, k0, k1, part + (m - m0) * kPanel, first, last);
      });
      if (!blocked) break;
    }
  }
}

}  // namespace int8_gemm
}  // namespace pyaccel
