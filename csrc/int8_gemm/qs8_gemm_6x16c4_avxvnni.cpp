// int8 GEMM micro-kernels, AVX-VNNI level: vpdpbusd on ymm, 6 rows x 16
// channels and the k-blocked row path over whole panels (tiles:
// qs8_gemm_avx2_tile.h), one instruction per 32 u8 x s8 products.
//
// As in the AVX-512 VNNI kernel, activations arrive as q ^ 0x80 (= q + 128,
// uint8) and the epilogue subtracts comp[n] = 128 * sum_k w[n, k]; each
// vpdpbusd lane adds 4 products of at most 255 * 127, so nothing saturates and
// the int32 sums are exact (any 8-bit or 7-bit q: both modes run this kernel
// and give the same bits as every other level).
//
// One source, two encodings of the one instruction that differs: vpdpbusd
// ymm exists VEX-encoded (AVX-VNNI: Alder Lake and later Intel client cores,
// Sierra Forest, Zen 5) and EVEX-encoded (AVX-512 VNNI + VL: Ice Lake, Zen 4),
// with the same operation (Intel SDM, VPDPBUSD). This file is compiled with
// the AVX2 flags only, so everything else in both functions is VEX/legacy
// code the compiler generated once from the same template; the multiply-add is
// inline asm, "{vex} vpdpbusd" in one instantiation and plain "vpdpbusd"
// (EVEX) in the other. The entry point runs the VEX build where the CPU has
// AVX-VNNI and the EVEX twin elsewhere (an AVX-512 VNNI CPU capped at
// avx_vnni), so the twin is what the test suite runs on AVX-512 machines;
// tests/ops/test_int8_avxvnni.py checks that the two builds' disassembly
// differs in nothing but that instruction's encoding.
#include "common/cpu_features.h"
#include "common/vnni_ymm.h"
#include "int8_gemm/qs8_gemm_avx2_tile.h"

namespace pyaccel {
namespace int8_gemm {
namespace {

template <bool Vex>
struct VnniStep {
  static constexpr int64_t kRowPathRows = kAvxVnniRowPathRows;
  static constexpr int64_t kRowPathRowsHuge = int8_gemm::kRowPathRowsHuge;
  // 12 accumulators, 2 weights, 1 broadcast. Measured on Zen 4 (EVEX build,
  // 2 threads, interleaved): 1.00 - 1.11x the 4-row tile; on Golden Cove,
  // whose ymm vpdpbusd has a latency of 5 at 2 a cycle, 8 chains would stall.
  static constexpr int kTileRows = 6;
  static __m256i weights(const int8_t* b) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)); }
  // c += per-lane sums of 4 u8 (a) x s8 (w) products (common/vnni_ymm.h)
  static void madd(__m256i& c, const __m256i& w, __m256i a) { dpbusd_ymm<Vex>(c, a, w); }
  static void step(__m256i& c, __m256i w, __m256i a, const int8_t*, __m256i) { madd(c, w, a); }
  static __m256i row_a(__m256i a) { return a; }
  // Row path: the weights straight from memory (one load per step, in address order).
  static void row_step(__m256i& c, __m256i a, const int8_t* b, __m256i) {
    madd(c, *reinterpret_cast<const __m256i*>(b), a);
  }
  // acc - 128 * sum_k w[n, k] for channels [n0, n0 + 8) (comp holds n_pad entries).
  static __m256i finish(const GemmArgs& g, __m256i acc, int64_t, int64_t n0) {
    return _mm256_sub_epi32(acc, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g.comp + n0)));
  }
};

}  // namespace

// The two encodings, each one function with everything inlined (flatten), so
// that their disassembly can be compared instruction by instruction.
__attribute__((flatten, noinline)) void qs8_gemm_6x16c4_avxvnni_vex(const GemmArgs& g, int64_t m0, int64_t m1,
                                                                    int64_t p0, int64_t p1) {
  avx2_tile::gemm<VnniStep<true>>(g, m0, m1, p0, p1);
}

__attribute__((flatten, noinline)) void qs8_gemm_6x16c4_avxvnni_evex(const GemmArgs& g, int64_t m0, int64_t m1,
                                                                     int64_t p0, int64_t p1) {
  avx2_tile::gemm<VnniStep<false>>(g, m0, m1, p0, p1);
}

void qs8_gemm_6x16c4_avxvnni(const GemmArgs& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  static const auto build = avx_vnni_build(&qs8_gemm_6x16c4_avxvnni_vex, &qs8_gemm_6x16c4_avxvnni_evex);
  build(g, m0, m1, p0, p1);
}

}  // namespace int8_gemm
}  // namespace pyaccel
