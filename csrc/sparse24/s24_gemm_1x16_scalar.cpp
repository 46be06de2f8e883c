// Portable 2:4 GEMM over the packed layout: one row x one 16-channel panel.
#include "int8_gemm/int8_gemm.h"  // fp32_to_bf16
#include "sparse24/sparse24.h"

namespace pyaccel {
namespace sparse24 {

void s24_gemm_1x16_scalar(const GemmArgs& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  const int64_t blocks = g.groups_pad / kBlockGroups;
  for (int64_t p = p0; p < p1; ++p) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* x = g.x + m * g.ldx;
      float acc[kPanel] = {0};
      for (int64_t b = 0; b < blocks; ++b) {
        const uint8_t* blk = g.w + (p * blocks + b) * kBlockBytes;
        for (int j = 0; j < kBlockGroups; ++j) {
          const float* xg = x + (b * kBlockGroups + j) * 4;
          const float* v0 = reinterpret_cast<const float*>(blk + v0_at(j));
          const float* v1 = reinterpret_cast<const float*>(blk + v1_at(j));
          for (int c = 0; c < kPanel; ++c) {
            const uint8_t s = blk[pos_at(j) + c];
            acc[c] += xg[s & 3] * v0[c];
            acc[c] += xg[(s >> 2) & 3] * v1[c];
          }
        }
      }
      for (int c = 0; c < kPanel; ++c) {
        const int64_t n = p * kPanel + c;
        if (n >= g.n) break;
        int8_gemm::store_output(g.y, g.ldy, g.y_bf16, g.bias, m, n, acc[c]);
      }
    }
  }
}

}  // namespace sparse24
}  // namespace pyaccel
