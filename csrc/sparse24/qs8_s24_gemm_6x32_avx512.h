// 2:4 int8 GEMM body shared by the AVX-512 VNNI and AVX-512 ICL kernels:
// 6 rows x 32 channels (one panel), one quad (4 pairs of groups, 32 inputs)
// per loop trip. Include only from files compiled with AVX-512 VNNI flags;
// everything here has internal linkage, so the two files' copies (built with
// different flags) never merge.
//
// Per pair and channel, vpshufb gathers the 4 kept activations (of the pair's
// 8, broadcast to every qword) into one dword; one vpdpbusd adds the 4
// products = 2 groups. Activations are uint8 (q ^ 0x80); the epilogue
// subtracts comp = 128 * sum of the row's values. The control dwords
// [i0, i1, 4 + j0, 4 + j1] come from the channel's position dword, by the
// Control policy of the including file.
#pragma once
#include <immintrin.h>

#include <cstring>

#include "common/tile_rows.h"
#include "int8_gemm/epilogue_avx512.h"
#include "int8_gemm/int8_gemm.h"
#include "sparse24/sparse24_int8.h"

namespace pyaccel {
namespace sparse24_int8 {
namespace {

// See int8_gemm's VNNI kernel (inline asm; Mem only for one-row tiles: 2 - 6 %
// at M = 1, but 10 - 15 % slower at 2 - 3 rows, where GCC folds the load into
// every row's use).
template <bool Mem = false>
static inline void dpbusd(__m512i& c, __m512i a_u8, __m512i b_s8) {
  if constexpr (Mem)
    __asm__("vpdpbusd %2, %1, %0" : "+v"(c) : "v"(a_u8), "vm"(b_s8));
  else
    __asm__("vpdpbusd %2, %1, %0" : "+v"(c) : "v"(a_u8), "v"(b_s8));
}

static inline void store(const GemmArgs& ga, __m512i acc, const int32_t* comp, float sa, int64_t m, int64_t n0) {
  int8_gemm::avx512::store16(epilogue_args(ga), _mm512_sub_epi32(acc, _mm512_loadu_si512(comp)), sa, m, n0);
}

#define S24I8_ROW(r, J)                                                       \
  if constexpr (MR > r) {                                                     \
    int64_t a8;                                                               \
    std::memcpy(&a8, a##r + kQuadInputs * qb + 8 * J, 8);                     \
    const __m512i ab = _mm512_set1_epi64(a8);                                 \
    dpbusd<MR == 1>(c##r##0, _mm512_shuffle_epi8(ab, k0), v0);                         \
    dpbusd<MR == 1>(c##r##1, _mm512_shuffle_epi8(ab, k1), v1);                         \
  }
#define S24I8_PAIR(J)                                                         \
  {                                                                           \
    const __m512i v0 = _mm512_loadu_si512(b + kQuadValOffset + J * kPairBytes);                \
    const __m512i v1 = _mm512_loadu_si512(b + kQuadValOffset + J * kPairBytes + 64);           \
    const __m512i k0 = ctl.template pair<J>(pos0), k1 = ctl.template pair<J>(pos1); \
    S24I8_ROW(0, J) S24I8_ROW(1, J) S24I8_ROW(2, J) S24I8_ROW(3, J) S24I8_ROW(4, J) S24I8_ROW(5, J) \
  }
#define S24I8_STORE(r)                                                        \
  if constexpr (MR > r) {                                                     \
    store(g, c##r##0, g.comp + n0, g.a_scale[m + r], m + r, n0);              \
    store(g, c##r##1, g.comp + n0 + 16, g.a_scale[m + r], m + r, n0 + 16);    \
  }

template <class Control, int MR>
static inline void tile(const GemmArgs& g, int64_t m, int64_t p) {
  __m512i c00 = _mm512_setzero_si512(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,
          c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  PYACCEL_TILE_ROWS6(const uint8_t, a, g.a + m * g.lda, g.lda);
  const Control ctl;
  const uint8_t* b = g.w + p * g.quads * kQuadBytes;
  for (int64_t qb = 0; qb < g.quads; ++qb, b += kQuadBytes) {
    const __m512i pos0 = _mm512_loadu_si512(b + kQuadPosOffset), pos1 = _mm512_loadu_si512(b + kQuadPosOffset + 64);
    S24I8_PAIR(0) S24I8_PAIR(1) S24I8_PAIR(2) S24I8_PAIR(3)
  }
  const int64_t n0 = p * kPanel;
  S24I8_STORE(0) S24I8_STORE(1) S24I8_STORE(2) S24I8_STORE(3) S24I8_STORE(4) S24I8_STORE(5)
}

#undef S24I8_ROW
#undef S24I8_PAIR
#undef S24I8_STORE

template <class Control>
static inline void gemm_6x32(const GemmArgs& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p)
    int8_gemm::for_each_row_tile<6>(m0, m1, [&](int64_t m, auto h) { tile<Control, h()>(g, m, p); });
}

}  // namespace
}  // namespace sparse24_int8
}  // namespace pyaccel
