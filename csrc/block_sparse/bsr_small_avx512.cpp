// BSR fp32 with small blocks (layout 2: row-major [bh][bw], bh <= 8), AVX-512.
//
// Row kernel (one row of x): per output channel a dot product over its
// blocks' inputs; 1 x 4 ... 8 x 4 blocks four to an FMA (x gathered from the
// four block columns with 128-bit inserts), other widths 16 inputs per masked
// FMA; two accumulators; rows of x inside the channel loop (its weights stay
// in L1).
//
// Slab kernel (many rows): x transposed into 16-row slabs, so one zmm holds
// input j of 16 rows. Per input j of a block: S slab lines loaded once, then
// for each of the block's BH channels one broadcast weight and S FMAs
// (BH x S accumulators: 1 x 8, 2 x 4, 4 x 4, 8 x 2). Outputs go back to y's rows through
// a 16-value transpose buffer.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "block_sparse/block_sparse.h"
#include "block_sparse/scatter_loop.h"
#include "common/bf16_avx512.h"
#include "common/transpose_avx512.h"

namespace pyaccel {
namespace block_sparse {
namespace {

inline __m512 to_zmm(__m512 v) { return v; }
inline __m512 to_zmm(__m256 v) { return _mm512_zextps256_ps512(v); }

inline __mmask16 first(int n) { return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1); }

template <typename V, int BH, int S>
__attribute__((always_inline)) inline void fma_block(const GemmArgs& g, const float* xs, int64_t line, int64_t b,
                                                     typename V::T (&acc)[BH][S]) {
  const int64_t c = g.colk[b];
  const int jn = static_cast<int>(std::min<int64_t>(g.bw, g.k - c));
  const float* w = g.blocks + b * BH * g.bw;
  for (int j = 0; j < jn; ++j) {
    typename V::T xv[S];
    for (int t = 0; t < S; ++t) xv[t] = V::load(xs + (c + j) * line + t * V::W);
    for (int i = 0; i < BH; ++i) {
      const typename V::T wv = V::set1(w[i * g.bw + j]);
      for (int t = 0; t < S; ++t) acc[i][t] = V::fma(wv, xv[t], acc[i][t]);
    }
  }
}

// U consecutive blocks, all inside k, into U accumulator sets (one set per
// block: the sets' FMA chains are independent, so latency is hidden even with
// one slab and one channel). BW: the block width when known at compile time
// (4), else 0 (g.bw at run time). One pointer per block at a time keeps the
// general registers free.
template <typename V, int BH, int S, int U, int BW>
__attribute__((always_inline)) inline void fma_group(const GemmArgs& g, const float* xs, int64_t line, int64_t b,
                                                     typename V::T (&acc)[U][BH][S]) {
  const int bw = BW > 0 ? BW : g.bw;
  const float* w0 = g.blocks + b * BH * bw;
  if constexpr (BW > 0) {
    // input j outermost, blocks inside: consecutive FMAs go to different sets
    const float* xp[U];
#pragma GCC unroll 16
    for (int u = 0; u < U; ++u) xp[u] = xs + g.colk[b + u] * line;
#pragma GCC unroll 8
    for (int j = 0; j < BW; ++j) {
#pragma GCC unroll 16
      for (int u = 0; u < U; ++u) {
        typename V::T xv[S];
#pragma GCC unroll 16
        for (int t = 0; t < S; ++t) xv[t] = V::load(xp[u] + j * line + t * V::W);
#pragma GCC unroll 16
        for (int i = 0; i < BH; ++i) {
          const typename V::T wv = V::set1(w0[(u * BH + i) * BW + j]);
#pragma GCC unroll 16
          for (int t = 0; t < S; ++t) acc[u][i][t] = V::fma(wv, xv[t], acc[u][i][t]);
        }
      }
    }
  } else {
    for (int u = 0; u < U; ++u) {
      const float* xp = xs + g.colk[b + u] * line;
      const float* wp = w0 + u * BH * bw;
      for (int j = 0; j < bw; ++j) {
        typename V::T xv[S];
        for (int t = 0; t < S; ++t) xv[t] = V::load(xp + j * line + t * V::W);
        for (int i = 0; i < BH; ++i) {
          const typename V::T wv = V::set1(wp[i * bw + j]);
          for (int t = 0; t < S; ++t) acc[u][i][t] = V::fma(wv, xv[t], acc[u][i][t]);
        }
      }
    }
  }
}

// Rows [16 s, 16 (s + S)) x the BH channels of block row r, over the blocks
// [b0, b1) of that row. With few accumulators (BH x S < 8) the blocks go
// round-robin to U = 8 / (BH x S) accumulator sets, so that FMA latency is
// hidden. Starts from the partial sums in `part` unless first_chunk; leaves
// the sums there.
template <typename V, int BH, int S>
inline void slab_tile(const GemmArgs& g, const float* xt, int64_t nslabs, int64_t s, int64_t b0, int64_t b1,
                      float* part, bool first_chunk) {
  constexpr int U = BH * S >= 8 ? 1 : 8 / (BH * S);
  typename V::T acc[U][BH][S];
  for (int u = 0; u < U; ++u)
    for (int i = 0; i < BH; ++i)
      for (int t = 0; t < S; ++t)
        acc[u][i][t] = (first_chunk || u > 0) ? V::zero() : V::load(part + (i * S + t) * V::W);
  const int64_t line = nslabs * V::W;  // one input's slab lines, contiguous
  const float* xs = xt + s * V::W;
  int64_t b = b0;
  if (g.bw == 4) {
    for (; b + U <= b1 && g.colk[b + U - 1] + 4 <= g.k; b += U) fma_group<V, BH, S, U, 4>(g, xs, line, b, acc);
  } else {
    for (; b + U <= b1 && g.colk[b + U - 1] + g.bw <= g.k; b += U) fma_group<V, BH, S, U, 0>(g, xs, line, b, acc);
  }
  for (; b < b1; ++b) fma_block<V, BH, S>(g, xs, line, b, acc[0]);
  for (int u = 1; u < U; ++u)
    for (int i = 0; i < BH; ++i)
      for (int t = 0; t < S; ++t) acc[0][i][t] = V::add(acc[0][i][t], acc[u][i][t]);
  // [BH][S][16]: partial sums between K chunks, results (staged) after the last
  for (int i = 0; i < BH; ++i)
    for (int t = 0; t < S; ++t) V::store(part + (i * S + t) * V::W, acc[0][i][t]);
}

// Results of channels [c0, c0 + nc) (nc <= 16) x rows [W s, W (s + S)) of
// x, staged as stage[channel][S x W], to y: 16 x 16 transposes, bias added,
// rows past m and channels past c0 + nc not written.
template <typename V, int S>
inline void flush16(const GemmArgs& g, const float* stage, int64_t m, int64_t s, int64_t c0, int nc) {
  const __mmask16 cm = first(nc);
  const __m512 bias = g.bias ? _mm512_maskz_loadu_ps(cm, g.bias + c0) : _mm512_setzero_ps();
  for (int t = 0; t < S; ++t) {
    const int64_t row0 = (s + t) * V::W;
    if (row0 >= m) break;
    const int rows = static_cast<int>(std::min<int64_t>(V::W, m - row0));
    __m512 r[16], c[16];
    for (int q = 0; q < 16; ++q) r[q] = q < nc ? to_zmm(V::load(stage + (q * S + t) * V::W)) : _mm512_setzero_ps();
    transpose16x16(r, c);
    for (int l = 0; l < rows; ++l) {
      const __m512 v = _mm512_add_ps(c[l], bias);
      if (g.y_bf16)
        _mm256_mask_storeu_epi16(static_cast<uint16_t*>(g.y) + (row0 + l) * g.ldy + c0, cm, cvt_fp32_bf16_avx512(v));
      else
        _mm512_mask_storeu_ps(static_cast<float*>(g.y) + (row0 + l) * g.ldy + c0, cm, v);
    }
  }
}

// Slab lines of one K chunk: ~256 KiB, kept in L2. Chunks sized for L1 (8 -
// 16 KiB) measured 3 - 8x slower on Zen 4 (the per-chunk cost of each block
// row -- finding its blocks, loading and storing partial sums -- outweighs the
// few blocks a row has in such a chunk); no chunking at all was 0 - 15 % slower.
constexpr int64_t kChunkBytes = int64_t(256) << 10;

thread_local std::vector<float> t_part;
thread_local std::vector<float> t_stage;
thread_local std::vector<int64_t> t_cursor;

inline float* aligned64(std::vector<float>& v, size_t floats) {
  if (v.size() < floats + 16) v.resize(floats + 16);
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(v.data()) + 63) & ~uintptr_t(63));
}

