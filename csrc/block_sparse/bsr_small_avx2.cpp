// BSR fp32 with small blocks, AVX2 + FMA: the row and slab loops of
// bsr_small_generic.h compiled with AVX2 flags (the slab kernel's 16-lane
// loops become two ymm FMAs), and the band-list scatter kernel
// (scatter_loop.h) on slabs of 8 rows, 2 or 1 a pass (4 x S slab lines, 4
// broadcast weights and the partial sums fit the 16 ymm registers); x moves
// into slabs and results back to y by 8 x 8 transposes. One row of x with
// 4-input blocks: a row kernel, two blocks to an FMA.
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "block_sparse/bsr_small_generic.h"
#include "block_sparse/scatter_loop.h"
#include "common/bf16.h"
#include "common/transpose_avx2.h"

namespace pyaccel {
namespace block_sparse {
namespace {

thread_local std::vector<float> t_part;

// channels [c0, c0 + nc) (nc <= 8) x rows [8 s, 8 (s + S)) of x, staged as
// part[channel][S][8], to y with the bias; rows past m and channels past
// c0 + nc not written.
template <int S>
void flush8(const GemmArgs& g, const float* part, int64_t m, int64_t s, int64_t c0, int nc) {
  alignas(32) float bias[8] = {};
  if (g.bias)
    for (int q = 0; q < nc; ++q) bias[q] = g.bias[c0 + q];
  const __m256 bv = _mm256_load_ps(bias);
  for (int t = 0; t < S; ++t) {
    const int64_t row0 = (s + t) * 8;
    if (row0 >= m) break;
    const int rows = static_cast<int>(std::min<int64_t>(8, m - row0));
    __m256 r[8];
    for (int q = 0; q < 8; ++q) r[q] = q < nc ? _mm256_load_ps(part + (q * S + t) * 8) : _mm256_setzero_ps();
    transpose8x8(r);
    for (int l = 0; l < rows; ++l) {
      const __m256 v = _mm256_add_ps(r[l], bv);
      if (!g.y_bf16 && nc == 8) {
        _mm256_storeu_ps(static_cast<float*>(g.y) + (row0 + l) * g.ldy + c0, v);
      } else {
        alignas(32) float o[8];
        _mm256_store_ps(o, v);
        for (int q = 0; q < nc; ++q) {
          if (g.y_bf16)
            static_cast<uint16_t*>(g.y)[(row0 + l) * g.ldy + c0 + q] = fp32_to_bf16_rne(o[q]);
          else
            static_cast<float*>(g.y)[(row0 + l) * g.ldy + c0 + q] = o[q];
        }
      }
    }
  }
}

template <int S>
void scatter_band(const GemmArgs& g, const float* xt, int64_t nslabs, int64_t m, int64_t s, int64_t band,
                  float* part) {
  const BandLists& bl = g.lists;
  scatter_groups<Ymm, S>(bl, xt + s * 8, nslabs * 8, band, part);
  const int64_t c0 = band * bl.band_rows, c1 = std::min<int64_t>(c0 + bl.band_rows, g.n);
  for (int64_t c = c0; c < c1; c += 8)
    flush8<S>(g, part + (c - c0) * S * 8, m, s, c, static_cast<int>(std::min<int64_t>(8, c1 - c)));
}

}  // namespace

// One row of x, blocks of 4 inputs: per channel a dot product over its blocks,
// two blocks to an FMA (x of the two block columns by 128-bit loads into one
// ymm), four accumulators; other widths take the generic loop.
void bsr_small_rows_avx2(const GemmArgs& g, int64_t m0, int64_t m1, int64_t r0, int64_t r1) {
  if (g.bw != 4) {
    small_rows_generic(g, m0, m1, r0, r1);
    return;
  }
  const int bh = g.bh;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t end = std::min<int64_t>(r * bh + bh, g.n);
    const int64_t b0 = g.rowptr[r], b1 = g.rowptr[r + 1];
    // only a row's last block can reach past k (columns are sorted): it takes the scalar tail
    const int64_t bfull = (b1 > b0 && g.colk[b1 - 1] + 4 > g.k) ? b1 - 1 : b1;
    for (int i = 0; r * bh + i < end; ++i) {
      const float* wi = g.blocks + i * 4;  // channel i of block b at wi + b * bh * 4
      for (int64_t m = m0; m < m1; ++m) {
        const float* xr = g.x + m * g.ldx;
        __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        int64_t b = b0;
        for (; b + 8 <= bfull; b += 8) {
          for (int u = 0; u < 4; ++u) {
            const int64_t bb = b + 2 * u;
            const __m256 xv = _mm256_loadu2_m128(xr + g.colk[bb + 1], xr + g.colk[bb]);
            const __m256 wv = bh == 1 ? _mm256_loadu_ps(wi + bb * 4)
                                      : _mm256_loadu2_m128(wi + (bb + 1) * bh * 4, wi + bb * bh * 4);
            a[u] = _mm256_fmadd_ps(wv, xv, a[u]);
          }
        }
        for (; b + 2 <= bfull; b += 2) {
          const __m256 xv = _mm256_loadu2_m128(xr + g.colk[b + 1], xr + g.colk[b]);
          const __m256 wv = bh == 1 ? _mm256_loadu_ps(wi + b * 4)
                                    : _mm256_loadu2_m128(wi + (b + 1) * bh * 4, wi + b * bh * 4);
          a[0] = _mm256_fmadd_ps(wv, xv, a[0]);
        }
        const __m256 s = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
        const __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
        alignas(16) float t[4];
        _mm_store_ps(t, h);
        float acc = (t[0] + t[1]) + (t[2] + t[3]);
        for (; b < b1; ++b) {  // odd block out, and a last block cut by k
          const int64_t c = g.colk[b];
          const int jn = static_cast<int>(std::min<int64_t>(4, g.k - c));
          for (int j = 0; j < jn; ++j) acc += wi[b * bh * 4 + j] * xr[c + j];
        }
        store_scalar(g, m, r * bh + i, acc);
      }
    }
  }
}

void bsr_small_slabs_avx2(const GemmArgs& g, const float* xt, int64_t nslabs, int64_t m, int64_t s0, int64_t s1,
                          int64_t r0, int64_t r1, int /*sw: 16 here*/) {
  small_slabs_generic(g, xt, nslabs, m, s0, s1, r0, r1);
}

void bsr_scatter_avx2(const GemmArgs& g, const float* xt, int64_t nslabs, int64_t m, int64_t s0, int64_t s1,
                      int64_t b0, int64_t b1, int /*sw: 8 here*/) {
  float* part = nullptr;
  {
    const size_t floats = kBandChannels * 2 * 8 + 8;  // scatter_groups' row mask
    if (t_part.size() < floats) t_part.resize(floats);
    part = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(t_part.data()) + 31) & ~uintptr_t(31));
  }
  for_each_slab_run<2>(s0, s1, [&](int64_t s, auto run) {
    for (int64_t b = b0; b < b1; ++b) scatter_band<decltype(run)::value>(g, xt, nslabs, m, s, b, part);
  });
}

