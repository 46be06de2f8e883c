// Fused depthwise-separable conv, AVX-512: depthwise 4 pixels x 64 channels per block,
// pointwise 12 x 32 micro-kernel (24 zmm accumulators; a 12 x 16 one for a
// last panel of <= 16 channels). Compiled with the AVX-512 flags only.
#include <immintrin.h>

// GCC 12 flags the _mm512_undefined_ps() inside _mm512_max_ps/_mm512_min_ps as
// "may be used uninitialized" once they are inlined deep into templates (a false positive).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "dwconv_fused/dws_generic.h"

namespace pyaccel {
namespace dws {
namespace {

struct V512 {
  using R = __m512;
  static constexpr int W = 16;
  static R set1(float v) { return _mm512_set1_ps(v); }
  static R loadu(const float* p) { return _mm512_loadu_ps(p); }
  using M = __mmask16;
  static M mask(int n) { return static_cast<__mmask16>((1u << n) - 1); }
  static R loadm(const float* p, M m) { return _mm512_maskz_loadu_ps(m, p); }
  static void storeu(float* p, R r) { _mm512_storeu_ps(p, r); }
  static void stream(float* p, R r) { _mm512_stream_ps(p, r); }
  static void storen(float* p, R r, int n) { _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), r); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static R add(R a, R b) { return _mm512_add_ps(a, b); }
  static R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static R div(R a, R b) { return _mm512_div_ps(a, b); }
  static R max(R a, R b) { return _mm512_max_ps(a, b); }
  static R min(R a, R b) { return _mm512_min_ps(a, b); }
  // exp(x): 2^n * p(r), r = x - n ln2 (Cody-Waite), degree-6 polynomial; ~1 ulp
  static R exp(R x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-103.f)), _mm512_set1_ps(88.7f));
    const R n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    R r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    R p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(p, n);
  }
};

}  // namespace

void dw_avx512(const Problem& pr, int64_t p0, int64_t p1, float* t, int64_t ldt) {
  generic::dw<V512, 4, 4>(pr, p0, p1, t, ldt);
}

void pw_avx512(const Problem& pr, const float* t, int64_t ldt, int64_t p0, int64_t p1, int64_t q0, int64_t q1) {
  generic::pw<V512, 12, 32>(pr, t, ldt, p0, p1, q0, q1);
}

void act2_avx512(float* y, int64_t ldy, int64_t rows, int64_t c0, int64_t c1, const PackedHeader& h) {
  generic::act_rows<V512>(y, ldy, rows, c0, c1, h);
}

}  // namespace dws
}  // namespace pyaccel
