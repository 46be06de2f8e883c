// The fused depthwise-separable kernel, written once over a vector type V
// (dws_12x32_avx512.cpp, dws_6x16_avx2.cpp and dws_1x16_scalar.cpp each
// include it with their own V and compile it with their own ISA flags).
//
// V provides: R (register), W (lanes), M (a lane mask), mask(n) (the first n
// lanes, n in [0, W]), set1, loadu, loadm(p, m) (zeros outside m), storeu, stream (a
// non-temporal store of W lanes to a W * 4-byte aligned p),
// storen(p, r, n), fma(a, b, c) = a * b + c, add, mul, div, max, min, exp.
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
  // The bound goes first: max/min return their second operand when one is NaN
  // (x86 maxps/minps, and the scalar a > b ? a : b), so a NaN stays NaN as in torch.
  switch (kind) {
    case kRelu: return V::max(V::set1(0.f), v);
    case kRelu6: return V::min(V::set1(6.f), V::max(V::set1(0.f), v));
    case kHardtanh: return V::min(V::set1(hi), V::max(V::set1(lo), v));
    case kHardswish: {  // x * relu6(x + 3) / 6, as torch computes it
      R r = V::min(V::set1(6.f), V::max(V::set1(0.f), V::add(v, V::set1(3.f))));
      return V::div(V::mul(v, r), V::set1(6.f));
    }
    case kSilu: {  // x / (1 + exp(-x))
      R e = V::exp(V::mul(v, V::set1(-1.f)));
      return V::div(v, V::add(V::set1(1.f), e));
    }
    default: return v;
  }
}

// The input row the next output row's window adds at the bottom, under P
// pixels' rightmost taps, channels [c0, c0 + nch): from memory while this
// row computes (the hardware prefetchers followed the 3 - 5 row streams poorly).
inline void prefetch_next_row(const Problem& pr, int64_t iy0, int64_t ix0, int64_t c0, int P, int64_t nch) {
  const PackedHeader& h = *pr.hd;
  const int64_t iy = iy0 + int64_t(h.kh - 1) * h.dh + h.sh;
  if (iy < 0 || iy >= pr.h) return;
  const int64_t xa = std::max<int64_t>(0, ix0 + int64_t(h.kw - 1) * h.dw);
  const int64_t xb = std::min<int64_t>(pr.w, ix0 + int64_t(h.kw - 1) * h.dw + int64_t(P) * h.sw);
  nch = std::min<int64_t>(nch, pr.c - c0);
  for (int64_t ix = xa; ix < xb; ++ix) {
    const char* p = reinterpret_cast<const char*>(pr.x + (iy * pr.w + ix) * pr.c + c0);
    for (int64_t b = 0; b < nch * 4; b += 64) __builtin_prefetch(p + b, 0, 3);
  }
}

// P pixels x NV vectors of depthwise sums from c0 into t, act1 applied (both depthwise blocks).
template <class V, int NV, int P>
inline void store_t(const PackedHeader& h, const typename V::R (&acc)[P][NV], float* tr, int64_t ldt, int64_t c0) {
#pragma GCC unroll 8
  for (int q = 0; q < P; ++q)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) V::storeu(tr + q * ldt + c0 + v * V::W, act<V>(acc[q][v], h.act1, h.lo1, h.hi1));
}

