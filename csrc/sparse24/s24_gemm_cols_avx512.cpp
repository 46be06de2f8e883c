// 2:4 sparse GEMM for many rows, AVX-512: the rows are the vector lanes.
//
// The row-tile kernel (s24_gemm_4x32_avx512) vectorizes over output channels
// and needs one permute per FMA to pick each channel's x lane; on Zen 4 the
// permutes share a pipe with the FMAs, so it tops out near half the FMA rate.
// Here x is transposed into slabs of 16 rows, xt[slab][k][16], and a tile is
// 8 channels x (16 * MV) rows, MV = 1..3 (24 accumulators): for each kept
// weight (value v, input 4g + i) v is spread over a register and MV FMAs take
// the 64-byte line xt[slab][4g + i][0..16) as their memory operand. The
// position only moves an address: two scalar ANDs of the position byte give
// the offsets 64 * i0 and 16 * i1 (the latter scaled by 4 in the address).
//
// Spreading v: a broadcast load per weight competes with the x loads for Zen
// 4's load ports; instead each group loads the 8 channels' v0 and v1 as four
// 128-bit broadcasts and one in-lane vpermilps per weight picks the value
// (measured 6 - 12 % faster than vbroadcastss at every MV).
//
// Per MV FMAs: MV 512-bit loads + one shuffle. Measured single-core on Zen 4:
// 70 - 75 % of the FMA peak, i.e. 165 - 180 dense-equivalent GFLOP/s per core
// (the dense FMA peak is 117); a synthetic loop of the same instruction mix
// with fixed addresses reaches 82 %.
//
// Blocking: K in blocks of kc_groups (all of K up to 512 groups, else ~128
// groups: the row tile's slab lines, <= 3 x 512 x 64 B = 96 KB, stay in L2
// while the thread's channel tiles stream their weights past them). Partial
// sums between k-blocks go to a per-thread scratch in accumulator order; the
// last k-block transposes the accumulators (8 x 8 in registers) and stores
// rows with the bias added (fp32 or bf16).
#include <immintrin.h>

#include <cstring>

#include "int8_gemm/epilogue_avx512.h"  // cvt_fp32_bf16
#include "sparse24/sparse24.h"
#include "common/transpose_avx512.h"
#include "sparse24/xt_slabs.h"

