// Fused depthwise-separable conv, AVX2 + FMA: depthwise 4 pixels x 16 channels per
// chunk, pointwise 6 x 16 micro-kernel (12 ymm accumulators; 6 x 8 for a
// last panel of <= 8 channels). Compiled with the AVX2 flags only.
#include <immintrin.h>

#include "dwconv_fused/dws_generic.h"

namespace pyaccel {
namespace dws {
namespace {

struct V256 {
  using R = __m256;
  static constexpr int W = 8;
  static __m256i first(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static R set1(float v) { return _mm256_set1_ps(v); }
  static R loadu(const float* p) { return _mm256_loadu_ps(p); }
  using M = __m256i;
  static M mask(int n) { return first(n); }
  static R loadm(const float* p, M m) { return _mm256_maskload_ps(p, m); }
  static void storeu(float* p, R r) { _mm256_storeu_ps(p, r); }
  static void stream(float* p, R r) { _mm256_stream_ps(p, r); }
  static void storen(float* p, R r, int n) { _mm256_maskstore_ps(p, first(n), r); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static R add(R a, R b) { return _mm256_add_ps(a, b); }
  static R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static R div(R a, R b) { return _mm256_div_ps(a, b); }
  static R max(R a, R b) { return _mm256_max_ps(a, b); }
  static R min(R a, R b) { return _mm256_min_ps(a, b); }
  // exp(x) as in the AVX-512 file; 2^n built in the exponent bits
  static R exp(R x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    const R n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    R r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    R p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  }
};

}  // namespace

void dw_avx2(const Problem& pr, int64_t p0, int64_t p1, float* t, int64_t ldt) {
  generic::dw<V256, 2, 4>(pr, p0, p1, t, ldt);
}

void pw_avx2(const Problem& pr, const float* t, int64_t ldt, int64_t p0, int64_t p1, int64_t q0, int64_t q1) {
  generic::pw<V256, 6, 16>(pr, t, ldt, p0, p1, q0, q1);
}

void act2_avx2(float* y, int64_t ldy, int64_t rows, int64_t c0, int64_t c1, const PackedHeader& h) {
  generic::act_rows<V256>(y, ldy, rows, c0, c1, h);
}

}  // namespace dws
}  // namespace pyaccel