// Depthwise output of P adjacent pixels of one output row (ox .. ox + P - 1)
// for NV vectors of channels from c0: each weight vector loaded once per tap
// serves the P pixels. tr: the first pixel's row of t, ldt apart.
// FULL: all NV vectors hold C channels (plain loads; else masked ones);
// INSIDE: every tap of the P pixels lies inside the row (no column checks).
template <class V, int NV, int P, bool FULL, bool INSIDE>
inline void dw_block(const Problem& pr, int64_t oy, int64_t ox, int64_t c0, float* tr, int64_t ldt) {
  using R = typename V::R;
  const PackedHeader& h = *pr.hd;
  R acc[P][NV];
  typename V::M mk[NV];
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) {
    const R b = V::loadu(pr.bd + c0 + v * V::W);
#pragma GCC unroll 8
    for (int q = 0; q < P; ++q) acc[q][v] = b;
    mk[v] = V::mask(static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(V::W, pr.c - c0 - v * V::W))));
  }
  const int64_t iy0 = oy * h.sh - pr.pad_t, ix0 = ox * h.sw - pr.pad_l;
  if (pr.prefetch) prefetch_next_row(pr, iy0, ix0, c0, P, NV * V::W);
  for (int i = 0; i < h.kh; ++i) {
    const int64_t iy = iy0 + int64_t(i) * h.dh;
    if (iy < 0 || iy >= pr.h) continue;
    const float* xrow = pr.x + iy * pr.w * pr.c + c0;
    const float* wrow = pr.wd + int64_t(i * h.kw) * h.c_pad + c0;
    for (int j = 0; j < h.kw; ++j) {
      R wv[NV];
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) wv[v] = V::loadu(wrow + int64_t(j) * h.c_pad + v * V::W);
      const int64_t ixj = ix0 + int64_t(j) * h.dw;
#pragma GCC unroll 8
      for (int q = 0; q < P; ++q) {
        const int64_t ix = ixj + q * int64_t(h.sw);
        if (!INSIDE && (ix < 0 || ix >= pr.w)) continue;
        const float* xr = xrow + ix * pr.c;
#pragma GCC unroll 16
        for (int v = 0; v < NV; ++v)
          acc[q][v] = V::fma(FULL ? V::loadu(xr + v * V::W) : V::loadm(xr + v * V::W, mk[v]), wv[v], acc[q][v]);
      }
    }
  }
  store_t<V, NV, P>(h, acc, tr, ldt, c0);
}

// P pixels from ox of `rows` (1 or 2) adjacent output rows from oy: channel
// chunks of NV vectors, then single vectors, then the masked tail; each
// chunk's blocks for the rows run back to back (see dw). tr: row oy's first
// pixel in t; the next row's is ldrow floats on.
template <class V, int NV, int P, bool INSIDE>
inline void dw_pixels(const Problem& pr, int64_t oy, int rows, int64_t ox, float* tr, int64_t ldrow, int64_t ldt) {
  int64_t c0 = 0;
  for (; c0 + NV * V::W <= pr.c; c0 += NV * V::W)
    for (int r = 0; r < rows; ++r) dw_block<V, NV, P, true, INSIDE>(pr, oy + r, ox, c0, tr + r * ldrow, ldt);
  for (; c0 + V::W <= pr.c; c0 += V::W)
    for (int r = 0; r < rows; ++r) dw_block<V, 1, P, true, INSIDE>(pr, oy + r, ox, c0, tr + r * ldrow, ldt);
  if (c0 < pr.c)
    for (int r = 0; r < rows; ++r) dw_block<V, 1, P, false, INSIDE>(pr, oy + r, ox, c0, tr + r * ldrow, ldt);
}

// Stride 1, dilation 1 along the row, every tap inside, NV full vectors of
// channels from c0: a sliding window over the P + KW - 1 input pixels of each
// kernel row -- each input vector is loaded once and feeds up to KW pixels'
// taps (the general block loads it once per tap): 18 loads for 24 FMAs at
// P = 4, KW = 3, NV = 2, against 30.
template <class V, int KW, int NV, int P>
inline void dw_block_s1(const Problem& pr, int64_t oy, int64_t ox, int64_t c0, float* tr, int64_t ldt) {
  using R = typename V::R;
  const PackedHeader& h = *pr.hd;
  R acc[P][NV];
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) {
    const R b = V::loadu(pr.bd + c0 + v * V::W);
#pragma GCC unroll 8
    for (int q = 0; q < P; ++q) acc[q][v] = b;
  }
  const int64_t iy0 = oy * h.sh - pr.pad_t, ix0 = ox - pr.pad_l;
  if (pr.prefetch) prefetch_next_row(pr, iy0, ix0, c0, P, NV * V::W);
  for (int i = 0; i < h.kh; ++i) {
    const int64_t iy = iy0 + int64_t(i) * h.dh;
    if (iy < 0 || iy >= pr.h) continue;
    const float* xr = pr.x + (iy * pr.w + ix0) * pr.c + c0;
    const float* wrow = pr.wd + int64_t(i * KW) * h.c_pad + c0;
    R wv[KW][NV];
#pragma GCC unroll 8
    for (int j = 0; j < KW; ++j)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) wv[j][v] = V::loadu(wrow + int64_t(j) * h.c_pad + v * V::W);