// K in chunks whose S slab lines (S x 64 B per input) stay in L2 (~256 KiB),
// each block row's blocks of the chunk found by a cursor (columns are
// sorted); partial sums of the rows' tiles wait in `part` between chunks.
// After the last chunk the results of 16 block rows at a time (16 x BH
// channels) are staged and transposed into y.
template <typename V, int BH, int S>
void slab_group(const GemmArgs& g, const float* xt, int64_t nslabs, int64_t m, int64_t s, int64_t r0, int64_t r1) {
  const int64_t kc = std::max<int64_t>(g.bw, (kChunkBytes / (S * V::W * 4)) / g.bw * g.bw);
  const int64_t rows = r1 - r0;
  constexpr int64_t kFlushRows = 16;  // block rows per flush: 16 x BH channels, a multiple of 16
  float* stage = aligned64(t_stage, kFlushRows * BH * S * V::W);
  const bool chunked = g.k > kc;
  float* part = nullptr;
  if (chunked) {
    part = aligned64(t_part, rows * BH * S * V::W);
    if (t_cursor.size() < static_cast<size_t>(rows)) t_cursor.resize(rows);
    for (int64_t r = r0; r < r1; ++r) t_cursor[r - r0] = g.rowptr[r];
  }
  for (int64_t k0 = 0; k0 < g.k; k0 += kc) {
    const bool first_chunk = k0 == 0, last = k0 + kc >= g.k;
    for (int64_t r = r0; r < r1; ++r) {
      int64_t b0 = g.rowptr[r], b1 = g.rowptr[r + 1];
      if (chunked) {
        int64_t& cur = t_cursor[r - r0];
        b0 = cur;
        const int64_t bend = b1;
        b1 = b0;
        while (b1 < bend && g.colk[b1] < k0 + kc) ++b1;
        cur = b1;
      }
      float* pr = chunked ? part + (r - r0) * BH * S * V::W : nullptr;
      if (last) {
        float* st = stage + ((r - r0) % kFlushRows) * BH * S * V::W;
        if (chunked && !first_chunk) std::memcpy(st, pr, BH * S * V::W * sizeof(float));
        slab_tile<V, BH, S>(g, xt, nslabs, s, b0, b1, st, first_chunk);
        if ((r - r0) % kFlushRows == kFlushRows - 1 || r + 1 == r1) {
          const int64_t rf = r - (r - r0) % kFlushRows;  // first block row of the staged run
          const int64_t cend = std::min<int64_t>((r + 1) * BH, g.n);
          for (int64_t c0 = rf * BH; c0 < cend; c0 += 16)
            flush16<V, S>(g, stage + (c0 - rf * BH) * S * V::W, m, s, c0, static_cast<int>(std::min<int64_t>(16, cend - c0)));
        }
      } else {
        slab_tile<V, BH, S>(g, xt, nslabs, s, b0, b1, pr, first_chunk);
      }
    }
  }
}

