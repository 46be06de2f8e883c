// 2:4 sparse GEMM for many rows, AVX2: the AVX-512 column kernel's scheme
// (s24_gemm_cols_avx512.cpp) with 256-bit registers. x is transposed into the
// same 16-row slabs (xt[slab][k][16]: one 64-byte line per input), a tile is
// 4 channels (a quarter panel) x 16 rows = 8 accumulators: per kept weight one
// in-lane vpermilps spreads the value and two FMAs take the two halves of the
// slab line of input 4g + i as memory operands. 16 ymm registers hold the 8
// accumulators, the 2 weight tables and the 2 spread weights.
//
// The row-tile AVX2 kernel (s24_gemm_4x8_avx2) needs a permute per FMA and
// chains two FMAs per accumulator and group; this one has no permute on the x
// side and 8 independent accumulators.
#include <immintrin.h>

#include <cstring>

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

#define S24C2_ALL(OP) OP(0) OP(1) OP(2) OP(3)
#define S24C2_DECL(c)                                                                  \
  __m256 a##c##0 = first ? _mm256_setzero_ps() : _mm256_load_ps(part + (2 * c) * 8);   \
  __m256 a##c##1 = first ? _mm256_setzero_ps() : _mm256_load_ps(part + (2 * c + 1) * 8);
#define S24C2_SAVE(c)                                  \
  _mm256_store_ps(part + (2 * c) * 8, a##c##0);        \
  _mm256_store_ps(part + (2 * c + 1) * 8, a##c##1);
// channel c, group j: x[4g + i0] * v0 + x[4g + i1] * v1 over 16 rows; the
// position byte gives 64 * i0 = byte & 0xC0 and 16 * i1 = byte & 0x30
#define S24C2_CHANNEL(c)                                              \
  {                                                                   \
    const uint32_t t = pw >> (8 * c);                                 \
    const uint64_t o0 = t & 0xC0u, o1 = 4 * (t & 0x30u);              \
    const __m256 w0 = _mm256_permute_ps(t0, (c & 3) * 0x55);          \
    const __m256 w1 = _mm256_permute_ps(t1, (c & 3) * 0x55);          \
    fma231(a##c##0, w0, x + j * 256 + o0);                            \
    fma231(a##c##1, w0, x + j * 256 + o0 + 32);                       \
    fma231(a##c##0, w1, x + j * 256 + o1);                            \
    fma231(a##c##1, w1, x + j * 256 + o1 + 32);                       \
  }

// channels 4t .. 4t+4 (quarter t & 3 of panel t >> 2) x slab s, groups [gb, ge)
inline void tile(const ColsArgs& a, int64_t t, int64_t s, int64_t gb, int64_t ge, bool first, bool last,
                 float* part) {
  S24C2_ALL(S24C2_DECL)
  const int64_t blocks = a.groups_pad / kBlockGroups;
  const int64_t quarter = (t & 3) * 4;
  const uint8_t* blk = a.w + ((t >> 2) * blocks + gb / kBlockGroups) * kBlockBytes;
  const uint8_t* const blk_end = blk + (ge - gb) / kBlockGroups * kBlockBytes;
  const char* x = reinterpret_cast<const char*>(a.xt + s * slab_floats(a.kp) + gb * 4 * 16);
  for (; blk < blk_end; blk += kBlockBytes, x += kBlockGroups * 4 * 64) {
#pragma GCC unroll 4
    for (int j = 0; j < kBlockGroups; ++j) {
      uint32_t pw;
      std::memcpy(&pw, blk + pos_at(j) + quarter, 4);
      __m256 t0 = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(blk + v0_at(j)) + quarter / 4);
      __m256 t1 = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(blk + v1_at(j)) + quarter / 4);
      asm("" : "+x"(t0), "+x"(t1));  // keep them tables, not broadcast loads per weight
      S24C2_ALL(S24C2_CHANNEL)
    }
  }
  if (last) {
    const __m256 lo[4] = {a00, a10, a20, a30}, hi[4] = {a01, a11, a21, a31};
    store_rows8(a, lo, s * 16, t * 4);
    if (s * 16 + 8 < a.m) store_rows8(a, hi, s * 16 + 8, t * 4);
  } else {
    S24C2_ALL(S24C2_SAVE)
  }
}

}  // namespace

void s24_pack_xt_avx2(const void* x, int64_t ldx, bool x_bf16, int64_t m, int64_t k, int64_t kp, float* xt,
                      int64_t s0, int64_t s1) {
  for_each_xt_block<8>(m, k, kp, xt, s0, s1, [&](int64_t row0, int64_t rows, int64_t cols, int64_t k0, float* out) {
    alignas(32) float buf[8];
    for (int h = 0; h < 2; ++h) {  // rows 8h .. 8h+8 -> lines [k0 .. k0+8)[8h .. 8h+8)
      __m256 r[8];
      for (int i = 0; i < 8; ++i) {
        const int64_t row = 8 * h + i;
        if (row >= rows || cols == 0) {
          r[i] = _mm256_setzero_ps();
        } else if (cols == 8 && !x_bf16) {
          r[i] = _mm256_loadu_ps(static_cast<const float*>(x) + (row0 + row) * ldx + k0);
        } else {
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
      }
      transpose8x8(r);
      for (int c = 0; c < 8; ++c) _mm256_store_ps(out + c * 16 + 8 * h, r[c]);
    }
  });
}

// Channel tiles here are 4 channels: [t0, t1) counts quarter panels.
void s24_gemm_cols_avx2(const ColsArgs& a, int64_t t0, int64_t t1, float* part) {
  const int64_t slabs = (a.m + 15) / 16;
  const int64_t tiles_n = (a.n + 3) / 4;
  if (t1 > tiles_n) t1 = tiles_n;
  const int64_t kcg = a.kc_groups;
  for (int64_t gb = 0; gb < a.groups_pad; gb += kcg) {
    const int64_t ge = gb + kcg < a.groups_pad ? gb + kcg : a.groups_pad;
    const bool first = gb == 0, last = ge == a.groups_pad;
    float* p = part;
    for (int64_t s = 0; s < slabs; ++s)
      for (int64_t t = t0; t < t1; ++t, p += 64) tile(a, t, s, gb, ge, first, last, p);
  }
}

}  // namespace sparse24
}  // namespace pyaccel