#pragma GCC unroll 16
    for (int u = 0; u < P + KW - 1; ++u) {  // input pixel ix0 + u feeds output q = u - j through tap j
      R in[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) in[v] = V::loadu(xr + int64_t(u) * pr.c + v * V::W);
#pragma GCC unroll 8
      for (int j = 0; j < KW; ++j) {
        const int q = u - j;
        if (q < 0 || q >= P) continue;
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[q][v] = V::fma(in[v], wv[j][v], acc[q][v]);
      }
    }
  }
  store_t<V, NV, P>(h, acc, tr, ldt, c0);
}

// P pixels of `rows` output rows through the sliding-window block: channel
// chunks of NV vectors, then single vectors, the ragged tail by the general block.
template <class V, int KW, int NV, int P>
inline void dw_pixels_s1(const Problem& pr, int64_t oy, int rows, int64_t ox, float* tr, int64_t ldrow, int64_t ldt) {
  int64_t c0 = 0;
  for (; c0 + NV * V::W <= pr.c; c0 += NV * V::W)
    for (int r = 0; r < rows; ++r) dw_block_s1<V, KW, NV, P>(pr, oy + r, ox, c0, tr + r * ldrow, ldt);
  for (; c0 + V::W <= pr.c; c0 += V::W)
    for (int r = 0; r < rows; ++r) dw_block_s1<V, KW, 1, P>(pr, oy + r, ox, c0, tr + r * ldrow, ldt);
  if (c0 < pr.c)
    for (int r = 0; r < rows; ++r) dw_block<V, 1, P, false, true>(pr, oy + r, ox, c0, tr + r * ldrow, ldt);
}

// A 3 x 3 window at stride 1, dilation 1: output rows oy and oy + 1 x P
// adjacent pixels x NV full vectors of channels from c0. Rows above or below
// the image are skipped, and with INSIDE false so are taps left or right of
// it (zero padding). The four input rows are walked once, each feeding the
// output rows it reaches, with all 2 x P x NV accumulators live; the window is
// unrolled at compile time. tr: row oy's first pixel in t; row oy + 1's is
// ldrow floats on.
template <class V, int NV, int P, bool INSIDE>
inline void dw_block_3x3_2rows(const Problem& pr, int64_t oy, int64_t ox, int64_t c0, float* tr, int64_t ldrow,
                               int64_t ldt) {
  using R = typename V::R;
  const PackedHeader& h = *pr.hd;
  R acc[2][P][NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const R b = V::loadu(pr.bd + c0 + v * V::W);
#pragma GCC unroll 2
    for (int r = 0; r < 2; ++r)
#pragma GCC unroll 8
      for (int q = 0; q < P; ++q) acc[r][q][v] = b;
  }
  const int64_t iy0 = oy - pr.pad_t, ix0 = ox - pr.pad_l;
  if (pr.prefetch) {
    prefetch_next_row(pr, iy0 + 1, ix0, c0, P, NV * V::W);
    prefetch_next_row(pr, iy0 + 2, ix0, c0, P, NV * V::W);
  }
#pragma GCC unroll 4
  for (int s = 0; s < 4; ++s) {  // input row iy0 + s feeds output row r through kernel row s - r
    const int64_t iy = iy0 + s;
    if (iy < 0 || iy >= pr.h) continue;
    const float* xr = pr.x + (iy * pr.w + ix0) * pr.c + c0;
#pragma GCC unroll 3
    for (int j = 0; j < 3; ++j)
#pragma GCC unroll 2
      for (int r = 0; r < 2; ++r) {
        const int i = s - r;
        if (i < 0 || i > 2) continue;
        R wv[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) wv[v] = V::loadu(pr.wd + int64_t(i * 3 + j) * h.c_pad + c0 + v * V::W);
#pragma GCC unroll 8
        for (int q = 0; q < P; ++q) {
          if (!INSIDE && (ix0 + q + j < 0 || ix0 + q + j >= pr.w)) continue;
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v)
            acc[r][q][v] = V::fma(V::loadu(xr + int64_t(q + j) * pr.c + v * V::W), wv[v], acc[r][q][v]);
        }
      }
  }
  store_t<V, NV, P>(h, acc[0], tr, ldt, c0);
  store_t<V, NV, P>(h, acc[1], tr + ldrow, ldt, c0);
}