// Band lists (block_sparse.h): rows [16 s, 16 (s + S)) (V = Zmm) or [8 s, 8 (s
// + S)) (Ymm) x the channels of one band (scatter_groups), then flush16.
template <typename V, int S>
void scatter_band(const GemmArgs& g, const float* xt, int64_t nslabs, int64_t m, int64_t s, int64_t band,
                  float* part) {
  constexpr int L = S * V::W;
  const BandLists& bl = g.lists;
  scatter_groups<V, S>(bl, xt + s * V::W, nslabs * V::W, band, part);
  const int64_t c0 = band * bl.band_rows, c1 = std::min<int64_t>(c0 + bl.band_rows, g.n);
  for (int64_t c = c0; c < c1; c += 16)
    flush16<V, S>(g, part + (c - c0) * L, m, s, c, static_cast<int>(std::min<int64_t>(16, c1 - c)));
}

template <typename V>
void scatter_slabs(const GemmArgs& g, const float* xt, int64_t nslabs, int64_t m, int64_t s0, int64_t s1, int64_t b0,
                   int64_t b1) {
  float* part = aligned64(t_part, kBandChannels * 4 * V::W);  // scatter_groups' row mask
  for_each_slab_run<4>(s0, s1, [&](int64_t s, auto run) {
    for (int64_t b = b0; b < b1; ++b) scatter_band<V, decltype(run)::value>(g, xt, nslabs, m, s, b, part);
  });
}

