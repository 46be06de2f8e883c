// BSR int8 GEMM, portable: one row x 16 channels of a block row at a time,
// int32 sums, int8_gemm's epilogue (split_scale order).
#include <algorithm>

#include "block_sparse/block_sparse.h"
#include "int8_gemm/int8_gemm.h"

namespace pyaccel {
namespace block_sparse {

void qs8_bsr_gemm_scalar(const GemmArgsI8& g, int64_t m0, int64_t m1, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t end = std::min<int64_t>(r * g.bh + g.bh, g.n);
    for (int ch = 0; ch < g.bh_pad && r * g.bh + ch < end; ch += 16) {
      for (int64_t m = m0; m < m1; ++m) {
        int32_t acc[16] = {};
        const int8_t* ar = g.a + m * g.lda;
        for (int64_t b = g.rowptr[r]; b < g.rowptr[r + 1]; ++b) {
          const int8_t* w = g.blocks + b * g.bw4 * g.bh_pad;
          const int8_t* ac = ar + g.colk[b];
          for (int j = 0; j < g.bw4; ++j) {
            const int32_t a = ac[j];
            const int8_t* wj = w + (j / 4 * g.bh_pad + ch) * 4 + j % 4;
            for (int i = 0; i < 16; ++i) acc[i] += a * wj[4 * i];
          }
        }
        const int8_gemm::ScaleSplit s = int8_gemm::split_scale(g.a_scale[m]);
        for (int i = 0; i < 16 && r * g.bh + ch + i < end; ++i) {
          const int64_t n = r * g.bh + ch + i;
          int8_gemm::store_output(g.y, g.ldy, g.y_bf16, g.bias, m, n,
                                  (static_cast<float>(acc[i]) * s.lo) * (s.hi * g.w_scale[n]));
        }
      }
    }
  }
}

}  // namespace block_sparse
}  // namespace pyaccel