// P pixels of output rows oy and oy + 1 through the two-row 3 x 3 block:
// chunks of NV vectors, then single vectors, the ragged tail by the general block.
template <class V, int NV, int P, bool INSIDE>
inline void dw_pixels_3x3_2rows(const Problem& pr, int64_t oy, int64_t ox, float* tr, int64_t ldrow, int64_t ldt) {
  int64_t c0 = 0;
  for (; c0 + NV * V::W <= pr.c; c0 += NV * V::W) dw_block_3x3_2rows<V, NV, P, INSIDE>(pr, oy, ox, c0, tr, ldrow, ldt);
  for (; c0 + V::W <= pr.c; c0 += V::W) dw_block_3x3_2rows<V, 1, P, INSIDE>(pr, oy, ox, c0, tr, ldrow, ldt);
  if (c0 < pr.c)
    for (int r = 0; r < 2; ++r) dw_block<V, 1, P, false, INSIDE>(pr, oy + r, ox, c0, tr + r * ldrow, ldt);
}

// A run of 1 .. PMAX pixels of rows oy and oy + 1 through the two-row 3 x 3 block.
template <class V, int NV, int PMAX>
inline void dw_run_3x3_2rows(const Problem& pr, int64_t oy, int64_t ox, int64_t run, bool inside, float* tr,
                             int64_t ldrow, int64_t ldt) {
  if constexpr (PMAX > 1) {
    if (run < PMAX) return dw_run_3x3_2rows<V, NV, PMAX - 1>(pr, oy, ox, run, inside, tr, ldrow, ldt);
  }
  if (inside)
    dw_pixels_3x3_2rows<V, NV, PMAX, true>(pr, oy, ox, tr, ldrow, ldt);
  else
    dw_pixels_3x3_2rows<V, NV, PMAX, false>(pr, oy, ox, tr, ldrow, ldt);
}

