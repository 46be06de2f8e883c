// 2:4 dispatch ladder and threaded driver.
#include <algorithm>
#include <cstring>
#include <vector>

#include "common/ladder.h"
#include "common/parallel.h"
#include "int8_gemm/int8_gemm.h"  // bf16_to_fp32
#include "sparse24/sparse24.h"

namespace pyaccel {
namespace sparse24 {
namespace {

const Kernel kLadder[] = {
    {Isa::kAvx512, "s24_gemm_6x32_avx512", 6, s24_gemm_6x32_avx512},
    {Isa::kAvx2, "s24_gemm_4x8_avx2", 4, s24_gemm_4x8_avx2},
    {Isa::kPortable, "s24_gemm_1x16_scalar", 1, s24_gemm_1x16_scalar},
};

LadderChoice<Kernel> g_choice;
thread_local std::vector<float> t_x;

constexpr int64_t kMinParallelMacs = int64_t(1) << 19;

}  // namespace

const Kernel& select_kernel() {
  return g_choice.get(kLadder, [](const Kernel& k) { return k.isa; });
}

void linear(const void* x, int64_t ldx, bool x_bf16, int64_t m, int64_t k, const uint8_t* packed,
            const float* bias, void* y, int64_t ldy, bool y_bf16, int nthreads) {
  if (m <= 0) return;
  const Kernel& kern = select_kernel();
  PackedHeader h;
  std::memcpy(&h, packed, sizeof(h));
  const int64_t kp = h.groups_pad * 4;
  if (m * h.n_pad * kp < kMinParallelMacs) nthreads = 1;  // dense-equivalent work, as int8_gemm
  // The kernels read x in whole groups of 4 up to kp: use x in place when it is
  // fp32 and k == kp; otherwise copy (bf16 -> fp32, zero tail) into scratch.
  const float* xf = static_cast<const float*>(x);
  int64_t lx = ldx;
  if (x_bf16 || k != kp) {
    if (t_x.size() < static_cast<size_t>(m * kp)) t_x.resize(m * kp);
    float* s = t_x.data();
    parallel_for(m, std::max<int64_t>(1, 16384 / kp), nthreads, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        float* d = s + r * kp;
        if (x_bf16) {
          const uint16_t* xs = static_cast<const uint16_t*>(x) + r * ldx;
          for (int64_t i = 0; i < k; ++i) d[i] = int8_gemm::bf16_to_fp32(xs[i]);
        } else {
          std::memcpy(d, static_cast<const float*>(x) + r * ldx, k * sizeof(float));
        }
        std::memset(d + k, 0, (kp - k) * sizeof(float));
      }
    });
    xf = s;
    lx = kp;
  }
  GemmArgs g{xf, lx, packed + h.data_offset, bias, y, ldy, y_bf16, m, h.n, h.groups_pad};
  // units: pairs of 16-channel panels (the AVX-512 tiles are 32 channels wide)
  const int64_t panels = h.n_pad / kPanel;
  parallel_units_rows((panels + 1) / 2, m, kern.mr, nthreads, [&](int64_t u, int64_t r0, int64_t r1) {
    kern.gemm(g, r0, r1, 2 * u, std::min<int64_t>(panels, 2 * u + 2));
  });
}

}  // namespace sparse24
}  // namespace pyaccel
