// The int8 GEMM dispatch ladder (chosen once per ISA-cap generation) and the
// threaded driver: quantize activations, then run micro-tiles over a grid of
// (panel, row-chunk) tiles split in contiguous ranges over the threads.
#include <cstdlib>
#include <algorithm>
#include <cstring>
#include <vector>

#include "common/ladder.h"
#include "common/parallel.h"
#include "int8_gemm/int8_gemm.h"

namespace pyaccel {
namespace int8_gemm {
namespace {

// Best first. Each entry names the kernel, its tile rows, the activation
// encoding it expects, and its quantizer.
const Kernel kLadder[] = {
#ifdef PYACCEL_AMX_BUILT
    {Isa::kAvx512Amx, "qs8_gemm_32x64c4_amx", 32, 0x80, quantize_rows_avx512, qs8_gemm_32x64c4_amx, 0, kQmax8, true},
#endif
    {Isa::kAvx512Vnni, "qs8_gemm_6x64c4_avx512vnni", 6, 0x80, quantize_rows_avx512,
     qs8_gemm_6x64c4_avx512vnni},
    {Isa::kAvx512, "qs8_gemm_4x64c4_avx512bw", 4, 0x00, quantize_rows_avx512,
     qs8_gemm_4x64c4_avx512bw},
    {Isa::kAvxVnni, "qs8_gemm_6x16c4_avxvnni", 6, 0x80, quantize_rows_avx2, qs8_gemm_6x16c4_avxvnni,
     kAvxVnniRowPathRows, kQmax8, false, nullptr, kRowPathRowsHuge},
    {Isa::kAvx2, "qs8_gemm_6x8c4_avx2", 6, 0x00, quantize_rows_avx2, qs8_gemm_6x8c4_avx2, kAvx2RowPathRows, kQmax8,
     false, widen_rows_avx2},
    {Isa::kPortable, "qs8_gemm_1x64c4_scalar", 1, 0x00, quantize_rows_scalar,
     qs8_gemm_1x64c4_scalar},
};

// The opt-in 7-bit ladder: activations in [-63, 63]. The VNNI (zmm and ymm), AVX-512 BW and
// scalar kernels multiply any int8 values exactly, so they run unchanged on
// 7-bit q (bit-identical results on every level for one checkpoint); the AVX2
// level takes q + 64 in [1, 127] as vpmaddubsw's unsigned operand, whose int16
// pair sums (<= 2 * 127 * 127) then never saturate: 3 instructions per 32
// products instead of the sign trick's 4.
const Kernel kLadder7[] = {
#ifdef PYACCEL_AMX_BUILT
    {Isa::kAvx512Amx, "qs8_gemm_32x64c4_amx", 32, 0x80, quantize_rows_avx512, qs8_gemm_32x64c4_amx, 0, kQmax7, true},
#endif
    {Isa::kAvx512Vnni, "qs8_gemm_6x64c4_avx512vnni", 6, 0x80, quantize_rows_avx512,
     qs8_gemm_6x64c4_avx512vnni, 0, kQmax7},
    {Isa::kAvx512, "qs8_gemm_4x64c4_avx512bw", 4, 0x00, quantize_rows_avx512, qs8_gemm_4x64c4_avx512bw, 0,
     kQmax7},
    {Isa::kAvxVnni, "qs8_gemm_6x16c4_avxvnni", 6, 0x80, quantize_rows_avx2, qs8_gemm_6x16c4_avxvnni,
     kAvxVnniRowPathRows, kQmax7, false, nullptr, kRowPathRowsHuge},
    {Isa::kAvx2, "qs8_gemm_4x16c4u7_avx2", 4, 0x40, quantize_rows_avx2, qs8_gemm_4x16c4u7_avx2, kAvx2U7RowPathRows,
     kQmax7, false, nullptr, kRowPathRowsHuge},
    {Isa::kPortable, "qs8_gemm_1x64c4_scalar", 1, 0x00, quantize_rows_scalar, qs8_gemm_1x64c4_scalar, 0, kQmax7},
};

LadderChoice<Kernel> g_choice, g_choice7;

struct Scratch {
  std::vector<int8_t> q;
  std::vector<float> scale;
  std::vector<int16_t> a16;
};
thread_local Scratch t_scratch;

void run_gemm(const Kernel& kern, const GemmArgs& g, int64_t n_pad, int nthreads) {
  const int64_t panels = n_pad / kPanel;
  if (kern.panel_ranges) {
    // about two ranges of panels per thread (rows are split too where they are few)
    const int64_t per = std::max<int64_t>(1, panels / (2 * std::max(1, nthreads)));
    parallel_units_rows((panels + per - 1) / per, g.m, kern.mr, nthreads, [&](int64_t u, int64_t m0, int64_t m1) {
      kern.gemm(g, m0, m1, u * per, std::min(panels, (u + 1) * per));
    });
    return;
  }
  parallel_units_rows(panels, g.m, kern.mr, nthreads,
                      [&](int64_t p, int64_t m0, int64_t m1) { kern.gemm(g, m0, m1, p, p + 1); });
}

constexpr int64_t kMinParallelMacs = int64_t(1) << 19;

// K = 0: every sum is empty, y[m, :] = bias (or 0). The kernels' K loops
// would not run at all and leave y unwritten.
void fill_empty_k(void* y, int64_t ldy, bool y_bf16, int64_t m, int64_t n, const float* bias) {
  for (int64_t r = 0; r < m; ++r)
    for (int64_t c = 0; c < n; ++c) store_output(y, ldy, y_bf16, bias, r, c, 0.f);
}

}  // namespace

bool wants_pair_safe() { return select_kernel(8).gemm == qs8_gemm_6x8c4_avx2; }
bool wants_quad_safe() { return select_kernel(7).gemm == qs8_gemm_4x16c4u7_avx2; }

const Kernel& select_kernel(int act_bits) {
  const auto isa_of = [](const Kernel& k) { return k.isa; };
  return act_bits == 7 ? g_choice7.get(kLadder7, isa_of) : g_choice.get(kLadder, isa_of);
}

void linear(const void* x, int64_t ldx, bool x_bf16, int64_t m, int64_t k,
            const uint8_t* packed, const float* w_scale, const float* bias, void* y,
            int64_t ldy, bool y_bf16, int nthreads, int act_bits) {
  if (m <= 0) return;
  const Kernel& kern = select_kernel(act_bits);
  PackedHeader h;
  std::memcpy(&h, packed, sizeof(h));
  if (h.k_pad == 0) return fill_empty_k(y, ldy, y_bf16, m, h.n, bias);
  // Below ~0.5M multiply-adds a fork/join (2-3 us) costs more than it saves.
  if (m * h.n_pad * h.k_pad < kMinParallelMacs) nthreads = 1;
  // the AVX2 paths for packings with the section their activation mode reads
  if (h.ps_offset && m > 1) {
    const int32_t kind = ps_kind(packed);
    if (kind == kPsPair && kern.gemm == qs8_gemm_6x8c4_avx2 && m >= kPs8MinRows)
      return linear_ps_avx2(kern, x, ldx, x_bf16, m, k, packed, w_scale, bias, y, ldy, y_bf16, nthreads);
    if (kind == kPsQuad && kern.gemm == qs8_gemm_4x16c4u7_avx2 && m >= qs_min_rows(h.n, h.k_pad))
      return linear_qs_avx2(kern, x, ldx, x_bf16, m, k, packed, w_scale, bias, y, ldy, y_bf16, nthreads);
  }
  const size_t ysize = y_bf16 ? 2 : 4;
  auto args = [&](const int8_t* q, const float* qs, int64_t lda, const int16_t* a16, int64_t r0, int64_t rows) {
    return GemmArgs{q, lda, qs, reinterpret_cast<const int8_t*>(packed + h.data_offset),
                    reinterpret_cast<const int32_t*>(packed + h.comp_offset), w_scale, bias,
                    static_cast<char*>(y) + r0 * ldy * ysize, ldy, y_bf16, rows, h.n, h.k_pad, a16,
                    a16_stride(h.k_pad)};
  };
  // many rows: each thread multiplies the rows it quantized (one panel a call
  // at a time; the AMX kernel takes ranges of panels and keeps the split below)
  if (!kern.panel_ranges &&
      row_chunk_passes(kern.quantize, kern.widen, kern.row_path_rows, kern.a_zero, kern.qmax, kern.mr, x, ldx, x_bf16,
                       m, k, h.k_pad, h.n_pad / kPanel, nthreads,
                       [&](const int8_t* q, const float* qs, int64_t lda, const int16_t* a16, int64_t r0,
                           int64_t rows, int64_t p, int64_t a0, int64_t a1) {
                         kern.gemm(args(q, qs, lda, a16, r0, rows), a0, a1, p, p + 1);
                       }))
    return;
  quantized_passes16(kern.quantize, kern.widen, kern.row_path_rows, kern.a_zero, kern.qmax, kern.mr, x, ldx, x_bf16,
                     m, k, h.k_pad, nthreads,
                     [&](const int8_t* q, const float* qs, int64_t lda, const int16_t* a16, int64_t r0, int64_t rows) {
                       run_gemm(kern, args(q, qs, lda, a16, r0, rows), h.n_pad, nthreads);
                     });
}

QuantScratch quant_scratch(int64_t rows, int64_t lda) {
  Scratch& s = t_scratch;
  if (s.q.size() < static_cast<size_t>(rows * lda)) s.q.resize(rows * lda);
  if (s.scale.size() < static_cast<size_t>(rows)) s.scale.resize(rows);
  return {s.q.data(), s.scale.data()};
}

int16_t* a16_scratch(int64_t rows, int64_t ld16) {
  Scratch& s = t_scratch;
  if (s.a16.size() < static_cast<size_t>(rows * ld16)) s.a16.resize(rows * ld16);
  return s.a16.data();
}

void gemm_prequantized(const int8_t* q, int64_t lda, const float* q_scale, int64_t m,
                       int64_t k, const uint8_t* packed, const float* w_scale,
                       const float* bias, void* y, int64_t ldy, bool y_bf16, int nthreads) {
  if (m <= 0) return;
  const Kernel& kern = select_kernel();
  PackedHeader h;
  std::memcpy(&h, packed, sizeof(h));
  if (h.k_pad == 0) return fill_empty_k(y, ldy, y_bf16, m, h.n, bias);
  // Re-encode into k_pad rows with the kernel's activation encoding, in row
  // passes (bounded scratch, as linear); 8-bit ladder: any q in [-127, 127]
  const int64_t lda_a = a_stride(h.k_pad);
  const size_t ysize = y_bf16 ? 2 : 4;
  for_each_row_pass(m, lda_a, kRowPassBytes, 6 * kern.mr, [&](int64_t r0, int64_t r1) {
    int8_t* a = quant_scratch(r1 - r0, lda_a).q;
    for (int64_t r = 0; r < r1 - r0; ++r) {
      const int8_t* qr = q + (r0 + r) * lda;
      for (int64_t i = 0; i < k; ++i)
        a[r * lda_a + i] = encode_q(qr[i], kern.a_zero);
      for (int64_t i = k; i < h.k_pad; ++i) a[r * lda_a + i] = static_cast<int8_t>(kern.a_zero);
    }
    GemmArgs g{a, lda_a, q_scale + r0,
               reinterpret_cast<const int8_t*>(packed + h.data_offset),
               reinterpret_cast<const int32_t*>(packed + h.comp_offset),
               w_scale, bias, static_cast<char*>(y) + r0 * ldy * ysize, ldy, y_bf16, r1 - r0, h.n, h.k_pad};
    run_gemm(kern, g, h.n_pad, nthreads);
  });
}

void quantize_rows(const void* x, int64_t ldx, bool x_bf16, int64_t m, int64_t k, int8_t* q,
                   int64_t ldq, float* scale, int nthreads, int qmax) {
  if (m <= 0) return;
  const Kernel& kern = select_kernel();
  const int64_t k_pad = (k + kKGroup - 1) / kKGroup * kKGroup;
  // quantize into a k_pad-strided scratch, then copy out the k valid columns
  std::vector<int8_t> tmp(static_cast<size_t>(m * k_pad));
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1));
  parallel_for(m, grain, nthreads, [&](int64_t m0, int64_t m1) {
    kern.quantize(x, ldx, x_bf16, m0, m1, k, k_pad, k_pad, 0, qmax, tmp.data(), scale);
  });
  for (int64_t r = 0; r < m; ++r) std::memcpy(q + r * ldq, tmp.data() + r * k_pad, k);
}

}  // namespace int8_gemm
}  // namespace pyaccel