template <typename V, int BH>
void slabs_bh(const GemmArgs& g, const float* xt, int64_t nslabs, int64_t m, int64_t s0, int64_t s1, int64_t r0,
              int64_t r1) {
  constexpr int S = BH == 1 ? 8 : BH <= 4 ? 4 : 2;
  for_each_slab_run<S>(s0, s1, [&](int64_t s, auto run) {
    slab_group<V, BH, decltype(run)::value>(g, xt, nslabs, m, s, r0, r1);
  });
}

template <typename V>
void slabs_any_bh(const GemmArgs& g, const float* xt, int64_t nslabs, int64_t m, int64_t s0, int64_t s1, int64_t r0,
                  int64_t r1) {
  switch (g.bh) {
    case 1: slabs_bh<V, 1>(g, xt, nslabs, m, s0, s1, r0, r1); break;
    case 2: slabs_bh<V, 2>(g, xt, nslabs, m, s0, s1, r0, r1); break;
    case 3: slabs_bh<V, 3>(g, xt, nslabs, m, s0, s1, r0, r1); break;
    case 4: slabs_bh<V, 4>(g, xt, nslabs, m, s0, s1, r0, r1); break;
    case 5: slabs_bh<V, 5>(g, xt, nslabs, m, s0, s1, r0, r1); break;
    case 6: slabs_bh<V, 6>(g, xt, nslabs, m, s0, s1, r0, r1); break;
    case 7: slabs_bh<V, 7>(g, xt, nslabs, m, s0, s1, r0, r1); break;
    default: slabs_bh<V, 8>(g, xt, nslabs, m, s0, s1, r0, r1); break;
  }
}

}  // namespace