namespace pyaccel {
namespace sparse24 {
namespace {

// acc[c] holds channel n0 + c for 16 rows starting at row m: store those rows
// (only rows < a.m, channels < a.n) with the bias added.
inline void store_rows16(const ColsArgs& a, const __m512 acc[8], int64_t m, int64_t n0) {
  const int64_t left = a.n - n0;
  const __mmask8 mask = left >= 8 ? __mmask8(0xff) : __mmask8((1u << left) - 1);
  const __m256 bias = a.bias ? _mm256_maskz_loadu_ps(mask, a.bias + n0) : _mm256_setzero_ps();
  const int64_t rows = a.m - m < 16 ? a.m - m : 16;
  for (int h = 0; h < 2; ++h) {
    if (h * 8 >= rows) break;
    __m256 r[8];
    for (int c = 0; c < 8; ++c)
      r[c] = h ? _mm512_extractf32x8_ps(acc[c], 1) : _mm512_castps512_ps256(acc[c]);
    transpose8x8(r);
    for (int i = 0; i < 8 && h * 8 + i < rows; ++i) {
      const int64_t row = m + h * 8 + i;
      const __m256 v = _mm256_add_ps(r[i], bias);
      if (a.y_bf16) {
        const __m256i b = int8_gemm::avx512::cvt_fp32_bf16(_mm512_castps256_ps512(v));
        _mm_mask_storeu_epi16(static_cast<uint16_t*>(a.y) + row * a.ldy + n0, mask, _mm256_castsi256_si128(b));
      } else {
        _mm256_mask_storeu_ps(static_cast<float*>(a.y) + row * a.ldy + n0, mask, v);
      }
    }
  }
}

// Accumulators a<c><v>: channel c of the tile, rows 16v .. 16v+16 of the row
// tile. Named variables, not an array: GCC keeps arrays of vectors captured
// by lambdas in memory (a store after every FMA).
#define S24C_FOR_V(c, OP) OP(c, 0) if constexpr (MV > 1) { OP(c, 1) } if constexpr (MV > 2) { OP(c, 2) }
#define S24C_ALL(OP) OP(0) OP(1) OP(2) OP(3) OP(4) OP(5) OP(6) OP(7)
#define S24C_DECL_V(c, v) \
  __m512 a##c##v = first || MV <= v ? _mm512_setzero_ps() : _mm512_load_ps(part + (c * MV + v) * 16);
// all 24 declared (the names must exist in discarded branches); unused ones fold away
#define S24C_DECL(c) S24C_DECL_V(c, 0) S24C_DECL_V(c, 1) S24C_DECL_V(c, 2)
#define S24C_SAVE_V(c, v) _mm512_store_ps(part + (c * MV + v) * 16, a##c##v);
#define S24C_SAVE(c) S24C_FOR_V(c, S24C_SAVE_V)
// channel c, group j of the block: x[4g + i0] * v0 + x[4g + i1] * v1. The
// position byte holds i0 in bits 6-7 and i1 in bits 4-5, so the line offsets
// i0 * 64 and i1 * 64 are one AND each (the second scaled by 4 in the address).
#define S24C_FMA0_V(c, v) fma231(a##c##v, w0, x##v + j * 256 + o0);
#define S24C_FMA1_V(c, v) fma231(a##c##v, w1, x##v + j * 256 + 4 * o1);
#define S24C_CHANNEL(c)                                                        \
  {                                                                            \
    const uint64_t t = c ? __rorq(pw, 8 * c) : pw; /* rorx (BMI2): no copy */  \
    const uint64_t o0 = t & 0xC0, o1 = t & 0x30;                               \
    const __m512 w0 = _mm512_permute_ps(c < 4 ? t0a : t0b, (c & 3) * 0x55);   \
    const __m512 w1 = _mm512_permute_ps(c < 4 ? t1a : t1b, (c & 3) * 0x55);   \
    S24C_FOR_V(c, S24C_FMA0_V)                                                 \
    S24C_FOR_V(c, S24C_FMA1_V)                                                 \
  }

// Channel tile t (channels 8t .. 8t+8, half of panel t/2) x slabs [s0, s0+MV),
// groups [gb, ge) (multiples of kBlockGroups). `part` holds this tile's partial
// sums between k-blocks (8 * MV * 16 floats).
template <int MV>
inline void tile(const ColsArgs& a, int64_t t, int64_t s0, int64_t gb, int64_t ge, bool first, bool last,
                 float* part) {
  S24C_ALL(S24C_DECL)
  const int64_t blocks = a.groups_pad / kBlockGroups;
  // this half panel's channels: lanes half .. half + 8 of the block
  const int64_t half = (t & 1) * 8;
  const uint8_t* blk = a.w + ((t >> 1) * blocks + gb / kBlockGroups) * kBlockBytes;
  const uint8_t* const blk_end = blk + (ge - gb) / kBlockGroups * kBlockBytes;
  const int64_t slab = slab_floats(a.kp);
  const char* x0 = reinterpret_cast<const char*>(a.xt + s0 * slab + gb * 4 * 16);
  const char* x1 = MV > 1 ? x0 + slab * 4 : x0;
  const char* x2 = MV > 2 ? x0 + 2 * slab * 4 : x0;
  for (; blk < blk_end; blk += kBlockBytes) {
#pragma GCC unroll 4
    for (int j = 0; j < kBlockGroups; ++j) {
      uint64_t pw;
      std::memcpy(&pw, blk + pos_at(j) + half, 8);
      const float* v0 = reinterpret_cast<const float*>(blk + v0_at(j)) + half;
      const float* v1 = reinterpret_cast<const float*>(blk + v1_at(j)) + half;
      // values of channels 0-3 and 4-7, each repeated in every 128-bit lane:
      // one in-lane vpermilps per weight then spreads it (cheaper on Zen 4 than
      // a broadcast load per weight, which competes with the x loads)
      __m512 t0a = _mm512_broadcast_f32x4(_mm_loadu_ps(v0));
      __m512 t0b = _mm512_broadcast_f32x4(_mm_loadu_ps(v0 + 4));
      __m512 t1a = _mm512_broadcast_f32x4(_mm_loadu_ps(v1));
      __m512 t1b = _mm512_broadcast_f32x4(_mm_loadu_ps(v1 + 4));
      asm("" : "+v"(t0a), "+v"(t0b), "+v"(t1a), "+v"(t1b));  // keep GCC from folding back to broadcast loads
      S24C_ALL(S24C_CHANNEL)
    }
    x0 += kBlockGroups * 4 * 64;
    x1 += kBlockGroups * 4 * 64;
    x2 += kBlockGroups * 4 * 64;
  }
  if (last) {
    __m512 col[8];
#define S24C_COL0(c) col[c] = a##c##0;
    S24C_ALL(S24C_COL0)
    store_rows16(a, col, s0 * 16, t * 8);
    if constexpr (MV > 1) {
#define S24C_COL1(c) col[c] = a##c##1;
      S24C_ALL(S24C_COL1)
      if ((s0 + 1) * 16 < a.m) store_rows16(a, col, (s0 + 1) * 16, t * 8);
    }
    if constexpr (MV > 2) {
#define S24C_COL2(c) col[c] = a##c##2;
      S24C_ALL(S24C_COL2)
      if ((s0 + 2) * 16 < a.m) store_rows16(a, col, (s0 + 2) * 16, t * 8);
    }
  } else {
    S24C_ALL(S24C_SAVE)
  }
}

// a block's 16 rows (r[i]: row i, 16 inputs) into its 16 lines
inline void store_transposed(const __m512 r[16], float* out) {
  __m512 c[16];
  transpose16x16(r, c);
  for (int q = 0; q < 16; ++q) _mm512_store_ps(out + q * 16, c[q]);
}

// A block of 16 rows x 16 inputs at the edge of x (rows past m, inputs past
// k: zeros) or in bf16: masked loads, then as pack_block.
__attribute__((noinline)) void pack_edge_block(const void* x, int64_t ldx, bool x_bf16, int64_t row0, int64_t rows,
                                               int64_t cols, int64_t k0, float* out) {
  const __mmask16 mask = cols >= 16 ? __mmask16(0xffff) : __mmask16((1u << cols) - 1);
  __m512 r[16];
  for (int i = 0; i < 16; ++i) {
    r[i] = _mm512_setzero_ps();
    if (i < rows && cols > 0) {
      if (x_bf16) {
        const __m256i h = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(x) + (row0 + i) * ldx + k0);
        r[i] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
      } else {
        r[i] = _mm512_maskz_loadu_ps(mask, static_cast<const float*>(x) + (row0 + i) * ldx + k0);
      }
    }
  }
  store_transposed(r, out);
}

// 16 whole fp32 rows x 16 inputs (x at the block's first element): one 16 x 16
// transpose in registers into the 16 lines.
inline void pack_block(const float* x, int64_t ldx, float* out) {
  __m512 r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(x + i * ldx);
  store_transposed(r, out);
}

}  // namespace

void s24_pack_xt_avx512(const void* x, int64_t ldx, bool x_bf16, int64_t m, int64_t k, int64_t kp, float* xt,
                        int64_t s0, int64_t s1) {
  pack_xt_blocks<16>(x, ldx, x_bf16, m, k, kp, s0, s1, SlabLines{xt, kp}, pack_block, pack_edge_block);
}

void s24_gemm_cols_avx512(const ColsArgs& a, int64_t t0, int64_t t1, float* part) {
  const int64_t slabs = (a.m + 15) / 16;
  const int64_t tiles_n = (a.n + 7) / 8;
  if (t1 > tiles_n) t1 = tiles_n;
  const int64_t kcg = a.kc_groups;
  // row tiles of up to 3 slabs, heights balanced (8 slabs -> 3, 3, 2)
  const int64_t row_tiles = (slabs + 2) / 3;
  for (int64_t gb = 0; gb < a.groups_pad; gb += kcg) {
    const int64_t ge = gb + kcg < a.groups_pad ? gb + kcg : a.groups_pad;
    const bool first = gb == 0, last = ge == a.groups_pad;
    int64_t s = 0;
    float* p = part;
    for (int64_t rt = 0; rt < row_tiles; ++rt) {
      const int64_t h = slabs / row_tiles + (rt < slabs % row_tiles ? 1 : 0);
      for (int64_t t = t0; t < t1; ++t, p += 8 * 3 * 16) {
        if (h == 3)
          tile<3>(a, t, s, gb, ge, first, last, p);
        else if (h == 2)
          tile<2>(a, t, s, gb, ge, first, last, p);
        else
          tile<1>(a, t, s, gb, ge, first, last, p);
      }
      s += h;
    }
  }
}

}  // namespace sparse24
}  // namespace pyaccel
