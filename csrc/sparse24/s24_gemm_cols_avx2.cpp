// 2:4 sparse GEMM for many rows, AVX2: the AVX-512 column kernel's scheme
// (s24_gemm_cols_avx512.cpp) with 256-bit registers. x is transposed into the
// same 16-row slabs (one 64-byte line per input, rows 0-7 in its first half,
// 8-15 in its second: xt[slab][k][16], or k-blocked for the 2 x 48 tile);
// every FMA takes the half line of input 4g + i as its memory operand, so
// the position only moves an address.
// Two tiles, one per core family (cpu_tuning()):
//
// 4 x 24 (s24_gemm_cols_4x24_avx2, AMD): 4 channels (a quarter panel) x 3
// half slabs (24 rows) = 12 accumulators; per kept weight one in-lane
// vpermilps spreads the value from a 4-channel table and three FMAs take the
// three half lines. 16 ymm registers hold the 12 accumulators, the 2 tables
// and the 2 spread weights (GCC keeps 2 accumulators on the stack across the
// 4 unrolled groups of a block).
//
// 2 x 48 (s24_gemm_cols_2x48_avx2, Intel): 2 channels x up to 6 half slabs
// (48 rows) = 12 accumulators; each kept weight is a vbroadcastss load
// (a load port, no shuffle) and feeds up to 6 FMAs. A call runs 4 tiles (8
// channels), whose sums stay in the `part` scratch; on the last k-block their
// rows go to y right after the call (store_row_tile), before the next 8
// channels compute. On Intel cores the
// vpermilps and the scalar position decoding of the 4-channel tile issue on the
// FMA ports (0, 1, 5); here one decode serves 12 FMAs instead of 4 and there
// is no shuffle. Measured on Golden Cove cores (a Sapphire Rapids Xeon capped
// at AVX2, modules, interleaved): 1.05 - 1.17x the 4 x 16 tile (the AMD tile
// before it grew to 24 rows) at 32 - 128
// rows on 2 threads, 1.09 - 1.24x on one (the four suite shapes). Row tiles
// of 7 - 10 half slabs (past 48 rows) run as 1-channel tiles instead (tile1:
// one decode feeds 14 - 20 FMAs; see s24_gemm_cols_2x48_avx2). This kernel
// reads x k-blocked (s24_pack_xt_kb_avx2, kXtKbGroups in sparse24.h): within
// a k-block the slabs lie a compile-time stride apart, so each kept weight
// takes one pointer and all its FMAs address [pointer + displacement]
// (S24_HALF).
//
// The row-tile AVX2 kernel (s24_gemm_4x8_avx2) needs a permute per FMA and
// chains two FMAs per accumulator and group; these have no permute on the x
// side and 7 - 12 independent accumulators.
#include <immintrin.h>

#include <cstring>
#include <type_traits>

#include "int8_gemm/int8_gemm.h"  // fp32_to_bf16
#include "sparse24/sparse24.h"
#include "sparse24/xt_slabs.h"

