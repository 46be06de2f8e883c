// BSR fp32 with small blocks (layout 2, row-major [bh][bw] blocks) in plain
// loops: the row kernel and the slab kernel, included by the portable file and
// by the AVX2 file (compiled there with AVX2 + FMA, where the 16-lane slab
// loops vectorize).
#pragma once
#include <algorithm>

#include "block_sparse/block_sparse.h"
#include "common/bf16.h"

namespace pyaccel {
namespace block_sparse {
// internal linkage: each including file (each compiled for its own ISA) keeps
// its own copy, so the linker never swaps the AVX2 build into the portable path
namespace {

inline void small_rows_generic(const GemmArgs& g, int64_t m0, int64_t m1, int64_t r0, int64_t r1) {
  for (int64_t m = m0; m < m1; ++m) {
    const float* xr = g.x + m * g.ldx;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t end = std::min<int64_t>(r * g.bh + g.bh, g.n);
      for (int i = 0; r * g.bh + i < end; ++i) {
        float acc = 0.f;
        for (int64_t b = g.rowptr[r]; b < g.rowptr[r + 1]; ++b) {
          const int64_t c = g.colk[b];
          const int jn = static_cast<int>(std::min<int64_t>(g.bw, g.k - c));
          const float* w = g.blocks + (b * g.bh + i) * g.bw;
          for (int j = 0; j < jn; ++j) acc += w[j] * xr[c + j];
        }
        store_scalar(g, m, r * g.bh + i, acc);
      }
    }
  }
}

inline void small_slabs_generic(const GemmArgs& g, const float* xt, int64_t nslabs, int64_t m, int64_t s0, int64_t s1,
                            int64_t r0, int64_t r1) {
  for (int64_t s = s0; s < s1; ++s) {
    const float* xs = xt + s * 16;
    const int rows = static_cast<int>(std::min<int64_t>(16, m - s * 16));
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t end = std::min<int64_t>(r * g.bh + g.bh, g.n);
      for (int i = 0; r * g.bh + i < end; ++i) {
        float acc[16] = {};
        for (int64_t b = g.rowptr[r]; b < g.rowptr[r + 1]; ++b) {
          const int64_t c = g.colk[b];
          const int jn = static_cast<int>(std::min<int64_t>(g.bw, g.k - c));
          const float* w = g.blocks + (b * g.bh + i) * g.bw;
          for (int j = 0; j < jn; ++j)
            for (int l = 0; l < 16; ++l) acc[l] += w[j] * xs[(c + j) * nslabs * 16 + l];
        }
        for (int l = 0; l < rows; ++l) store_scalar(g, s * 16 + l, r * g.bh + i, acc[l]);
      }
    }
  }
}

inline void pack_slabs_generic(const void* x, int64_t ldx, bool x_bf16, int64_t m, int64_t k, float* xt,
                               int64_t nslabs, int64_t s0, int64_t s1) {
  for (int64_t s = s0; s < s1; ++s)
    for (int l = 0; l < 16; ++l) {
      const int64_t row = s * 16 + l;
      float* d = xt + s * 16 + l;  // input i at d[i * nslabs * 16]
      if (row >= m) {
        for (int64_t i = 0; i < k; ++i) d[i * nslabs * 16] = 0.f;
      } else if (x_bf16) {
        const uint16_t* xr = static_cast<const uint16_t*>(x) + row * ldx;
        for (int64_t i = 0; i < k; ++i) d[i * nslabs * 16] = bf16_as_fp32(xr[i]);
      } else {
        const float* xr = static_cast<const float*>(x) + row * ldx;
        for (int64_t i = 0; i < k; ++i) d[i * nslabs * 16] = xr[i];
      }
    }
}

}  // namespace
}  // namespace block_sparse
}  // namespace pyaccel
