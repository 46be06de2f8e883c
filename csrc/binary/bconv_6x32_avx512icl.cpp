// Binary implicit-GEMM tile, AVX-512 + VPOPCNTDQ: up to 6 pixels x 32 output
// channels. For each input word (tap, word) the pixel's word is broadcast,
// xor-ed with the block's 32 weight words (4 vectors of 8 channels),
// popcounted (vpopcntq) and added to 64-bit lane counters: 24 counters x 512
// binary multiply-adds per word. Epilogue in registers: dot = ktot - 2 pop -
// corr (int32), to fp32, * scale, + shift (no FMA: equals the reference's
// rounding), activation, masked store (a non-temporal one for full 16-channel
// groups of a large output: TileArgs::stream).
#include <immintrin.h>

#include "binary/binary.h"

namespace pyaccel {
namespace binary {
namespace {

// CW1: one word per pixel and tap (<= 64 channels per group): the word loop
// compiled out.
template <int MR, bool CW1>
void tile(const TileArgs& a, const uint64_t* const* x, const uint64_t* w, const int32_t* const* corr,
          float* const* y, int nvalid, int64_t oc0) {
  __m512i acc[MR][4];
#pragma GCC unroll 8
  for (int p = 0; p < MR; ++p)
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) acc[p][v] = _mm512_setzero_si512();
  const int64_t cw = CW1 ? 1 : a.cw;
  for (int t = 0; t < a.ntaps; ++t) {
    const int64_t off = a.tap_off[t];
    const uint64_t* xp[MR];
#pragma GCC unroll 8
    for (int p = 0; p < MR; ++p) xp[p] = x[p] + off;
    const uint64_t* wt = w + t * cw * kNR;
    for (int64_t i = 0; i < cw; ++i) {
      const __m512i w0 = _mm512_loadu_si512(wt + i * kNR);
      const __m512i w1 = _mm512_loadu_si512(wt + i * kNR + 8);
      const __m512i w2 = _mm512_loadu_si512(wt + i * kNR + 16);
      const __m512i w3 = _mm512_loadu_si512(wt + i * kNR + 24);
#pragma GCC unroll 8
      for (int p = 0; p < MR; ++p) {
        const __m512i b = _mm512_set1_epi64(static_cast<long long>(xp[p][i]));
        acc[p][0] = _mm512_add_epi64(acc[p][0], _mm512_popcnt_epi64(_mm512_xor_si512(b, w0)));
        acc[p][1] = _mm512_add_epi64(acc[p][1], _mm512_popcnt_epi64(_mm512_xor_si512(b, w1)));
        acc[p][2] = _mm512_add_epi64(acc[p][2], _mm512_popcnt_epi64(_mm512_xor_si512(b, w2)));
        acc[p][3] = _mm512_add_epi64(acc[p][3], _mm512_popcnt_epi64(_mm512_xor_si512(b, w3)));
      }
    }
  }
  const __mmask16 m0 = nvalid >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << nvalid) - 1);
  const __mmask16 m1 = nvalid >= 32 ? __mmask16(0xFFFF) : nvalid <= 16 ? __mmask16(0) : __mmask16((1u << (nvalid - 16)) - 1);
  const __mmask16 mk[2] = {m0, m1};
  const __m512i ktot = _mm512_set1_epi32(a.ktot);
  const __m512 lo = _mm512_set1_ps(a.lo), hi = _mm512_set1_ps(a.hi), zero = _mm512_setzero_ps();
#pragma GCC unroll 2
  for (int h = 0; h < 2; ++h) {
    if (!mk[h]) break;
    const int64_t c = oc0 + 16 * h;
    const __m512 sc = a.scale ? _mm512_maskz_loadu_ps(mk[h], a.scale + c) : _mm512_set1_ps(1.f);
    const __m512 sh = a.shift ? _mm512_maskz_loadu_ps(mk[h], a.shift + c) : zero;
    const __m512 sl = a.act == kActPrelu ? _mm512_maskz_loadu_ps(mk[h], a.slope + c) : zero;
#pragma GCC unroll 8
    for (int p = 0; p < MR; ++p) {
      const __m512i pop = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(acc[p][2 * h])),
                                             _mm512_cvtepi64_epi32(acc[p][2 * h + 1]), 1);
      __m512i dot = _mm512_sub_epi32(ktot, _mm512_add_epi32(pop, pop));
      if (corr && corr[p]) dot = _mm512_sub_epi32(dot, _mm512_maskz_loadu_epi32(mk[h], corr[p] + 16 * h));
      __m512 v = _mm512_cvtepi32_ps(dot);
      if (a.scale) v = _mm512_mul_ps(v, sc);
      if (a.shift) v = _mm512_add_ps(v, sh);
      switch (a.act) {
        case kActRelu: v = _mm512_max_ps(zero, v); break;  // bound first: a NaN v stays NaN
        case kActHardtanh: v = _mm512_min_ps(hi, _mm512_max_ps(lo, v)); break;
        case kActPrelu: v = _mm512_mask_mul_ps(v, _mm512_cmp_ps_mask(v, zero, _CMP_LT_OQ), v, sl); break;
        default: break;
      }
      if (a.stream && mk[h] == __mmask16(0xFFFF))
        _mm512_stream_ps(y[p] + 16 * h, v);
      else
        _mm512_mask_storeu_ps(y[p] + 16 * h, mk[h], v);
    }
  }
}

}  // namespace

