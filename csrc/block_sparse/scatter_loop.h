// The scatter loop of the band-list kernels (block_sparse.h, BandLists),
// shared by the AVX-512 and AVX2 files (internal linkage: each compiles its
// own copy with its own flags), with the vector types they use.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "block_sparse/block_sparse.h"

namespace pyaccel {
namespace block_sparse {
namespace {

// Slab lines of W rows of x: zmm (16 rows) or ymm (8 rows: AVX2, and AVX-512
// for batches of <= 8 rows, where a ymm FMA does the work of a half-empty
// zmm one from half the slab bytes).
#ifdef __AVX512F__
struct Zmm {
  using T = __m512;
  static constexpr int W = 16;
  static T zero() { return _mm512_setzero_ps(); }
  static T load(const float* p) { return _mm512_load_ps(p); }
  static T set1(float v) { return _mm512_set1_ps(v); }
  static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
  static void store(float* p, T v) { _mm512_store_ps(p, v); }
};
#endif
struct Ymm {
  using T = __m256;
  static constexpr int W = 8;
  static T zero() { return _mm256_setzero_ps(); }
  static T load(const float* p) { return _mm256_load_ps(p); }
  static T set1(float v) { return _mm256_set1_ps(v); }
  static T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
  static void store(float* p, T v) { _mm256_store_ps(p, v); }
};


// One band over all groups: part[kBandChannels][S][W] (its first band_rows
// zeroed here) gets the
// band's channels x the S slab lines at xs (line: floats between one input's
// lines and the next input's). Per group of 4 inputs its 4 x S lines are
// loaded once, then every entry adds w[0..4) x those lines into its channel's
// partial sums (4 S FMAs, S loads, S stores, 4 broadcasts an entry).
template <typename V, int S>
inline void scatter_groups(const BandLists& bl, const float* xs, int64_t line, int64_t band, float* part) {
  constexpr int L = S * V::W;
  std::memset(part, 0, bl.band_rows * L * sizeof(float));
  const int32_t* go = bl.goff + band * (bl.ngroups + 1);
  for (int64_t gi = 0; gi < bl.ngroups; ++gi) {
    // (clamped: see kBandChannels)
    const int64_t e0 = std::min<int64_t>(std::max<int32_t>(go[gi], 0), bl.nentries);
    const int64_t e1 = std::min<int64_t>(go[gi + 1], bl.nentries);
    if (e0 >= e1) continue;
    typename V::T x[4][S];
    const float* xg = xs + 4 * gi * line;
    for (int j = 0; j < 4; ++j)
      for (int t = 0; t < S; ++t) x[j][t] = V::load(xg + j * line + t * V::W);
    for (int64_t e = e0; e < e1; ++e) {
      float* p = part + (bl.row[e] & (kBandChannels - 1)) * L;
      const float* w = static_cast<const float*>(bl.w) + 4 * e;
      const typename V::T w0 = V::set1(w[0]), w1 = V::set1(w[1]), w2 = V::set1(w[2]), w3 = V::set1(w[3]);
#pragma GCC unroll 4
      for (int t = 0; t < S; ++t) {
        typename V::T a = V::load(p + t * V::W);
        a = V::fma(w0, x[0][t], a);
        a = V::fma(w1, x[1][t], a);
        a = V::fma(w2, x[2][t], a);
        a = V::fma(w3, x[3][t], a);
        V::store(p + t * V::W, a);
      }
    }
  }
}

}  // namespace
}  // namespace block_sparse
}  // namespace pyaccel
