// 2:4 int8 dispatch ladder and driver: quantize activations per row (the
// int8_gemm quantizers), then run tiles over (pair of panels, row chunk).
#include <algorithm>
#include <cstring>
#include <vector>

#include "common/ladder.h"
#include "common/parallel.h"
#include "int8_gemm/int8_gemm.h"
#include "sparse24/sparse24_int8.h"

namespace pyaccel {
namespace sparse24_int8 {
namespace {

struct Entry {
  Kernel kernel;
  int8_gemm::QuantizeRowsFn quantize;
};

const Entry kLadder[] = {
    // the AMX level: the ICL kernel, and the dense int8 (AMX) kernel from 9 rows (README.md)
    {{Isa::kAvx512Amx, "qs8_s24_gemm_6x32_avx512icl", 6, 0x80, qs8_s24_gemm_6x32_avx512icl, 9},
     int8_gemm::quantize_rows_avx512},
    {{Isa::kAvx512Icl, "qs8_s24_gemm_6x32_avx512icl", 6, 0x80, qs8_s24_gemm_6x32_avx512icl, 0},
     int8_gemm::quantize_rows_avx512},
    {{Isa::kAvx512Vnni, "qs8_s24_gemm_6x32_avx512vnni", 6, 0x80, qs8_s24_gemm_6x32_avx512vnni, 8},
     int8_gemm::quantize_rows_avx512},
    // AVX-VNNI: dense int8 at 2 - 7 rows on layers under 4 Mi weights, never
    // on bigger ones (README.md)
    {{Isa::kAvxVnni, "qs8_s24_gemm_4x16_avxvnni", 12, 0x80, qs8_s24_gemm_4x16_avxvnni, 2, kRowPathRowsAvxVnni, 2, 8},
     int8_gemm::quantize_rows_avx2},
    {{Isa::kAvx2, "qs8_s24_gemm_4x16_avx2", 4, 0x00, qs8_s24_gemm_4x16_avx2, 0, kRowPathRowsAvx2},
     int8_gemm::quantize_rows_avx2},
    {{Isa::kPortable, "qs8_s24_gemm_1x32_scalar", 1, 0x00, qs8_s24_gemm_1x32_scalar, 0},
     int8_gemm::quantize_rows_scalar},
};

LadderChoice<Entry> g_choice;

constexpr int64_t kMinParallelMacs = int64_t(1) << 19;

const Entry& select_entry() {
  return g_choice.get(kLadder, [](const Entry& e) { return e.kernel.isa; });
}

}  // namespace

const Kernel& select_kernel() { return select_entry().kernel; }

bool dense_wins(int64_t m, int64_t n, int64_t k) {
  const Kernel& kern = select_kernel();
  if (kern.dense_from_rows <= 0 || m < kern.dense_from_rows) return false;
  const int again = n * k >= kBigLayerWeights ? kern.sparse_from_rows_big : kern.sparse_from_rows_small;
  return again <= 0 || m < again;
}

void linear(const void* x, int64_t ldx, bool x_bf16, int64_t m, int64_t k, const uint8_t* packed,
            const float* w_scale, const float* bias, void* y, int64_t ldy, bool y_bf16, int nthreads) {
  if (m <= 0) return;
  const Entry& e = select_entry();
  const Kernel& kern = e.kernel;
  PackedHeader h;
  std::memcpy(&h, packed, sizeof(h));
  const int64_t k_pad = kQuadInputs * h.quads;
  if (m * h.n_pad * k_pad < kMinParallelMacs) nthreads = 1;  // dense-equivalent work, as int8_gemm
  if (h.ps_offset && kern.gemm == qs8_s24_gemm_4x16_avx2 && m >= ps_min_rows(h.n, h.k))
    return linear_ps_avx2(e.quantize, x, ldx, x_bf16, m, k, packed, w_scale, bias, y, ldy, y_bf16, nthreads);
  const size_t ysize = y_bf16 ? 2 : 4;
  int8_gemm::quantized_passes(
      e.quantize, kern.a_xor, kern.mr, x, ldx, x_bf16, m, k, k_pad, nthreads,
      [&](const int8_t* q, const float* qs, int64_t lda, int64_t r0, int64_t rows) {
        GemmArgs g{reinterpret_cast<const uint8_t*>(q), lda, qs, packed + h.data_offset,
                   reinterpret_cast<const int32_t*>(packed + h.comp_offset), w_scale, bias,
                   static_cast<char*>(y) + r0 * ldy * ysize, ldy, y_bf16, rows, h.n, h.quads};
        g.ctrl = ctrl_table(packed);
        // units: 32-channel panels (one sequential stream of weight bytes each)
        const int64_t panels = h.n_pad / kPanel;
        if (rows <= kern.mr) {
          // one row tile: the split parallel_units_rows would make (contiguous
          // panel ranges), but one kernel call per thread, so per-call set-up
          // (the AVX2 one-row path's activation lanes) runs once, not per panel
          parallel_for(panels, 1, nthreads, [&](int64_t p0, int64_t p1) { kern.gemm(g, 0, rows, p0, p1); });
          return;
        }
        parallel_units_rows(panels, rows, kern.mr, nthreads,
                            [&](int64_t u, int64_t m0, int64_t m1) { kern.gemm(g, m0, m1, u, u + 1); });
      });
}

}  // namespace sparse24_int8
}  // namespace pyaccel