void bsr_small_rows_avx512(const GemmArgs& g, int64_t m0, int64_t m1, int64_t r0, int64_t r1) {
  const int bh = g.bh, bw = g.bw;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t end = std::min<int64_t>(r * bh + bh, g.n);
    const int64_t b0 = g.rowptr[r], b1 = g.rowptr[r + 1];
    // only a row's last block can reach past k (columns are sorted): it takes the masked path
    const int64_t bfull = (b1 > b0 && g.colk[b1 - 1] + bw > g.k) ? b1 - 1 : b1;
    for (int i = 0; r * bh + i < end; ++i) {
      const float* wi = g.blocks + i * bw;  // channel i of block b at wi + b * bh * bw
      for (int64_t m = m0; m < m1; ++m) {  // the channel's weights stay in L1 across rows
        const float* xr = g.x + m * g.ldx;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        int64_t b = b0;
        if (bw == 4) {  // four 1 x 4 blocks per FMA
          for (; b + 4 <= bfull; b += 4) {
            const int32_t* c = g.colk + b;
            __m512 xv = _mm512_castps128_ps512(_mm_loadu_ps(xr + c[0]));
            xv = _mm512_insertf32x4(xv, _mm_loadu_ps(xr + c[1]), 1);
            xv = _mm512_insertf32x4(xv, _mm_loadu_ps(xr + c[2]), 2);
            xv = _mm512_insertf32x4(xv, _mm_loadu_ps(xr + c[3]), 3);
            __m512 wv;
            if (bh == 1) {
              wv = _mm512_loadu_ps(wi + b * 4);
            } else {
              const float* w = wi + b * bh * 4;
              wv = _mm512_castps128_ps512(_mm_loadu_ps(w));
              wv = _mm512_insertf32x4(wv, _mm_loadu_ps(w + bh * 4), 1);
              wv = _mm512_insertf32x4(wv, _mm_loadu_ps(w + 2 * bh * 4), 2);
              wv = _mm512_insertf32x4(wv, _mm_loadu_ps(w + 3 * bh * 4), 3);
            }
            if ((b & 4) == 0)
              a0 = _mm512_fmadd_ps(wv, xv, a0);
            else
              a1 = _mm512_fmadd_ps(wv, xv, a1);
          }
        }
        for (; b < b1; ++b) {  // any bw: 16 inputs per masked FMA
          const int64_t c = g.colk[b];
          const int jn = static_cast<int>(std::min<int64_t>(bw, g.k - c));
          const float* w = wi + b * bh * bw;
          for (int j = 0; j < jn; j += 16) {
            const __mmask16 mk = first(jn - j);
            const __m512 t = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, w + j), _mm512_maskz_loadu_ps(mk, xr + c + j),
                                             (b & 1) ? a1 : a0);
            if (b & 1)
              a1 = t;
            else
              a0 = t;
          }
        }
        store_scalar(g, m, r * bh + i, _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)));
      }
    }
  }
}

void bsr_scatter_avx512(const GemmArgs& g, const float* xt, int64_t nslabs, int64_t m, int64_t s0, int64_t s1,
                        int64_t b0, int64_t b1, int sw) {
  if (sw == 8)
    scatter_slabs<Ymm>(g, xt, nslabs, m, s0, s1, b0, b1);
  else
    scatter_slabs<Zmm>(g, xt, nslabs, m, s0, s1, b0, b1);
}

void bsr_pack_slabs_avx512(const void* x, int64_t ldx, bool x_bf16, int64_t m, int64_t k, float* xt, int64_t nslabs,
                           int64_t s0, int64_t s1, int sw) {
  const int64_t line = nslabs * sw;
  for (int64_t s = s0; s < s1; ++s) {
    const int64_t rows = std::min<int64_t>(sw, m - s * sw);
    for (int64_t k0 = 0; k0 < k; k0 += 16) {
      const int cols = static_cast<int>(std::min<int64_t>(16, k - k0));
      const __mmask16 mask = first(cols);
      __m512 r[16], c[16];
      for (int i = 0; i < 16; ++i) {
        r[i] = _mm512_setzero_ps();
        if (i < rows) {
          if (x_bf16) {
            const __m256i h = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(x) + (s * sw + i) * ldx + k0);
            r[i] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
          } else {
            r[i] = _mm512_maskz_loadu_ps(mask, static_cast<const float*>(x) + (s * sw + i) * ldx + k0);
          }
        }
      }
      transpose16x16(r, c);  // c[q]: column q, rows in lanes (8-row slabs: the low 8)
      if (sw == 8)
        for (int q = 0; q < cols; ++q) _mm256_store_ps(xt + (k0 + q) * line + s * 8, _mm512_castps512_ps256(c[q]));
      else
        for (int q = 0; q < cols; ++q) _mm512_store_ps(xt + (k0 + q) * line + s * 16, c[q]);
    }
  }
}

void bsr_small_slabs_avx512(const GemmArgs& g, const float* xt, int64_t nslabs, int64_t m, int64_t s0, int64_t s1,
                            int64_t r0, int64_t r1, int sw) {
  if (sw == 8)
    slabs_any_bh<Ymm>(g, xt, nslabs, m, s0, s1, r0, r1);
  else
    slabs_any_bh<Zmm>(g, xt, nslabs, m, s0, s1, r0, r1);
}

}  // namespace block_sparse
}  // namespace pyaccel
