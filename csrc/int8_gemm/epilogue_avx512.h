// Dequantization epilogue shared by the AVX-512 kernels (included only from
// files compiled with AVX-512 flags; everything here is static inline).
#pragma once
#include <immintrin.h>

#include "common/bf16_avx512.h"
#include "int8_gemm/int8_gemm.h"

namespace pyaccel {
namespace int8_gemm {
namespace avx512 {

// fp32 -> bf16 (common/bf16_avx512.h)
static inline __m256i cvt_fp32_bf16(__m512 v) { return cvt_fp32_bf16_avx512(v); }

// y[n0 .. n0+16) = float(acc) * sa * w_scale + bias (order: split_scale), masked to n < N.
static inline void store16(const GemmArgs& g, __m512i acc, float sa, int64_t m, int64_t n0) {
  const int64_t left = g.n - n0;
  if (left <= 0) return;
  const __mmask16 mask = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
  const __m512 ws = _mm512_maskz_loadu_ps(mask, g.w_scale + n0);
  // split_scale's order, without its multiplications by 1 (same results)
  const __m512 a = _mm512_cvtepi32_ps(acc), vs = _mm512_set1_ps(sa);
  __m512 v = sa < 1.f ? _mm512_mul_ps(_mm512_mul_ps(a, vs), ws) : _mm512_mul_ps(a, _mm512_mul_ps(vs, ws));
  if (g.bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, g.bias + n0));
  if (g.c_bf16) {
    uint16_t* c = static_cast<uint16_t*>(g.c) + m * g.ldc + n0;
    _mm256_mask_storeu_epi16(c, mask, cvt_fp32_bf16(v));
  } else {
    float* c = static_cast<float*>(g.c) + m * g.ldc + n0;
    _mm512_mask_storeu_ps(c, mask, v);
  }
}

}  // namespace avx512
}  // namespace int8_gemm
}  // namespace pyaccel
