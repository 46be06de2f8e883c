// Portable int8 GEMM over the NR64K4 layout: one row x one 64-channel panel at
// a time, int32 accumulation, fused dequantization epilogue. The reference
// every SIMD kernel is tested against (through the Python reference too).
#include "int8_gemm/int8_gemm.h"

namespace pyaccel {
namespace int8_gemm {

void qs8_gemm_1x64c4_scalar(const GemmArgs& g, int64_t m0, int64_t m1, int64_t p0,
                            int64_t p1) {
  const int64_t groups = g.k_pad / kKGroup;
  for (int64_t p = p0; p < p1; ++p) {
    const int8_t* panel = g.w + p * groups * kPanel * kKGroup;
    for (int64_t m = m0; m < m1; ++m) {
      int32_t acc[kPanel] = {0};
      const int8_t* a = g.a + m * g.lda;
      for (int64_t grp = 0; grp < groups; ++grp) {
        const int8_t* b = panel + grp * kPanel * kKGroup;
        for (int c = 0; c < kPanel; ++c)
          for (int j = 0; j < kKGroup; ++j)
            acc[c] += static_cast<int32_t>(a[grp * kKGroup + j]) * b[c * kKGroup + j];
      }
      const ScaleSplit sa = split_scale(g.a_scale[m]);
      for (int c = 0; c < kPanel; ++c) {
        const int64_t n = p * kPanel + c;
        if (n >= g.n) break;
        store_output(g.c, g.ldc, g.c_bf16, g.bias, m, n,
                     (static_cast<float>(acc[c]) * sa.lo) * (sa.hi * g.w_scale[n]));
      }
    }
  }
}

}  // namespace int8_gemm
}  // namespace pyaccel
