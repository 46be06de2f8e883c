// Dynamic per-row int8 quantization, AVX2: 32 values per step, then 8, scalar tails.
// Bit-exact with the reference (fp32 qmax/amax, round to nearest even); rows
// with 0 < amax < kTinyAmax go to the portable quantize_tiny_row.
#include <immintrin.h>

#include <cmath>

#include "int8_gemm/int8_gemm.h"

namespace pyaccel {
namespace int8_gemm {
namespace {

inline __m256 load8(const void* x, bool bf16, int64_t i) {
  if (bf16) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  return _mm256_loadu_ps(static_cast<const float*>(x) + i);
}
inline float load1(const void* x, bool bf16, int64_t i) {
  return bf16 ? bf16_to_fp32(static_cast<const uint16_t*>(x)[i]) : static_cast<const float*>(x)[i];
}

// Narrows 32 int32 (c0 .. c3, 8 each, in order) to 32 bytes in order: two
// saturating packs interleave the 128-bit lanes, one vpermd restores the order.
inline __m256i narrow32(__m256i c0, __m256i c1, __m256i c2, __m256i c3) {
  const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(c0, c1), _mm256_packs_epi32(c2, c3));
  return _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

}  // namespace

// Pass 1 keeps four running maxima over 32 values a step (no serial chain);
// pass 2 converts 32 values a step and narrows them with two saturating packs
// and one vpermd. |x| <= amax gives |x * qmax/amax| <= qmax (1 + 2 eps), so
// round-to-nearest never leaves [-qmax, qmax] and the packs need no clamp.
// Non-finite rows: an inf makes amax inf (caught after pass 1); a NaN can
// escape vmaxps (it returns its second operand when either is NaN) but
// converts to the integer indefinite, which saturates to -128 -- a byte no
// finite value produces -- and is caught after pass 2. The scalar tails check
// their values themselves.
void quantize_rows_avx2(const void* x, int64_t ldx, bool x_bf16, int64_t m0, int64_t m1,
                        int64_t k, int64_t k_pad, int64_t ldq, uint8_t zero_point, int qmax, int8_t* q,
                        float* scale) {
  const float fq = static_cast<float>(qmax);
  const size_t esize = x_bf16 ? 2 : 4;
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i zp = _mm256_set1_epi8(static_cast<char>(zero_point));
  const __m256i minus128 = _mm256_set1_epi8(-128);
  for (int64_t m = m0; m < m1; ++m) {
    const void* row = static_cast<const char*>(x) + m * ldx * esize;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 32 <= k; i += 32) {
      a0 = _mm256_max_ps(a0, _mm256_and_ps(load8(row, x_bf16, i), absmask));
      a1 = _mm256_max_ps(a1, _mm256_and_ps(load8(row, x_bf16, i + 8), absmask));
      a2 = _mm256_max_ps(a2, _mm256_and_ps(load8(row, x_bf16, i + 16), absmask));
      a3 = _mm256_max_ps(a3, _mm256_and_ps(load8(row, x_bf16, i + 24), absmask));
    }
    for (; i + 8 <= k; i += 8) a0 = _mm256_max_ps(a0, _mm256_and_ps(load8(row, x_bf16, i), absmask));
    alignas(32) float t[8];
    _mm256_store_ps(t, _mm256_max_ps(_mm256_max_ps(a0, a1), _mm256_max_ps(a2, a3)));
    float amax = 0.f;
    for (int j = 0; j < 8; ++j) amax = std::fmax(amax, t[j]);
    bool bad = false;
    for (; i < k; ++i) {
      const float v = load1(row, x_bf16, i);
      amax = std::fmax(amax, std::fabs(v));
      bad |= !std::isfinite(v);
    }
    int8_t* qr = q + m * ldq;
    if (bad || !(amax <= 3.4028234663852886e38f)) {  // inf (or a NaN that survived the maxima)
      mark_nonfinite_row(qr, k_pad, zero_point, scale + m);
      continue;
    }
    scale[m] = amax / fq;
    if (amax < kTinyAmax && amax > 0.f) {
      if (!quantize_tiny_row(row, x_bf16, k, k_pad, amax, zero_point, qmax, qr))  // a NaN that escaped the maxima
        mark_nonfinite_row(qr, k_pad, zero_point, scale + m);
      continue;
    }
    const float inv = amax > 0.f ? fq / amax : 0.f;
    const __m256 vinv = _mm256_set1_ps(inv);
    __m256i vbad = _mm256_setzero_si256();
    const auto conv = [&](int64_t j) { return _mm256_cvtps_epi32(_mm256_mul_ps(load8(row, x_bf16, j), vinv)); };
    for (i = 0; i + 32 <= k; i += 32) {
      const __m256i b = narrow32(conv(i), conv(i + 8), conv(i + 16), conv(i + 24));
      vbad = _mm256_or_si256(vbad, _mm256_cmpeq_epi8(b, minus128));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(qr + i), _mm256_add_epi8(b, zp));
    }
    for (; i + 8 <= k; i += 8) {
      const __m256i c = conv(i);
      const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
      const __m128i w8 = _mm_packs_epi16(w16, w16);
      vbad = _mm256_or_si256(vbad, _mm256_zextsi128_si256(_mm_cmpeq_epi8(w8, _mm256_castsi256_si128(minus128))));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(qr + i), _mm_add_epi8(w8, _mm256_castsi256_si128(zp)));
    }
    for (; i < k; ++i) {
      float v = std::nearbyint(load1(row, x_bf16, i) * inv);
      v = std::fmin(fq, std::fmax(-fq, v));
      qr[i] = encode_q(static_cast<int>(v), zero_point);
    }
    for (; i < k_pad; ++i) qr[i] = static_cast<int8_t>(zero_point);
    if (!_mm256_testz_si256(vbad, vbad)) mark_nonfinite_row(qr, k_pad, zero_point, scale + m);
  }
}

}  // namespace int8_gemm
}  // namespace pyaccel
