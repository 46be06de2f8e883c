// Fused depthwise-separable conv, portable C++ (any x86-64): the generic
// kernel over one-lane "vectors", pointwise 1 x 16 tiles.
#include <cmath>

#include "dwconv_fused/dws_generic.h"

namespace pyaccel {
namespace dws {
namespace {

struct V1 {
  using R = float;
  static constexpr int W = 1;
  static R set1(float v) { return v; }
  static R loadu(const float* p) { return *p; }
  using M = bool;
  static M mask(int n) { return n >= 1; }
  static R loadm(const float* p, M m) { return m ? *p : 0.f; }
  static void storeu(float* p, R r) { *p = r; }
  static void stream(float* p, R r) { *p = r; }
  static void storen(float* p, R r, int n) { if (n >= 1) *p = r; }
  static R fma(R a, R b, R c) { return a * b + c; }  // no libm fma call: two roundings
  static R add(R a, R b) { return a + b; }
  static R mul(R a, R b) { return a * b; }
  static R div(R a, R b) { return a / b; }
  static R max(R a, R b) { return a > b ? a : b; }
  static R min(R a, R b) { return a < b ? a : b; }
  static R exp(R x) { return std::exp(x); }
};

}  // namespace

void dw_scalar(const Problem& pr, int64_t p0, int64_t p1, float* t, int64_t ldt) {
  generic::dw<V1, 8, 1>(pr, p0, p1, t, ldt);
}

void pw_scalar(const Problem& pr, const float* t, int64_t ldt, int64_t p0, int64_t p1, int64_t q0, int64_t q1) {
  generic::pw<V1, 1, 16>(pr, t, ldt, p0, p1, q0, q1);
}

void act2_portable(float* y, int64_t ldy, int64_t rows, int64_t c0, int64_t c1, const PackedHeader& h) {
  generic::act_rows<V1>(y, ldy, rows, c0, c1, h);
}

}  // namespace dws
}  // namespace pyaccel
