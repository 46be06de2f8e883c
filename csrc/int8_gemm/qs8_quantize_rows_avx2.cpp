// Dynamic per-row int8 quantization, AVX2: 8 values per step, scalar tails.
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

}  // namespace

void quantize_rows_avx2(const void* x, int64_t ldx, bool x_bf16, int64_t m0, int64_t m1,
                        int64_t k, int64_t k_pad, int64_t ldq, uint8_t zero_point, int qmax, int8_t* q,
                        float* scale) {
  const float fq = static_cast<float>(qmax);
  const size_t esize = x_bf16 ? 2 : 4;
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i lo = _mm256_set1_epi32(-qmax), hi = _mm256_set1_epi32(qmax);
  const __m128i zp = _mm_set1_epi8(static_cast<char>(zero_point));
  for (int64_t m = m0; m < m1; ++m) {
    const void* row = static_cast<const char*>(x) + m * ldx * esize;
    __m256 vmax = _mm256_setzero_ps();
    __m256 vbad = _mm256_setzero_ps();  // sum of x * 0: NaN iff the row has an inf or NaN
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) {
      const __m256 v = load8(row, x_bf16, i);
      vmax = _mm256_max_ps(vmax, _mm256_and_ps(v, absmask));
      vbad = _mm256_add_ps(vbad, _mm256_mul_ps(v, _mm256_setzero_ps()));
    }
    alignas(32) float t[8];
    _mm256_store_ps(t, vmax);
    float amax = 0.f;
    for (int j = 0; j < 8; ++j) amax = std::fmax(amax, t[j]);
    _mm256_store_ps(t, vbad);
    bool bad = false;
    for (int j = 0; j < 8; ++j) bad |= std::isnan(t[j]);
    for (; i < k; ++i) {
      const float v = load1(row, x_bf16, i);
      amax = std::fmax(amax, std::fabs(v));
      bad |= !std::isfinite(v);
    }
    if (bad) {
      mark_nonfinite_row(q + m * ldq, k_pad, zero_point, scale + m);
      continue;
    }
    scale[m] = amax / fq;
    int8_t* qr = q + m * ldq;
    if (amax < kTinyAmax && amax > 0.f) {
      quantize_tiny_row(row, x_bf16, k, k_pad, amax, zero_point, qmax, qr);
      continue;
    }
    const float inv = amax > 0.f ? fq / amax : 0.f;
    const __m256 vinv = _mm256_set1_ps(inv);
    for (i = 0; i + 8 <= k; i += 8) {
      __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(load8(row, x_bf16, i), vinv));
      v = _mm256_min_epi32(_mm256_max_epi32(v, lo), hi);
      const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
      const __m128i w8 = _mm_add_epi8(_mm_packs_epi16(w16, w16), zp);
      _mm_storel_epi64(reinterpret_cast<__m128i*>(qr + i), w8);
    }
    for (; i < k; ++i) {
      float v = std::nearbyint(load1(row, x_bf16, i) * inv);
      v = std::fmin(fq, std::fmax(-fq, v));
      qr[i] = encode_q(static_cast<int>(v), zero_point);
    }
    for (; i < k_pad; ++i) qr[i] = static_cast<int8_t>(zero_point);
  }
}

}  // namespace int8_gemm
}  // namespace pyaccel