void tile_avx512icl(const TileArgs& a, int mr, const uint64_t* const* x, const uint64_t* w,
                    const int32_t* const* corr, float* const* y, int nvalid, int64_t oc0) {
  if (mr == 6) {
    (a.cw == 1 ? tile<6, true> : tile<6, false>)(a, x, w, corr, y, nvalid, oc0);
    return;
  }
  switch (mr) {
    case 5: tile<5, false>(a, x, w, corr, y, nvalid, oc0); break;
    case 4: tile<4, false>(a, x, w, corr, y, nvalid, oc0); break;
    case 3: tile<3, false>(a, x, w, corr, y, nvalid, oc0); break;
    case 2: tile<2, false>(a, x, w, corr, y, nvalid, oc0); break;
    default: tile<1, false>(a, x, w, corr, y, nvalid, oc0); break;
  }
}

// Sign bits of one row of pixels. Channels contiguous (sc == 1): 16 at a
// time, compare-to-mask; otherwise (NCHW: sw == 1) 16 pixels at a time, one
// channel's 16 values to a mask whose bits are spread over 16 pixels' words.
void pack_row_avx512(const float* x, int64_t c, int64_t w, int64_t sc, int64_t sw, int64_t groups, int64_t cg,
                     int64_t cw, uint64_t* out) {
  (void)c;
  const __m512 zero = _mm512_setzero_ps();
  const int64_t wpix = groups * cw;
  if (sc == 1) {
    for (int64_t q = 0; q < w; ++q) {
      const float* xp = x + q * sw;
      uint64_t* o = out + q * wpix;
      for (int64_t g = 0; g < groups; ++g)
        for (int64_t i = 0; i < cw; ++i) {
          const int64_t c0 = g * cg + i * 64, n = cg - i * 64 < 64 ? cg - i * 64 : 64;
          uint64_t word = 0;
          for (int64_t s = 0; s < n; s += 16) {
            const int64_t r = n - s;
            const __mmask16 lm = r >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << r) - 1);
            const __m512 v = _mm512_maskz_loadu_ps(lm, xp + c0 + s);
            word |= uint64_t(_mm512_mask_cmp_ps_mask(lm, v, zero, _CMP_LT_OQ)) << s;
          }
          o[g * cw + i] = word;
        }
    }
    return;
  }
  const __m512i idx = _mm512_mullo_epi64(_mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi64(wpix));
  int64_t q = 0;
  if (sw == 1) {
    for (; q + 16 <= w; q += 16) {
      for (int64_t g = 0; g < groups; ++g)
        for (int64_t i = 0; i < cw; ++i) {
          const int64_t c0 = g * cg + i * 64, n = cg - i * 64 < 64 ? cg - i * 64 : 64;
          __m512i lo = _mm512_setzero_si512(), hi = _mm512_setzero_si512();
          for (int64_t b = 0; b < n; ++b) {
            const __mmask16 m = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + (c0 + b) * sc + q), zero, _CMP_LT_OQ);
            const __m512i bit = _mm512_set1_epi64(static_cast<long long>(uint64_t(1) << b));
            lo = _mm512_mask_or_epi64(lo, __mmask8(m), lo, bit);
            hi = _mm512_mask_or_epi64(hi, __mmask8(m >> 8), hi, bit);
          }
          uint64_t* o = out + q * wpix + g * cw + i;
          _mm512_i64scatter_epi64(o, idx, lo, 8);
          _mm512_i64scatter_epi64(o + 8 * wpix, idx, hi, 8);
        }
    }
  }
  for (; q < w; ++q) {
    const float* xp = x + q * sw;
    uint64_t* o = out + q * wpix;
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t i = 0; i < cw; ++i) {
        const int64_t c0 = g * cg + i * 64, n = cg - i * 64 < 64 ? cg - i * 64 : 64;
        uint64_t word = 0;
        for (int64_t b = 0; b < n; ++b) word |= uint64_t(xp[(c0 + b) * sc] < 0.f) << b;
        o[g * cw + i] = word;
      }
  }
}

}  // namespace binary
}  // namespace pyaccel
