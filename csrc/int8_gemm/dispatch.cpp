// The int8 GEMM dispatch ladder (chosen once per ISA-cap generation) and the
// threaded driver: quantize activations, then run micro-tiles over a grid of
// (panel, row-chunk) tiles split in contiguous ranges over the threads.
#include <cstdlib>
#include <cstring>
#include <vector>

#include "common/ladder.h"
#include "common/parallel.h"
#include "common/row_passes.h"
#include "int8_gemm/int8_gemm.h"

namespace pyaccel {
namespace int8_gemm {
namespace {

// Best first. Each entry names the kernel, its tile rows, the activation
// encoding it expects, and its quantizer.
const Kernel kLadder[] = {
    {Isa::kAvx512Vnni, "qs8_gemm_6x64c4_avx512vnni", 6, 0x80, quantize_rows_avx512,
     qs8_gemm_6x64c4_avx512vnni},
    {Isa::kAvx512, "qs8_gemm_4x64c4_avx512bw", 4, 0x00, quantize_rows_avx512,
     qs8_gemm_4x64c4_avx512bw},
    {Isa::kAvx2, "qs8_gemm_4x16c4_avx2", 4, 0x00, quantize_rows_avx2, qs8_gemm_4x16c4_avx2},
    {Isa::kPortable, "qs8_gemm_1x64c4_scalar", 1, 0x00, quantize_rows_scalar,
     qs8_gemm_1x64c4_scalar},
};

LadderChoice<Kernel> g_choice;

// Per-thread scratch for quantized activations, grown on demand and reused so
// that large calls do not page-fault a fresh buffer every time.
struct Scratch {
  std::vector<int8_t> q;
  std::vector<float> scale;
};
thread_local Scratch t_scratch;

void run_gemm(const Kernel& kern, const GemmArgs& g, int64_t n_pad, int nthreads) {
  parallel_units_rows(n_pad / kPanel, g.m, kern.mr, nthreads,
                      [&](int64_t p, int64_t m0, int64_t m1) { kern.gemm(g, m0, m1, p, p + 1); });
}

// Row stride of the quantized activations: k_pad plus one cache line when
// k_pad is a multiple of 1 KiB, so the MR rows a micro-tile broadcasts from do
// not all fall in the same L1 set.
constexpr int64_t kMinParallelMacs = int64_t(1) << 19;

int64_t a_stride(int64_t k_pad) { return k_pad % 1024 == 0 ? k_pad + 64 : k_pad; }

}  // namespace

const Kernel& select_kernel() {
  return g_choice.get(kLadder, [](const Kernel& k) { return k.isa; });
}

void linear(const void* x, int64_t ldx, bool x_bf16, int64_t m, int64_t k,
            const uint8_t* packed, const float* w_scale, const float* bias, void* y,
            int64_t ldy, bool y_bf16, int nthreads) {
  if (m <= 0) return;
  const Kernel& kern = select_kernel();
  PackedHeader h;
  std::memcpy(&h, packed, sizeof(h));
  // Below ~0.5M multiply-adds a fork/join (2-3 us) costs more than it saves.
  if (m * h.n_pad * h.k_pad < kMinParallelMacs) nthreads = 1;
  Scratch& s = t_scratch;
  const int64_t lda = a_stride(h.k_pad);
  const size_t xsize = x_bf16 ? 2 : 4, ysize = y_bf16 ? 2 : 4;
  // quantized rows in passes of <= ~8 MiB (scratch bounded for any batch)
  for_each_row_pass(m, lda, int64_t(8) << 20, 6 * kern.mr, [&](int64_t r0, int64_t r1) {
    const int64_t rows = r1 - r0;
    if (s.q.size() < static_cast<size_t>(rows * lda)) s.q.resize(rows * lda);
    if (s.scale.size() < static_cast<size_t>(rows)) s.scale.resize(rows);
    int8_t* q = s.q.data();
    float* qs = s.scale.data();
    const void* xr = static_cast<const char*>(x) + r0 * ldx * xsize;
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1));
    parallel_for(rows, grain, nthreads, [&](int64_t m0, int64_t m1) {
      kern.quantize(xr, ldx, x_bf16, m0, m1, k, h.k_pad, lda, kern.a_xor, q, qs);
    });
    GemmArgs g{q, lda, qs,
               reinterpret_cast<const int8_t*>(packed + h.data_offset),
               reinterpret_cast<const int32_t*>(packed + h.comp_offset),
               w_scale, bias, static_cast<char*>(y) + r0 * ldy * ysize, ldy, y_bf16, rows, h.n, h.k_pad};
    run_gemm(kern, g, h.n_pad, nthreads);
  });
}

void gemm_prequantized(const int8_t* q, int64_t lda, const float* q_scale, int64_t m,
                       int64_t k, const uint8_t* packed, const float* w_scale,
                       const float* bias, void* y, int64_t ldy, bool y_bf16, int nthreads) {
  if (m <= 0) return;
  const Kernel& kern = select_kernel();
  PackedHeader h;
  std::memcpy(&h, packed, sizeof(h));
  // Re-encode into k_pad rows with the kernel's activation encoding.
  Scratch& s = t_scratch;
  const int64_t lda_a = a_stride(h.k_pad);
  if (s.q.size() < static_cast<size_t>(m * lda_a)) s.q.resize(m * lda_a);
  int8_t* a = s.q.data();
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t i = 0; i < k; ++i)
      a[r * lda_a + i] = static_cast<int8_t>(static_cast<uint8_t>(q[r * lda + i]) ^ kern.a_xor);
    for (int64_t i = k; i < h.k_pad; ++i) a[r * lda_a + i] = static_cast<int8_t>(kern.a_xor);
  }
  GemmArgs g{a, lda_a, q_scale,
             reinterpret_cast<const int8_t*>(packed + h.data_offset),
             reinterpret_cast<const int32_t*>(packed + h.comp_offset),
             w_scale, bias, y, ldy, y_bf16, m, h.n, h.k_pad};
  run_gemm(kern, g, h.n_pad, nthreads);
}

void quantize_rows(const void* x, int64_t ldx, bool x_bf16, int64_t m, int64_t k, int8_t* q,
                   int64_t ldq, float* scale, int nthreads) {
  if (m <= 0) return;
  const Kernel& kern = select_kernel();
  const int64_t k_pad = (k + kKGroup - 1) / kKGroup * kKGroup;
  // quantize into a k_pad-strided scratch, then copy out the k valid columns
  std::vector<int8_t> tmp(static_cast<size_t>(m * k_pad));
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1));
  parallel_for(m, grain, nthreads, [&](int64_t m0, int64_t m1) {
    kern.quantize(x, ldx, x_bf16, m0, m1, k, k_pad, k_pad, 0, tmp.data(), scale);
  });
  for (int64_t r = 0; r < m; ++r) std::memcpy(q + r * ldq, tmp.data() + r * k_pad, k);
}

}  // namespace int8_gemm
}  // namespace pyaccel