// t rows for output pixels [p0, p1), PMAX adjacent pixels of a row at a
// time. Where a row and the next lie whole in [p0, p1), the two are done
// together: 3 x 3 at stride 1 by the two-row block; otherwise, per pixel
// group and channel chunk, the blocks of both rows run back to back, so the
// input rows they share are still in L1 for the second (one row at a time,
// a row's blocks evict them before the next row comes; 5 x 5, Zen 4: +5 - 7 %
// on the depthwise stage).
template <class V, int NV, int PMAX>
void dw(const Problem& pr, int64_t p0, int64_t p1, float* t, int64_t ldt) {
  const PackedHeader& h = *pr.hd;
  const int64_t reach = int64_t(h.kw - 1) * h.dw;  // input columns a pixel's window spans, less one
  // The sliding window keeps P x 2 accumulators, KW x 2 weights and 2 inputs in registers
  // (16 at 3 taps, 20 at 5): AVX-512's 32 hold them; AVX2's 16 leave no room for temporaries.
  // It runs the 5-tap rows, and 3-tap rows of up to 64 channels the two-row block leaves (a
  // single row, other heights); 3 taps over more channels measured slower (128 -> 128 @ 56,
  // N = 8: -4 to -6 %) than the general block's 64-channel chunks.
  const bool s1 = V::W == 16 && h.sw == 1 && h.dw == 1 && (h.kw == 5 || pr.c <= 64);
  // 3 x 3 at stride 1 takes the two-row block on the vector ISAs (depthwise stage alone, Zen 4,
  // one thread: AVX-512 x1.22 - 1.55, AVX2 x1.19 - 1.54 over the blocks below, 16 - 512 channels).
  const bool two3 = V::W >= 8 && h.kh == 3 && h.kw == 3 && h.sh == 1 && h.sw == 1 && h.dh == 1 && h.dw == 1;
  for (int64_t p = p0; p < p1;) {
    const int64_t oy = p / pr.ow, xa = p % pr.ow, xb = std::min<int64_t>(pr.ow, xa + (p1 - p));
    const int rows = xa == 0 && p + 2 * pr.ow <= p1 ? 2 : 1;
    float* t0 = t + (p - p0) * ldt;
    const int64_t ldrow = pr.ow * ldt;
    for (int64_t ox = xa; ox < xb;) {
      const int64_t run = std::min<int64_t>(PMAX, xb - ox);
      float* tr = t0 + (ox - xa) * ldt;
      const int64_t first = ox * h.sw - pr.pad_l, last = (ox + run - 1) * h.sw - pr.pad_l + reach;
      const bool inside = first >= 0 && last < pr.w;
      if (rows == 2 && two3)
        dw_run_3x3_2rows<V, (V::W == 16 ? 2 : 1), PMAX>(pr, oy, ox, run, inside, tr, ldrow, ldt);
      else if (run == PMAX && inside && s1 && h.kw == 3)
        dw_pixels_s1<V, 3, 2, PMAX>(pr, oy, rows, ox, tr, ldrow, ldt);
      else if (run == PMAX && inside && s1 && h.kw == 5)
        dw_pixels_s1<V, 5, 2, PMAX>(pr, oy, rows, ox, tr, ldrow, ldt);
      else if (run == PMAX && inside)
        dw_pixels<V, NV, PMAX, true>(pr, oy, rows, ox, tr, ldrow, ldt);
      else if (run == PMAX)
        dw_pixels<V, NV, PMAX, false>(pr, oy, rows, ox, tr, ldrow, ldt);
      else
        for (int64_t q = 0; q < run; ++q) dw_pixels<V, NV, 1, false>(pr, oy, rows, ox + q, tr + q * ldt, ldrow, ldt);
      ox += run;
    }
    p += rows == 2 ? 2 * pr.ow : xb - xa;
  }
}

template <class V, int32_t KIND>
void act_rows_k(float* y, int64_t ldy, int64_t rows, int64_t c0, int64_t c1, float lo, float hi) {
  for (int64_t r = 0; r < rows; ++r) {
    float* p = y + r * ldy;
    int64_t j = c0;
    for (; j + V::W <= c1; j += V::W) V::storeu(p + j, act<V>(V::loadu(p + j), KIND, lo, hi));
    if (j < c1) {
      const int n = static_cast<int>(c1 - j);
      V::storen(p + j, act<V>(V::loadm(p + j, V::mask(n)), KIND, lo, hi), n);
    }
  }
}