// Slabs of sw (8 or 16) rows: 8 x 8 blocks of x transposed in registers; a
// block cut by m or k goes through a zero-padded copy.
void bsr_pack_slabs_avx2(const void* x, int64_t ldx, bool x_bf16, int64_t m, int64_t k, float* xt, int64_t nslabs,
                         int64_t s0, int64_t s1, int sw) {
  const int64_t line = nslabs * sw;
  for (int64_t s = s0; s < s1; ++s)
    for (int h = 0; h < sw; h += 8) {
      const int64_t row0 = s * sw + h;
      const int rows = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(8, m - row0)));
      for (int64_t k0 = 0; k0 < k; k0 += 8) {
        const int cols = static_cast<int>(std::min<int64_t>(8, k - k0));
        __m256 r[8];
        for (int i = 0; i < 8; ++i) {
          if (i >= rows) {
            r[i] = _mm256_setzero_ps();
          } else if (x_bf16) {
            alignas(32) uint16_t tmp[8] = {};
            const uint16_t* src = static_cast<const uint16_t*>(x) + (row0 + i) * ldx + k0;
            for (int q = 0; q < cols; ++q) tmp[q] = src[q];
            const __m128i hv = _mm_load_si128(reinterpret_cast<const __m128i*>(tmp));
            r[i] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(hv), 16));
          } else if (cols == 8) {
            r[i] = _mm256_loadu_ps(static_cast<const float*>(x) + (row0 + i) * ldx + k0);
          } else {
            alignas(32) float tmp[8] = {};
            const float* src = static_cast<const float*>(x) + (row0 + i) * ldx + k0;
            for (int q = 0; q < cols; ++q) tmp[q] = src[q];
            r[i] = _mm256_load_ps(tmp);
          }
        }
        transpose8x8(r);
        for (int q = 0; q < cols; ++q) _mm256_store_ps(xt + (k0 + q) * line + s * sw + h, r[q]);
      }
    }
}

}  // namespace block_sparse
}  // namespace pyaccel
