// BSR fp32 GEMM, portable: one row x 16 channels of a block row at a time.
#include <algorithm>

#include "block_sparse/block_sparse.h"

namespace pyaccel {
namespace block_sparse {

void bsr_gemm_scalar(const GemmArgs& g, int64_t m0, int64_t m1, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t end = std::min<int64_t>(r * g.bh + g.bh, g.n);
    for (int ch = 0; ch < g.bh_pad && r * g.bh + ch < end; ch += 16) {
      const int valid = static_cast<int>(std::min<int64_t>(16, end - r * g.bh - ch));
      for (int64_t m = m0; m < m1; ++m) {
        float acc[16] = {};
        const float* xr = g.x + m * g.ldx;
        for (int64_t b = g.rowptr[r]; b < g.rowptr[r + 1]; ++b) {
          const int64_t c = g.colk[b];
          const int jn = static_cast<int>(std::min<int64_t>(g.bw, g.k - c));
          const float* w = g.blocks + b * g.bw * g.bh_pad + ch;
          for (int j = 0; j < jn; ++j) {
            const float a = xr[c + j];
            for (int i = 0; i < 16; ++i) acc[i] += a * w[j * g.bh_pad + i];
          }
        }
        for (int i = 0; i < valid; ++i) store_scalar(g, m, r * g.bh + ch + i, acc[i]);
      }
    }
  }
}

}  // namespace block_sparse
}  // namespace pyaccel