namespace pyaccel {
namespace sparse24 {
namespace {

// acc[c] holds channel n0 + c for 8 rows starting at row m
inline void store_rows8(const ColsArgs& a, const __m256 acc[4], int64_t m, int64_t n0) {
  const int64_t left = a.n - n0;
  const int cols = left >= 4 ? 4 : static_cast<int>(left);
  alignas(16) float b[4] = {0.f, 0.f, 0.f, 0.f};
  for (int c = 0; c < cols; ++c) b[c] = a.bias ? a.bias[n0 + c] : 0.f;
  const __m128 bias = _mm_load_ps(b);
  for (int h = 0; h < 2; ++h) {
    __m128 r0 = h ? _mm256_extractf128_ps(acc[0], 1) : _mm256_castps256_ps128(acc[0]);
    __m128 r1 = h ? _mm256_extractf128_ps(acc[1], 1) : _mm256_castps256_ps128(acc[1]);
    __m128 r2 = h ? _mm256_extractf128_ps(acc[2], 1) : _mm256_castps256_ps128(acc[2]);
    __m128 r3 = h ? _mm256_extractf128_ps(acc[3], 1) : _mm256_castps256_ps128(acc[3]);
    _MM_TRANSPOSE4_PS(r0, r1, r2, r3);  // now r_i = row 4h + i, channels 0..3
    const __m128 rows[4] = {r0, r1, r2, r3};
    for (int i = 0; i < 4; ++i) {
      const int64_t row = m + 4 * h + i;
      if (row >= a.m) return;
      const __m128 v = _mm_add_ps(rows[i], bias);
      if (!a.y_bf16 && cols == 4) {
        _mm_storeu_ps(static_cast<float*>(a.y) + row * a.ldy + n0, v);
      } else {
        alignas(16) float t[4];
        _mm_store_ps(t, v);
        for (int c = 0; c < cols; ++c) {
          if (a.y_bf16)
            static_cast<uint16_t*>(a.y)[row * a.ldy + n0 + c] = int8_gemm::fp32_to_bf16(t[c]);
          else
            static_cast<float*>(a.y)[row * a.ldy + n0 + c] = t[c];
        }
      }
    }
  }
}

// Accumulator a<h><c> of a tile of H half slabs x C channels: half slab h of
// the row tile (rows 8h .. 8h + 8), channel c; its sums at part + (C h + c) * 8.
#define S24_ACC_DECL(h, c, C) \
  __m256 a##h##c = (H <= h || first) ? _mm256_setzero_ps() : _mm256_load_ps(part + ((C) * h + c) * 8);
#define S24_ACC_SAVE(h, c, C) \
  if (H > h) _mm256_store_ps(part + ((C) * h + c) * 8, a##h##c);
#define S24Q_ALL(OP) \
  OP(0, 0) OP(0, 1) OP(0, 2) OP(0, 3) OP(1, 0) OP(1, 1) OP(1, 2) OP(1, 3) OP(2, 0) OP(2, 1) OP(2, 2) OP(2, 3)
#define S24Q_DECL(h, c) S24_ACC_DECL(h, c, 4)
#define S24Q_SAVE(h, c) S24_ACC_SAVE(h, c, 4)
// half h of the tile: slab (h + Odd) / 2 of the tile's two (x0, x1), +32 bytes
// when h + Odd is odd
#define S24Q_FMA(h, c, w, o) \
  if (H > h) fma231(a##h##c, w, ((h + Odd) / 2 ? x1 : x0) + j * 256 + 32 * ((h + Odd) & 1) + (o));
// channel c, group j: x[4g + i0] * v0 + x[4g + i1] * v1 over the tile's rows;
// the position byte gives 64 * i0 = byte & 0xC0 and 64 * i1 = 4 * (byte & 0x30)
#define S24Q_CHANNEL(c)                                                                                \
  {                                                                                                    \
    const uint32_t t = pw >> (8 * c);                                                                  \
    const uint64_t o0 = t & 0xC0u, o1 = 4 * (t & 0x30u);                                               \
    const __m256 w0 = _mm256_permute_ps(t0, (c & 3) * 0x55);                                           \
    const __m256 w1 = _mm256_permute_ps(t1, (c & 3) * 0x55);                                           \
    S24Q_FMA(0, c, w0, o0) S24Q_FMA(1, c, w0, o0) S24Q_FMA(2, c, w0, o0) S24Q_FMA(0, c, w1, o1)        \
    S24Q_FMA(1, c, w1, o1) S24Q_FMA(2, c, w1, o1)                                                      \
  }

// channels 4t .. 4t+4 (quarter t & 3 of panel t >> 2) x half slabs [h0, h0 +
// H) (h0 & 1 == Odd), groups [gb, ge); `part`: the tile's 32 * H sums
template <int H, int Odd>
inline void tile(const ColsArgs& a, int64_t t, int64_t h0, int64_t gb, int64_t ge, bool first, bool last,
                 float* part) {
  static_assert(H >= 1 && H <= 3, "1 - 3 half slabs");
  S24Q_ALL(S24Q_DECL)
  const int64_t blocks = a.groups_pad / kBlockGroups;
  const int64_t quarter = (t & 3) * 4;
  const uint8_t* blk = a.w + ((t >> 2) * blocks + gb / kBlockGroups) * kBlockBytes;
  const uint8_t* const blk_end = blk + (ge - gb) / kBlockGroups * kBlockBytes;
  const char* x0 = reinterpret_cast<const char*>(a.xt + (h0 >> 1) * slab_floats(a.kp) + gb * 4 * 16);
  const char* x1 = (H - 1 + Odd) / 2 ? x0 + slab_floats(a.kp) * 4 : x0;
  for (; blk < blk_end; blk += kBlockBytes, x0 += kBlockGroups * 4 * 64, x1 += kBlockGroups * 4 * 64) {
#pragma GCC unroll 4
    for (int j = 0; j < kBlockGroups; ++j) {
      uint32_t pw;
      std::memcpy(&pw, blk + pos_at(j) + quarter, 4);
      __m256 t0 = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(blk + v0_at(j)) + quarter / 4);
      __m256 t1 = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(blk + v1_at(j)) + quarter / 4);
      asm("" : "+x"(t0), "+x"(t1));  // keep them tables, not broadcast loads per weight
      S24Q_CHANNEL(0) S24Q_CHANNEL(1) S24Q_CHANNEL(2) S24Q_CHANNEL(3)
    }
  }
  if (last) {
    const __m256 r0[4] = {a00, a01, a02, a03}, r1[4] = {a10, a11, a12, a13}, r2[4] = {a20, a21, a22, a23};
    const __m256* const rows[3] = {r0, r1, r2};
    for (int h = 0; h < H; ++h)
      if ((h0 + h) * 8 < a.m) store_rows8(a, rows[h], (h0 + h) * 8, t * 4);
  } else {
    S24Q_ALL(S24Q_SAVE)
  }
}

// ---- 2 channels x up to 48 rows (Intel) --------------------------------------

// Where channel `lane` of panel `panel` keeps its position bytes (pp, one per
// group at pos_at(j) of each block, up to pp_end) and values (vp: v0_at(j) / 4,
// v1_at(j) / 4) over the blocks of groups [gb, ge).
struct ChannelStream {
  const uint8_t* pp;
  const uint8_t* pp_end;
  const float* vp;
  ChannelStream(const ColsArgs& a, int64_t panel, int64_t lane, int64_t gb, int64_t ge) {
    const uint8_t* const blk = a.w + (panel * (a.groups_pad / kBlockGroups) + gb / kBlockGroups) * kBlockBytes;
    pp = blk + lane;
    pp_end = pp + (ge - gb) / kBlockGroups * kBlockBytes;
    vp = reinterpret_cast<const float*>(blk) + lane;
  }
  void next() { pp += kBlockBytes, vp += kBlockBytes / 4; }
};

// y for the half slabs [h0, h0 + H) of a row tile and channels [c0, c1)
// (clipped to n), bias added, from the tile sums in `sums`:
// 2-channel tiles (OneChannel false: unit i at sums + 16 H i, [half][channel][8
// rows]) or 1-channel ones (channel c0 + i at sums + 8 H i, [half][8 rows]).
// 8 channels at a time, transposed 8 x 8 into rows, one 32-byte store per row.
template <bool OneChannel>
inline void store_row_tile(const ColsArgs& a, const float* sums, int64_t h0, int64_t H, int64_t c0, int64_t c1) {
  const int64_t n_end = a.n < c1 ? a.n : c1;
  for (int64_t n0 = c0; n0 < n_end; n0 += 8) {
    const int cols = n_end - n0 < 8 ? static_cast<int>(n_end - n0) : 8;
    __m256 bias = _mm256_setzero_ps();
    if (a.bias && cols == 8) {
      bias = _mm256_loadu_ps(a.bias + n0);
    } else if (a.bias) {
      alignas(32) float b[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      for (int c = 0; c < cols; ++c) b[c] = a.bias[n0 + c];
      bias = _mm256_load_ps(b);
    }
    const float* first = sums + (n0 - c0) * 8 * H;  // channel n0's sums (either layout)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t m = (h0 + h) * 8;
      __m256 r[8];
      for (int c = 0; c < 8; ++c) {
        const int64_t at = OneChannel ? c * 8 * H + h * 8 : (c >> 1) * 16 * H + (2 * h + (c & 1)) * 8;
        r[c] = c < cols ? _mm256_load_ps(first + at) : _mm256_setzero_ps();
      }
      transpose8x8(r);  // r[i]: row m + i, channels n0 .. n0 + 8
      const int rows = a.m - m < 8 ? static_cast<int>(a.m - m) : 8;
      for (int i = 0; i < rows; ++i) {
        const __m256 v = _mm256_add_ps(r[i], bias);
        if (!a.y_bf16 && cols == 8) {
          _mm256_storeu_ps(static_cast<float*>(a.y) + (m + i) * a.ldy + n0, v);
          continue;
        }
        alignas(32) float t[8];
        _mm256_store_ps(t, v);
        for (int c = 0; c < cols; ++c) {
          if (a.y_bf16)
            static_cast<uint16_t*>(a.y)[(m + i) * a.ldy + n0 + c] = int8_gemm::fp32_to_bf16(t[c]);
          else
            static_cast<float*>(a.y)[(m + i) * a.ldy + n0 + c] = t[c];
        }
      }
    }
  }
}

// The 2 x 48 kernel reads k-blocked xt (kXtKbGroups): a row tile at half
// slab h0 starts from one pointer per k-block (slab h0 / 2 in it), and its half
// h lies at the compile-time displacement S24_HALF(h) from there: slab (h +
// Odd) / 2 on (Odd = h0 & 1), +32 bytes when h + Odd is odd. Each kept weight
// takes one pointer (group + input offset, held in a register by the asm), and
// all its FMAs address [pointer + displacement]; with a run-time slab stride
// they took [slab + offset + displacement], base + index operands that Golden
// Cove unlaminates (two fused-domain uops per FMA).
#define S24_HALF(h) (((h) + Odd) / 2 * kXtKbSlabFloats * 4 + 32 * (((h) + Odd) & 1))
// the pointers of a group's two kept weights: inputs 4j + i0 and 4j + i1,
// 64 * i0 = byte & 0xC0 and 64 * i1 = 4 * (byte & 0x30)
#define S24_WEIGHT_PTRS(e, f, pb)                  \
  const char* e = x + j * 256 + ((pb) & 0xC0u);     \
  const char* f = x + j * 256 + 4 * ((pb) & 0x30u); \
  asm("" : "+r"(e));                               \
  asm("" : "+r"(f));

// Accumulators a<h><c> (S24_ACC_DECL): up to 6 half slabs x 2 channels.
#define S24D_ALL(OP) \
  OP(0, 0) OP(0, 1) OP(1, 0) OP(1, 1) OP(2, 0) OP(2, 1) OP(3, 0) OP(3, 1) OP(4, 0) OP(4, 1) OP(5, 0) OP(5, 1)
#define S24D_DECL(h, c) S24_ACC_DECL(h, c, 2)
#define S24D_SAVE(h, c) S24_ACC_SAVE(h, c, 2)
#define S24D_FMA(h, c, w, q) \
  if (H > h) fma231(a##h##c, w, q + S24_HALF(h));
// channel c, group j
#define S24D_CHANNEL(c)                                                                          \
  {                                                                                              \
    const uint32_t pb = pp[pos_at(j) + c];                                                       \
    S24_WEIGHT_PTRS(e, f, pb)                                                                    \
    const __m256 w0 = _mm256_broadcast_ss(vp + v0_at(j) / 4 + c);                               \
    const __m256 w1 = _mm256_broadcast_ss(vp + v1_at(j) / 4 + c);                                \
    S24D_FMA(0, c, w0, e) S24D_FMA(1, c, w0, e) S24D_FMA(2, c, w0, e) S24D_FMA(3, c, w0, e)      \
    S24D_FMA(4, c, w0, e) S24D_FMA(5, c, w0, e) S24D_FMA(0, c, w1, f) S24D_FMA(1, c, w1, f)      \
    S24D_FMA(2, c, w1, f) S24D_FMA(3, c, w1, f) S24D_FMA(4, c, w1, f) S24D_FMA(5, c, w1, f)      \
  }

// 2-channel tiles [u0, u1) (channels 2u, 2u + 1) x half slabs [h0, h0 + H)
// (h0 & 1 == Odd; xs: slab h0 / 2 of the k-block of groups [gb, ge)); `part`:
// their sums (2 * H * 8 floats a tile, in order), added to unless `first`
template <int H, int Odd>
inline void tile2(const ColsArgs& a, int64_t u0, int64_t u1, const char* xs, int64_t gb, int64_t ge, bool first,
                  float* part) {
  static_assert(H >= 1 && H <= 6, "1 - 6 half slabs");
  for (int64_t u = u0; u < u1; ++u, part += 16 * H) {
    S24D_ALL(S24D_DECL)
    const ChannelStream cs(a, u >> 3, (u & 7) * 2, gb, ge);
    const uint8_t* pp = cs.pp;
    const uint8_t* const pp_end = cs.pp_end;
    const float* vp = cs.vp;
    const char* x = xs;
    // as in tile1: the second half of a panel pulls the next one's blocks into
    // L1, unit u0 + i lines 2i and 2i + 1 (and line 8) of each block
    const bool pf = (u0 & 7) == 4 && 2 * u0 + 8 < a.n;
    const char* pfl = reinterpret_cast<const char*>(a.w) +
                      ((u0 / 8 + 1) * (a.groups_pad / kBlockGroups) + gb / kBlockGroups) * kBlockBytes +
                      128 * (u - u0);
    for (; pp < pp_end; pp += kBlockBytes, vp += kBlockBytes / 4, pfl += kBlockBytes, x += kBlockGroups * 256) {
      if (pf) {
        _mm_prefetch(pfl, _MM_HINT_T0);
        _mm_prefetch(pfl + 64, _MM_HINT_T0);
        if (u == u0) _mm_prefetch(pfl + 512, _MM_HINT_T0);
      }
#pragma GCC unroll 4
      for (int j = 0; j < kBlockGroups; ++j) {
        S24D_CHANNEL(0) S24D_CHANNEL(1)
      }
    }
    S24D_ALL(S24D_SAVE)
  }
}

// ---- 1 channel x 7 - 10 half slabs (Intel, row tiles past 48 rows) -----------
// One decoded position serves H FMAs (8 at 64 rows, where 2-channel tiles of
// 4 + 4 halves give 4): H accumulators, each kept weight a vbroadcastss and H
// memory-operand FMAs.
#define S24E_ALL(OP) OP(0) OP(1) OP(2) OP(3) OP(4) OP(5) OP(6) OP(7) OP(8) OP(9)
#define S24E_DECL(h) __m256 c##h = (H <= h || first) ? _mm256_setzero_ps() : _mm256_load_ps(part + h * 8);
#define S24E_SAVE(h) \
  if (H > h) _mm256_store_ps(part + h * 8, c##h);
#define S24E_FMA(h, w, q) \
  if (H > h) fma231(c##h, w, q + S24_HALF(h));

// channels [c0, c1) x half slabs [h0, h0 + H) (h0 & 1 == Odd; xs: slab h0 / 2
// of the k-block of groups [gb, ge)); `part`: 8 * H sums per channel, in
// order, added to unless `first`
template <int H, int Odd>
inline void tile1(const ColsArgs& a, int64_t c0, int64_t c1, const char* xs, int64_t gb, int64_t ge, bool first,
                  float* part) {
  static_assert(H >= 1 && H <= 10, "1 - 10 half slabs");
  // (the accumulators c0 .. c9 hide the argument c0 inside the loop)
  const int64_t call0 = c0;
  const char* const next_panel = reinterpret_cast<const char*>(a.w) +
                                 ((c0 / kPanel + 1) * (a.groups_pad / kBlockGroups) + gb / kBlockGroups) * kBlockBytes;
  for (int64_t c = c0; c < c1; ++c, part += 8 * H) {
    S24E_ALL(S24E_DECL)
    const char* x = xs;
    // the second half of a panel pulls the next panel's blocks into L1: its
    // channel c0 + i the block's line i (and line 8), block by block
    const bool pf = (call0 & (kPanel - 1)) == kPanel / 2 && call0 + kPanel / 2 < a.n;
    const char* pfl = next_panel + 64 * (c - call0);
    for (ChannelStream cs(a, c / kPanel, c & (kPanel - 1), gb, ge); cs.pp < cs.pp_end;
         cs.next(), pfl += kBlockBytes, x += kBlockGroups * 256) {
      const uint8_t* const pp = cs.pp;
      const float* const vp = cs.vp;
      if (pf) {
        _mm_prefetch(pfl, _MM_HINT_T0);
        if (c == call0) _mm_prefetch(pfl + 512, _MM_HINT_T0);
      }
#pragma GCC unroll 4
      for (int j = 0; j < kBlockGroups; ++j) {
        const uint32_t pb = pp[pos_at(j)];
        S24_WEIGHT_PTRS(e, f, pb)
        const __m256 w0 = _mm256_broadcast_ss(vp + v0_at(j) / 4);
        const __m256 w1 = _mm256_broadcast_ss(vp + v1_at(j) / 4);
        S24E_FMA(0, w0, e) S24E_FMA(1, w0, e) S24E_FMA(2, w0, e) S24E_FMA(3, w0, e) S24E_FMA(4, w0, e)
        S24E_FMA(5, w0, e) S24E_FMA(6, w0, e) S24E_FMA(7, w0, e) S24E_FMA(8, w0, e) S24E_FMA(9, w0, e)
        S24E_FMA(0, w1, f) S24E_FMA(1, w1, f) S24E_FMA(2, w1, f) S24E_FMA(3, w1, f) S24E_FMA(4, w1, f)
        S24E_FMA(5, w1, f) S24E_FMA(6, w1, f) S24E_FMA(7, w1, f) S24E_FMA(8, w1, f) S24E_FMA(9, w1, f)
      }
    }
    S24E_ALL(S24E_SAVE)
  }
}

// rows 8h .. 8h + 8 of a 16-row block (r[i]: row 8h + i, 8 inputs) into the
// halves [8h, 8h + 8) of the block's 8 lines
inline void store_transposed_half(__m256 r[8], int h, float* out) {
  transpose8x8(r);
  for (int c = 0; c < 8; ++c) _mm256_store_ps(out + c * 16 + 8 * h, r[c]);
}

// A block of 16 rows x 8 inputs at the edge of x (rows past m, inputs past k:
// zeros) or in bf16: element by element into a buffer, then as pack_block.
__attribute__((noinline)) void pack_edge_block(const void* x, int64_t ldx, bool x_bf16, int64_t row0, int64_t rows,
                                               int64_t cols, int64_t k0, float* out) {
  alignas(32) float buf[8];
  for (int h = 0; h < 2; ++h) {  // rows 8h .. 8h+8 -> lines [k0 .. k0+8)[8h .. 8h+8)
    __m256 r[8];
    for (int i = 0; i < 8; ++i) {
      const int64_t row = 8 * h + i;
      if (row >= rows || cols == 0) {
        r[i] = _mm256_setzero_ps();
        continue;
      }
      if (cols == 8 && !x_bf16) {
        r[i] = _mm256_loadu_ps(static_cast<const float*>(x) + (row0 + row) * ldx + k0);
        continue;
      }
      for (int c = 0; c < 8; ++c) {
        float v = 0.f;
        if (c < cols && x_bf16) {
          const uint32_t u = uint32_t(static_cast<const uint16_t*>(x)[(row0 + row) * ldx + k0 + c]) << 16;
          std::memcpy(&v, &u, 4);
        } else if (c < cols) {
          v = static_cast<const float*>(x)[(row0 + row) * ldx + k0 + c];
        }
        buf[c] = v;
      }
      r[i] = _mm256_load_ps(buf);
    }
    store_transposed_half(r, h, out);
  }
}

// 16 whole fp32 rows x 8 inputs (x at the block's first element): two 8 x 8
// transposes in registers into the 8 lines' halves. A block that starts a
// 64-byte line of x prefetches each row kPackPfLines lines on (16 row
// streams, more than the hardware prefetchers follow: Zen 3, 128 x 1536 rows
// transposed by 2 threads in 32 us instead of 39 - 47).
constexpr int64_t kPackPfLines = 2;
inline void pack_block(const float* x, int64_t ldx, float* out) {
  const bool pf = (reinterpret_cast<uintptr_t>(x) & 63) == 0;
  for (int h = 0; h < 2; ++h, x += 8 * ldx) {
    __m256 r[8];
    if (pf)
      for (int i = 0; i < 8; ++i)
        _mm_prefetch(reinterpret_cast<const char*>(x + i * ldx) + 64 * kPackPfLines, _MM_HINT_T0);
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(x + i * ldx);
    store_transposed_half(r, h, out);
  }
}

}  // namespace

void s24_pack_xt_avx2(const void* x, int64_t ldx, bool x_bf16, int64_t m, int64_t k, int64_t kp, float* xt,
                      int64_t s0, int64_t s1) {
  pack_xt_blocks<8>(x, ldx, x_bf16, m, k, kp, s0, s1, SlabLines{xt, kp}, pack_block, pack_edge_block);
}

// k-blocked (kXtKbGroups) for s24_gemm_cols_2x48_avx2; m: the pass's rows
void s24_pack_xt_kb_avx2(const void* x, int64_t ldx, bool x_bf16, int64_t m, int64_t k, int64_t kp, float* xt,
                         int64_t s0, int64_t s1) {
  pack_xt_blocks<8>(x, ldx, x_bf16, m, k, kp, s0, s1, KBlockedLines{xt, (m + 15) / 16}, pack_block,
                    pack_edge_block);
}

// Channel tiles here are 4 channels: [t0, t1) counts quarter panels. Row
// tiles of 3 half slabs (24 rows, 12 accumulators), the last 4 halves as 2 +
// 2 and the last 2 as one tile of 2 (one half alone only when the pass has 8
// rows or fewer); tile (h0, t) keeps its 32 * h sums at part + 32 * (h0 *
// tiles + h * (t - t0)).
void s24_gemm_cols_4x24_avx2(const ColsArgs& a, int64_t t0, int64_t t1, float* part) {
  const int64_t halves = (a.m + 7) / 8;
  const int64_t tiles_n = (a.n + 3) / 4;
  if (t1 > tiles_n) t1 = tiles_n;
  const int64_t tiles = t1 - t0;
  const int64_t kcg = a.kc_groups;
  for (int64_t gb = 0; gb < a.groups_pad; gb += kcg) {
    const int64_t ge = gb + kcg < a.groups_pad ? gb + kcg : a.groups_pad;
    const bool first = gb == 0, last = ge == a.groups_pad;
    for (int64_t h0 = 0; h0 < halves;) {
      const int64_t left = halves - h0;
      const int64_t h = left == 4 || left == 2 ? 2 : left == 1 ? 1 : 3;
      for (int64_t t = t0; t < t1; ++t) {
        float* const p = part + 32 * (h0 * tiles + h * (t - t0));
        switch (h * 2 + (h0 & 1)) {
          case 6: tile<3, 0>(a, t, h0, gb, ge, first, last, p); break;
          case 7: tile<3, 1>(a, t, h0, gb, ge, first, last, p); break;
          case 4: tile<2, 0>(a, t, h0, gb, ge, first, last, p); break;
          case 5: tile<2, 1>(a, t, h0, gb, ge, first, last, p); break;
          default: tile<1, 0>(a, t, h0, gb, ge, first, last, p);  // halves == 1: h0 == 0
        }
      }
      h0 += h;
    }
  }
}

// f(H, Odd) as std::integral_constant for a row tile of h half slabs (H <= h
// <= Max) starting at an odd half slab or not
template <int H, int Max, typename F>
inline void with_tile_height(int64_t h, int64_t odd, const F& f) {
  if constexpr (H < Max) {
    if (h > H) return with_tile_height<H + 1, Max>(h, odd, f);
  }
  if (odd)
    f(std::integral_constant<int, H>(), std::integral_constant<int, 1>());
  else
    f(std::integral_constant<int, H>(), std::integral_constant<int, 0>());
}

// Channel tiles are 4 channels here too ([t0, t1) counts quarter panels, as
// the driver and cols_part_avx2 expect). Row tiles, heights balanced: up to 6
// half slabs run as 2-channel tiles (tile2); past 6 halves, tiles of up to 10,
// those of 7 - 10 halves as 1-channel tiles (tile1: 16 halves -> 8 + 8, 14 ->
// 7 + 7, 12 -> 6 + 6 as 2-channel tiles). Measured on Golden Cove (one
// thread, kernel alone, K = 384 - 1536): 1-channel tiles of 8 + 8 halves ran
// 1.05 - 1.07x the 2-channel 6 + 5 + 5 at 128 rows, 8 halves 1.07 - 1.10x
// 4 + 4 at 64 rows; 12 halves as one 1-channel tile 0.96x 6 + 6. Heights
// 1 - 2 occur only in a pass of <= 16 rows (K past ~63k inputs, or the last
// pass of a batch: the driver's passes of <= 8 MiB of transposed x). `part` holds every tile's sums, row
// tile by row tile: 8 x halves floats per channel, within cols_part_avx2's 64
// per 4 channels and 16 rows.
void s24_gemm_cols_2x48_avx2(const ColsArgs& a, int64_t t0, int64_t t1, float* part) {
  const int64_t halves = (a.m + 7) / 8;
  const int64_t tiles_n = (a.n + 3) / 4;
  if (t1 > tiles_n) t1 = tiles_n;
  const int64_t units_end = (a.n + 1) / 2 < 2 * t1 ? (a.n + 1) / 2 : 2 * t1;  // 2-channel tiles
  const int64_t c_end = a.n < 4 * t1 ? a.n : 4 * t1;                            // 1-channel tiles
  const int64_t row_tiles = halves <= 6 ? 1 : (halves + 9) / 10;
  const int64_t kcg = a.kc_groups;  // the k-blocks of xt (kXtKbGroups; all of K when less)
  for (int64_t gb = 0; gb < a.groups_pad; gb += kcg) {
    const int64_t ge = gb + kcg < a.groups_pad ? gb + kcg : a.groups_pad;
    const bool first = gb == 0, last = ge == a.groups_pad;
    const char* const xk = reinterpret_cast<const char*>(a.xt + gb / kXtKbGroups * a.xt_kb_floats);
    float* p = part;
    int64_t h0 = 0;
    for (int64_t rt = 0; rt < row_tiles; ++rt) {
      const int64_t h = halves / row_tiles + (rt < halves % row_tiles ? 1 : 0);
      const char* const xs = xk + (h0 >> 1) * kXtKbSlabFloats * 4;
      // 8 channels a call; their rows leave as soon as their tiles are done,
      // so that the stores drain while the next tiles compute
      if (h >= 7) {
        for (int64_t c = 4 * t0; c < c_end;) {
          const int64_t ce = c + 8 < c_end ? c + 8 : c_end;
          with_tile_height<7, 10>(h, h0 & 1, [&](auto H, auto Odd) {
            tile1<decltype(H)::value, decltype(Odd)::value>(a, c, ce, xs, gb, ge, first, p);
          });
          if (last) store_row_tile<true>(a, p, h0, h, c, ce);
          p += 8 * h * (ce - c);
          c = ce;
        }
      } else {
        for (int64_t u = 2 * t0; u < units_end;) {
          const int64_t ue = u + 4 < units_end ? u + 4 : units_end;
          with_tile_height<1, 6>(h, h0 & 1, [&](auto H, auto Odd) {
            tile2<decltype(H)::value, decltype(Odd)::value>(a, u, ue, xs, gb, ge, first, p);
          });
          if (last) store_row_tile<false>(a, p, h0, h, 2 * u, 2 * ue);
          p += 16 * h * (ue - u);  // 2 * h * 8 floats a tile
          u = ue;
        }
      }
      h0 += h;
    }
  }
}

}  // namespace sparse24
}  // namespace pyaccel
