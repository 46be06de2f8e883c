// Dynamic per-row int8 quantization, AVX-512: two passes over each row
// (max |x|, then scale-round-clamp-narrow), 16 values per step, masked tails.
// Bit-exact with the reference: inv = 127 / amax in fp32, vcvtps2dq rounds to
// nearest even like torch.round.
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

}  // namespace

void quantize_rows_avx512(const void* x, int64_t ldx, bool x_bf16, int64_t m0, int64_t m1,
                          int64_t k, int64_t k_pad, int64_t ldq, uint8_t xor_mask, int8_t* q,
                          float* scale) {
  const size_t esize = x_bf16 ? 2 : 4;
  const __m128i xr = _mm_set1_epi8(static_cast<char>(xor_mask));
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  for (int64_t m = m0; m < m1; ++m) {
    const void* row = static_cast<const char*>(x) + m * ldx * esize;
    __m512 vmax = _mm512_setzero_ps();
    __m512 vbad = _mm512_setzero_ps();  // sum of x * 0: NaN iff the row has an inf or NaN
    const __m512 zero = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= k; i += 16) {
      const __m512 v = load16(row, x_bf16, i, 0xffff);
      vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
      vbad = _mm512_add_ps(vbad, _mm512_mul_ps(v, zero));
    }
    if (i < k) {
      const __mmask16 mk = static_cast<__mmask16>((1u << (k - i)) - 1);
      const __m512 v = load16(row, x_bf16, i, mk);
      vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
      vbad = _mm512_add_ps(vbad, _mm512_mul_ps(v, zero));
    }
    if (_mm512_cmp_ps_mask(vbad, vbad, _CMP_UNORD_Q)) {
      mark_nonfinite_row(q + m * ldq, k_pad, xor_mask, scale + m);
      continue;
    }
    const float amax = _mm512_reduce_max_ps(vmax);
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    scale[m] = amax / 127.f;
    const __m512 vinv = _mm512_set1_ps(inv);
    int8_t* qr = q + m * ldq;
    for (i = 0; i < k_pad; i += 16) {
      const int64_t left = k - i;
      const __mmask16 mk = left >= 16 ? __mmask16(0xffff)
                           : left > 0 ? static_cast<__mmask16>((1u << left) - 1) : __mmask16(0);
      __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(load16(row, x_bf16, i, mk), vinv));
      v = _mm512_min_epi32(_mm512_max_epi32(v, lo), hi);
      const __m128i b = _mm_xor_si128(_mm512_cvtsepi32_epi8(v), xr);
      const int64_t out_left = k_pad - i;
      const __mmask16 ms = out_left >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << out_left) - 1);
      _mm_mask_storeu_epi8(qr + i, ms, b);
    }
  }
}

}  // namespace int8_gemm
}  // namespace pyaccel
