// The fused depthwise-separable kernel, written once over a vector type V
// (dws_12x32_avx512.cpp, dws_6x16_avx2.cpp and dws_1x16_scalar.cpp each
// include it with their own V and compile it with their own ISA flags).
//
// V provides: R (register), W (lanes), set1, loadu, loadn(p, n) (n in
// [0, W], zeros past n), storeu, storen(p, r, n), fma(a, b, c) = a * b + c,
// add, mul, div, max, min, exp.
#pragma once
#include <algorithm>
#include <cstdint>

#include "dwconv_fused/dwconv_fused.h"

namespace pyaccel {
namespace dws {
namespace generic {

template <class V>
inline typename V::R act(typename V::R v, int32_t kind, float lo, float hi) {
  using R = typename V::R;
  switch (kind) {
    case kRelu: return V::max(v, V::set1(0.f));
    case kRelu6: return V::min(V::max(v, V::set1(0.f)), V::set1(6.f));
    case kHardtanh: return V::min(V::max(v, V::set1(lo)), V::set1(hi));
    case kHardswish: {  // x * relu6(x + 3) / 6, as torch computes it
      R r = V::min(V::max(V::add(v, V::set1(3.f)), V::set1(0.f)), V::set1(6.f));
      return V::div(V::mul(v, r), V::set1(6.f));
    }
    case kSilu: {  // x / (1 + exp(-x))
      R e = V::exp(V::mul(v, V::set1(-1.f)));
      return V::div(v, V::add(V::set1(1.f), e));
    }
    default: return v;
  }
}

// Depthwise output of one pixel for NV vectors of channels from c0.
template <class V, int NV>
inline void dw_chunk(const Problem& pr, int64_t oy, int64_t ox, int64_t c0, float* tr) {
  using R = typename V::R;
  const PackedHeader& h = *pr.hd;
  R acc[NV];
  int nval[NV];
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) {
    acc[v] = V::loadu(pr.bd + c0 + v * V::W);
    nval[v] = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(V::W, pr.c - c0 - v * V::W)));
  }
  const int64_t iy0 = oy * h.sh - pr.pad_t, ix0 = ox * h.sw - pr.pad_l;
  for (int i = 0; i < h.kh; ++i) {
    const int64_t iy = iy0 + int64_t(i) * h.dh;
    if (iy < 0 || iy >= pr.h) continue;
    for (int j = 0; j < h.kw; ++j) {
      const int64_t ix = ix0 + int64_t(j) * h.dw;
      if (ix < 0 || ix >= pr.w) continue;
      const float* xr = pr.x + (iy * pr.w + ix) * pr.c + c0;
      const float* wr = pr.wd + int64_t(i * h.kw + j) * h.c_pad + c0;
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[v] = V::fma(V::loadn(xr + v * V::W, nval[v]), V::loadu(wr + v * V::W), acc[v]);
    }
  }
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) V::storeu(tr + c0 + v * V::W, act<V>(acc[v], h.act1, h.lo1, h.hi1));
}

template <class V, int NVMAX>
void dw(const Problem& pr, int64_t p0, int64_t p1, float* t, int64_t ldt) {
  const int64_t vecs = (pr.c + V::W - 1) / V::W;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t oy = p / pr.ow, ox = p % pr.ow;
    float* tr = t + (p - p0) * ldt;
    int64_t v0 = 0;
    for (; v0 + NVMAX <= vecs; v0 += NVMAX) dw_chunk<V, NVMAX>(pr, oy, ox, v0 * V::W, tr);
    int64_t left = vecs - v0;
    for (; left >= 4 && NVMAX > 4; left -= 4, v0 += 4) dw_chunk<V, (NVMAX > 4 ? 4 : 1)>(pr, oy, ox, v0 * V::W, tr);
    switch (left) {
      case 3: dw_chunk<V, 3>(pr, oy, ox, v0 * V::W, tr); break;
      case 2: dw_chunk<V, 2>(pr, oy, ox, v0 * V::W, tr); break;
      case 1: dw_chunk<V, 1>(pr, oy, ox, v0 * V::W, tr); break;
      default: break;
    }
  }
}

// y rows [row0, row0 + MR) x one panel's first NV vectors.
template <class V, int MR, int NV, int NR>
inline void pw_tile(const float* t, int64_t ldt, int64_t k, const float* w, const float* bias, float* y, int64_t ldy,
                    int cols, const PackedHeader& h) {
  using R = typename V::R;
  R acc[MR][NV];
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) {
    const R b = V::loadu(bias + v * V::W);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) acc[r][v] = b;
  }
  for (int64_t kk = 0; kk < k; ++kk) {
    R wv[NV];
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) wv[v] = V::loadu(w + kk * NR + v * V::W);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const R a = V::set1(t[r * ldt + kk]);
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[r][v] = V::fma(a, wv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      const int n = cols - v * V::W;
      if (n <= 0) continue;
      const R o = act<V>(acc[r][v], h.act2, h.lo2, h.hi2);
      if (n >= V::W)
        V::storeu(y + r * ldy + v * V::W, o);
      else
        V::storen(y + r * ldy + v * V::W, o, n);
    }
}

template <class V, int MR, int NV, int NR>
inline void pw_rows(const float* t, int64_t ldt, int64_t rows, int64_t k, const float* w, const float* bias, float* y,
                    int64_t ldy, int cols, const PackedHeader& h) {
  int64_t r = 0;
  for (; r + MR <= rows; r += MR) pw_tile<V, MR, NV, NR>(t + r * ldt, ldt, k, w, bias, y + r * ldy, ldy, cols, h);
  if (r < rows) {
    if constexpr (MR > 1) pw_rows<V, (MR > 1 ? MR - 1 : 1), NV, NR>(t + r * ldt, ldt, rows - r, k, w, bias, y + r * ldy,
                                                                    ldy, cols, h);
  }
}

template <class V, int MR, int NR>
void pw(const Problem& pr, const float* t, int64_t ldt, int64_t p0, int64_t p1, int64_t q0, int64_t q1) {
  constexpr int NV = NR / V::W;
  const PackedHeader& h = *pr.hd;
  const int64_t n = h.n, k = pr.c;
  for (int64_t q = q0; q < q1; ++q) {
    const float* w = pr.wp + q * k * NR;
    const int cols = static_cast<int>(std::min<int64_t>(NR, n - q * NR));
    float* y = pr.y + p0 * n + q * NR;
    if (NV > 1 && cols <= (NV / 2) * V::W)
      pw_rows<V, MR, (NV > 1 ? NV / 2 : 1), NR>(t, ldt, p1 - p0, k, w, pr.bp + q * NR, y, n, cols, h);
    else
      pw_rows<V, MR, NV, NR>(t, ldt, p1 - p0, k, w, pr.bp + q * NR, y, n, cols, h);
  }
}

}  // namespace generic
}  // namespace dws
}  // namespace pyaccel