// act2 in place over y rows [0, rows) x columns [c0, c1) (the int8 stage's epilogue), vectorized,
// the activation chosen once per call.
template <class V>
void act_rows(float* y, int64_t ldy, int64_t rows, int64_t c0, int64_t c1, const PackedHeader& h) {
  switch (h.act2) {
    case kRelu: return act_rows_k<V, kRelu>(y, ldy, rows, c0, c1, h.lo2, h.hi2);
    case kRelu6: return act_rows_k<V, kRelu6>(y, ldy, rows, c0, c1, h.lo2, h.hi2);
    case kHardtanh: return act_rows_k<V, kHardtanh>(y, ldy, rows, c0, c1, h.lo2, h.hi2);
    case kHardswish: return act_rows_k<V, kHardswish>(y, ldy, rows, c0, c1, h.lo2, h.hi2);
    case kSilu: return act_rows_k<V, kSilu>(y, ldy, rows, c0, c1, h.lo2, h.hi2);
    default: return;
  }
}

// y rows [0, MR) x one panel's first NV vectors (cols valid columns).
template <class V, int MR, int NV, int NR>
inline void pw_tile(const float* t, int64_t ldt, int64_t k, const float* w, const float* bias, float* y, int64_t ldy,
                    int cols, const PackedHeader& h, bool stream) {
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
      if (n >= V::W && stream)
        V::stream(y + r * ldy + v * V::W, o);
      else if (n >= V::W)
        V::storeu(y + r * ldy + v * V::W, o);
      else
        V::storen(y + r * ldy + v * V::W, o, n);
    }
}

// One tile of `rows` (1 .. MR) rows: the pw_tile instance for that height.
template <class V, int MR, int NV, int NR>
inline void pw_tile_n(int64_t rows, const float* t, int64_t ldt, int64_t k, const float* w, const float* bias, float* y,
                      int64_t ldy, int cols, const PackedHeader& h, bool stream) {
  if (rows >= MR)
    pw_tile<V, MR, NV, NR>(t, ldt, k, w, bias, y, ldy, cols, h, stream);
  else if constexpr (MR > 1)
    pw_tile_n<V, MR - 1, NV, NR>(rows, t, ldt, k, w, bias, y, ldy, cols, h, stream);
}

// rows in ceil(rows / MR) tiles of nearly equal height (25 rows: 9 + 8 + 8, not 12 + 12 + 1);
// before each tile, a step of pf.
template <class V, int MR, int NV, int NR>
inline void pw_rows(const float* t, int64_t ldt, int64_t rows, int64_t k, const float* w, const float* bias, float* y,
                    int64_t ldy, int cols, const PackedHeader& h, bool stream, LinePrefetch& pf) {
  const int64_t tiles = (rows + MR - 1) / MR;
  for (int64_t i = 0, r0 = 0; i < tiles; ++i) {
    pf.step();
    const int64_t r1 = rows * (i + 1) / tiles;
    pw_tile_n<V, MR, NV, NR>(r1 - r0, t + r0 * ldt, ldt, k, w, bias, y + r0 * ldy, ldy, cols, h, stream);
    r0 = r1;
  }
}

template <class V, int MR, int NR>
void pw(const Problem& pr, const float* t, int64_t ldt, int64_t p0, int64_t p1, int64_t q0, int64_t q1) {
  constexpr int NV = NR / V::W;
  const PackedHeader& h = *pr.hd;
  const int64_t n = h.n, k = pr.c;
  const int64_t steps = std::max<int64_t>(1, (q1 - q0) * ((p1 - p0 + MR - 1) / MR));
  LinePrefetch pf(pr.pf, pr.pf_end, steps);
  for (int64_t q = q0; q < q1; ++q) {
    const float* w = pr.wp + q * k * NR;
    const int cols = static_cast<int>(std::min<int64_t>(NR, n - q * NR));
    float* y = pr.y + p0 * n + q * NR;
    if (NV > 1 && cols <= (NV / 2) * V::W)
      pw_rows<V, MR, (NV > 1 ? NV / 2 : 1), NR>(t, ldt, p1 - p0, k, w, pr.bp + q * NR, y, n, cols, h, pr.stream, pf);
    else
      pw_rows<V, MR, NV, NR>(t, ldt, p1 - p0, k, w, pr.bp + q * NR, y, n, cols, h, pr.stream, pf);
  }
}

}  // namespace generic
}  // namespace dws
}  // namespace pyaccel
