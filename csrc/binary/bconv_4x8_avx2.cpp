// Binary implicit-GEMM tile, AVX2 (no vector popcount): up to 4 pixels x 8
// output channels per pass, four passes over a 32-channel block. Popcount by
// nibble lookup (vpshufb) into byte counters, which are summed into 64-bit
// lane counters (vpsadbw) every 31 words, before a byte can overflow
// (31 * 8 = 248). Epilogue in registers, 8 channels at a time (multiply,
// then add: the reference's rounding).
#include <immintrin.h>

#include "binary/binary.h"

namespace pyaccel {
namespace binary {
namespace {

constexpr int kFlushWords = 31;

template <int MR>
void pass(const TileArgs& a, const uint64_t* const* x, const uint64_t* w, __m256i (*out)[2]) {
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1,
                                       2, 2, 3, 2, 3, 3, 4);
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  __m256i b8[MR][2], s64[MR][2];
#pragma GCC unroll 4
  for (int p = 0; p < MR; ++p) {
    b8[p][0] = b8[p][1] = _mm256_setzero_si256();
    s64[p][0] = s64[p][1] = _mm256_setzero_si256();
  }
  int pending = 0;
  const int64_t cw = a.cw;
  for (int t = 0; t < a.ntaps; ++t) {
    const int64_t off = a.tap_off[t];
    const uint64_t* wt = w + t * cw * kNR;
    for (int64_t i = 0; i < cw; ++i) {
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wt + i * kNR));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wt + i * kNR + 4));
#pragma GCC unroll 4
      for (int p = 0; p < MR; ++p) {
        const __m256i b = _mm256_set1_epi64x(static_cast<long long>(x[p][off + i]));
        const __m256i v0 = _mm256_xor_si256(b, w0), v1 = _mm256_xor_si256(b, w1);
        b8[p][0] = _mm256_add_epi8(b8[p][0], _mm256_shuffle_epi8(lut, _mm256_and_si256(v0, low4)));
        b8[p][0] = _mm256_add_epi8(b8[p][0],
                                   _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v0, 4), low4)));
        b8[p][1] = _mm256_add_epi8(b8[p][1], _mm256_shuffle_epi8(lut, _mm256_and_si256(v1, low4)));
        b8[p][1] = _mm256_add_epi8(b8[p][1],
                                   _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v1, 4), low4)));
      }
      if (++pending == kFlushWords) {
        pending = 0;
#pragma GCC unroll 4
        for (int p = 0; p < MR; ++p) {
          s64[p][0] = _mm256_add_epi64(s64[p][0], _mm256_sad_epu8(b8[p][0], _mm256_setzero_si256()));
          s64[p][1] = _mm256_add_epi64(s64[p][1], _mm256_sad_epu8(b8[p][1], _mm256_setzero_si256()));
          b8[p][0] = b8[p][1] = _mm256_setzero_si256();
        }
      }
    }
  }
#pragma GCC unroll 4
  for (int p = 0; p < MR; ++p) {
    out[p][0] = _mm256_add_epi64(s64[p][0], _mm256_sad_epu8(b8[p][0], _mm256_setzero_si256()));
    out[p][1] = _mm256_add_epi64(s64[p][1], _mm256_sad_epu8(b8[p][1], _mm256_setzero_si256()));
  }
}

// 8 lanes of 64-bit counts (< 2**31) -> 8 int32, in order.
inline __m256i narrow(__m256i lo, __m256i hi) {
  const __m256 s = _mm256_shuffle_ps(_mm256_castsi256_ps(lo), _mm256_castsi256_ps(hi), _MM_SHUFFLE(2, 0, 2, 0));
  return _mm256_permute4x64_epi64(_mm256_castps_si256(s), _MM_SHUFFLE(3, 1, 2, 0));
}

