// Dynamic per-row int8 quantization, AVX-512: two passes over each row
// (max |x|, then scale-round-narrow), 64 values per step, masked tails.
// Bit-exact with the reference: inv = qmax / amax in fp32, vcvtps2dq rounds to
// nearest even like torch.round. Rows with 0 < amax < kTinyAmax (qmax / amax
// could overflow) go to the portable quantize_tiny_row instead of pass 2.
#include <immintrin.h>

#include "int8_gemm/int8_gemm.h"

namespace pyaccel {
namespace int8_gemm {
namespace {

inline __m512 load16(const void* x, bool bf16, int64_t i, __mmask16 mask) {
  if (bf16) {
    const __m256i h = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(x) + i);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(x) + i);
}

inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? __mmask16(0xffff) : left > 0 ? static_cast<__mmask16>((1u << left) - 1) : __mmask16(0);
}

}  // namespace

// Pass 1 keeps four running maxima (no serial chain); pass 2 converts 64 values
// per step and narrows them with two saturating packs and one vpermd. |x| <=
// amax gives |x * qmax/amax| <= qmax (1 + 2 eps), so round-to-nearest never
// leaves [-qmax, qmax] and the packs need no clamp before them. Non-finite rows:
// an inf makes amax inf (caught after pass 1); a NaN escapes vmaxps but
// converts to the integer indefinite, which saturates to -128 -- a byte no
// finite value produces -- and is caught after pass 2.
void quantize_rows_avx512(const void* x, int64_t ldx, bool x_bf16, int64_t m0, int64_t m1,
                          int64_t k, int64_t k_pad, int64_t ldq, uint8_t zero_point, int qmax, int8_t* q,
                          float* scale) {
  const size_t esize = x_bf16 ? 2 : 4;
  const float fq = static_cast<float>(qmax);
  const __m512i zp = _mm512_set1_epi8(static_cast<char>(zero_point));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  const __m512i minus128 = _mm512_set1_epi8(-128);
  for (int64_t m = m0; m < m1; ++m) {
    const void* row = static_cast<const char*>(x) + m * ldx * esize;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 64 <= k; i += 64) {
      a0 = _mm512_max_ps(a0, _mm512_abs_ps(load16(row, x_bf16, i, 0xffff)));
      a1 = _mm512_max_ps(a1, _mm512_abs_ps(load16(row, x_bf16, i + 16, 0xffff)));
      a2 = _mm512_max_ps(a2, _mm512_abs_ps(load16(row, x_bf16, i + 32, 0xffff)));
      a3 = _mm512_max_ps(a3, _mm512_abs_ps(load16(row, x_bf16, i + 48, 0xffff)));
    }
    for (; i < k; i += 16) a0 = _mm512_max_ps(a0, _mm512_abs_ps(load16(row, x_bf16, i, tail_mask(k - i))));
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(a0, a1), _mm512_max_ps(a2, a3)));
    int8_t* qr = q + m * ldq;
    if (!(amax <= 3.4028234663852886e38f)) {  // inf (or a NaN that survived the maxima)
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
    const __m512 vinv = _mm512_set1_ps(inv);
    __mmask64 bad = 0;
    for (i = 0; i + 64 <= k_pad; i += 64) {
      const __m512i c0 = _mm512_cvtps_epi32(_mm512_mul_ps(load16(row, x_bf16, i, tail_mask(k - i)), vinv));
      const __m512i c1 = _mm512_cvtps_epi32(_mm512_mul_ps(load16(row, x_bf16, i + 16, tail_mask(k - i - 16)), vinv));
      const __m512i c2 = _mm512_cvtps_epi32(_mm512_mul_ps(load16(row, x_bf16, i + 32, tail_mask(k - i - 32)), vinv));
      const __m512i c3 = _mm512_cvtps_epi32(_mm512_mul_ps(load16(row, x_bf16, i + 48, tail_mask(k - i - 48)), vinv));
      const __m512i b = _mm512_permutexvar_epi32(
          order, _mm512_packs_epi16(_mm512_packs_epi32(c0, c1), _mm512_packs_epi32(c2, c3)));
      bad |= _mm512_cmpeq_epi8_mask(b, minus128);
      _mm512_storeu_si512(qr + i, _mm512_add_epi8(b, zp));
    }
    for (; i < k_pad; i += 16) {
      const __m512i c = _mm512_cvtps_epi32(_mm512_mul_ps(load16(row, x_bf16, i, tail_mask(k - i)), vinv));
      const __m128i b = _mm512_cvtsepi32_epi8(c);
      bad |= _mm_cmpeq_epi8_mask(b, _mm512_castsi512_si128(minus128));
      _mm_mask_storeu_epi8(qr + i, tail_mask(k_pad - i), _mm_add_epi8(b, _mm512_castsi512_si128(zp)));
    }
    if (bad) mark_nonfinite_row(qr, k_pad, zero_point, scale + m);
  }
}

}  // namespace int8_gemm
}  // namespace pyaccel
