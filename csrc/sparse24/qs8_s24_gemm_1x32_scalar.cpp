// Portable 2:4 int8 GEMM over the packed layout (signed activations).
#include "int8_gemm/int8_gemm.h"  // fp32_to_bf16
#include "sparse24/sparse24_int8.h"

namespace pyaccel {
namespace sparse24_int8 {

void qs8_s24_gemm_1x32_scalar(const GemmArgs& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    for (int64_t m = m0; m < m1; ++m) {
      const int8_t* a = reinterpret_cast<const int8_t*>(g.a + m * g.lda);
      int32_t acc[kPanel] = {0};
      for (int64_t qb = 0; qb < g.quads; ++qb) {
        const uint8_t* blk = g.w + (p * g.quads + qb) * kQuadBytes;
        for (int j = 0; j < kQuadPairs; ++j) {
          const int8_t* v = reinterpret_cast<const int8_t*>(blk) + kQuadValOffset + j * kPairBytes;
          const int8_t* ap = a + kQuadInputs * qb + 8 * j;
          for (int c = 0; c < kPanel; ++c) {
            const uint8_t s = blk[kQuadPosOffset + 4 * c + j];
            acc[c] += ap[s & 3] * v[4 * c] + ap[(s >> 2) & 3] * v[4 * c + 1] +
                      ap[4 + ((s >> 4) & 3)] * v[4 * c + 2] + ap[4 + (s >> 6)] * v[4 * c + 3];
          }
        }
      }
      const int8_gemm::ScaleSplit sa = int8_gemm::split_scale(g.a_scale[m]);
      for (int c = 0; c < kPanel; ++c) {
        const int64_t n = p * kPanel + c;
        if (n >= g.n) break;
        int8_gemm::store_output(g.y, g.ldy, g.y_bf16, g.bias, m, n,
                                (static_cast<float>(acc[c]) * sa.lo) * (sa.hi * g.w_scale[n]));
      }
    }
  }
}

}  // namespace sparse24_int8
}  // namespace pyaccel