template <int MR>
void tile(const TileArgs& a, const uint64_t* const* x, const uint64_t* w, const int32_t* const* corr,
          float* const* y, int nvalid, int64_t oc0) {
  __m256i pop[MR][2];
  const __m256i ktot = _mm256_set1_epi32(a.ktot);
  const __m256 zero = _mm256_setzero_ps(), lo = _mm256_set1_ps(a.lo), hi = _mm256_set1_ps(a.hi);
  for (int s = 0; s * 8 < nvalid; ++s) {
    pass<MR>(a, x, w + 8 * s, pop);
    const int n = nvalid - 8 * s < 8 ? nvalid - 8 * s : 8;
    const int64_t c = oc0 + 8 * s;
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    // vmaskmov is slow on AMD (microcoded stores): full groups of 8 use plain loads and stores
    const bool full = n == 8;
    auto load = [&](const float* p) { return full ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, mask); };
    const __m256 sc = a.scale ? load(a.scale + c) : _mm256_set1_ps(1.f);
    const __m256 sh = a.shift ? load(a.shift + c) : zero;
    const __m256 sl = a.act == kActPrelu ? load(a.slope + c) : zero;
    for (int p = 0; p < MR; ++p) {
      const __m256i cnt = narrow(pop[p][0], pop[p][1]);
      __m256i dot = _mm256_sub_epi32(ktot, _mm256_add_epi32(cnt, cnt));
      if (corr && corr[p]) {
        const int* cp = reinterpret_cast<const int*>(corr[p] + 8 * s);
        dot = _mm256_sub_epi32(dot, full ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cp))
                                         : _mm256_maskload_epi32(cp, mask));
      }
      __m256 v = _mm256_cvtepi32_ps(dot);
      if (a.scale) v = _mm256_mul_ps(v, sc);
      if (a.shift) v = _mm256_add_ps(v, sh);
      switch (a.act) {
        case kActRelu: v = _mm256_max_ps(zero, v); break;  // bound first: a NaN v stays NaN
        case kActHardtanh: v = _mm256_min_ps(hi, _mm256_max_ps(lo, v)); break;
        case kActPrelu: v = _mm256_blendv_ps(v, _mm256_mul_ps(v, sl), _mm256_cmp_ps(v, zero, _CMP_LT_OQ)); break;
        default: break;
      }
      if (full && a.stream)
        _mm256_stream_ps(y[p] + 8 * s, v);
      else if (full)
        _mm256_storeu_ps(y[p] + 8 * s, v);
      else
        _mm256_maskstore_ps(y[p] + 8 * s, mask, v);
    }
  }
}

}  // namespace

void tile_avx2(const TileArgs& a, int mr, const uint64_t* const* x, const uint64_t* w, const int32_t* const* corr,
               float* const* y, int nvalid, int64_t oc0) {
  switch (mr) {
    case 4: tile<4>(a, x, w, corr, y, nvalid, oc0); break;
    case 3: tile<3>(a, x, w, corr, y, nvalid, oc0); break;
    case 2: tile<2>(a, x, w, corr, y, nvalid, oc0); break;
    default: tile<1>(a, x, w, corr, y, nvalid, oc0); break;
  }
}

// Sign bits of one row of pixels; channels contiguous: 8 at a time (movemask).
void pack_row_avx2(const float* x, int64_t c, int64_t w, int64_t sc, int64_t sw, int64_t groups, int64_t cg,
                   int64_t cw, uint64_t* out) {
  if (sc != 1) {
    pack_row_scalar(x, c, w, sc, sw, groups, cg, cw, out);
    return;
  }
  const __m256 zero = _mm256_setzero_ps();
  const int64_t wpix = groups * cw;
  for (int64_t q = 0; q < w; ++q) {
    const float* xp = x + q * sw;
    uint64_t* o = out + q * wpix;
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t i = 0; i < cw; ++i) {
        const int64_t c0 = g * cg + i * 64, n = cg - i * 64 < 64 ? cg - i * 64 : 64;
        uint64_t word = 0;
        int64_t b = 0;
        for (; b + 8 <= n; b += 8)
          word |= uint64_t(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(xp + c0 + b), zero, _CMP_LT_OQ))) << b;
        for (; b < n; ++b) word |= uint64_t(xp[c0 + b] < 0.f) << b;
        o[g * cw + i] = word;
      }
  }
}

}  // namespace binary
}  // namespace pyaccel
