// int8 GEMM, AVX2, 8-bit activations on pair-safe weights: the exact 8-bit
// result at the 3-instruction budget of vpmaddubsw + vpmaddwd + vpaddd.
//
// vpmaddubsw multiplies unsigned bytes by signed ones and adds adjacent pairs
// with int16 saturation. With u = q + 128 in [1, 255] (the VNNI kernels'
// encoding) and any int8 weights a pair sum can reach 2 * 255 * 127 and
// saturate -- why the plain 8-bit AVX2 kernel multiplies int16 (4
// instructions per 32 products). The packer splits w = s + r (PsHeader,
// int8_gemm.h): in s every pair's same-sign magnitudes sum to at most 128, so
// u0 * s0 + u1 * s1 lies in [-32640, 32640] and the 4x16 tile of the 7-bit
// kernel (qs8_gemm_avx2_tile.h) multiplies s exactly; the sparse residual r
// (one entry per offending pair) is multiplied separately, per panel, from
// the activations transposed to columns: per entry and 16 rows one
// vpmovzxbw, two vpmaddwd (r in the low / high int16 of the broadcast: the
// even / odd rows' exact products) and two vpaddd. The tile's epilogue adds the
// residual sums and subtracts comp = 128 * sum_k w, leaving sum_k q * w
// exactly, the integer every other kernel computes.

#include "int8_gemm/split_linear_avx2.h"

namespace pyaccel {
namespace int8_gemm {
namespace {

struct PsStep {
  static constexpr int64_t kRowPathRows = 0;  // linear() keeps the few-row calls on the int16 kernel's row path
  static constexpr int kTileRows = 4;         // the step's temporary and ones leave room for 8 accumulators
  static __m256i weights(const int8_t* b) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)); }
  static void step(__m256i& c, __m256i w, __m256i u, const int8_t*, __m256i ones) {
    avx2_tile::maddubs_step(c, w, u, ones);
  }
  // acc + residual sums - 128 * sum_k w for row m, channels [n0, n0 + 8).
  static __m256i finish(const GemmArgs& g, __m256i acc, int64_t m, int64_t n0) {
    const __m256i comp = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g.comp + n0));
    const __m256i corr = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g.corr + m * kPanel + n0 % kPanel));
    return _mm256_sub_epi32(_mm256_add_epi32(acc, corr), comp);
  }
};

}  // namespace

void linear_ps_avx2(const Kernel& kern, const void* x, int64_t ldx, bool x_bf16, int64_t m, int64_t k,
                    const uint8_t* packed, const float* w_scale, const float* bias, void* y, int64_t ldy,
                    bool y_bf16, int nthreads) {
  split_linear::linear(kern.quantize, 0x80, kQmax8, x, ldx, x_bf16, m, k, packed, w_scale, bias, y, ldy, y_bf16,
                       nthreads,
                       [](const GemmArgs& g, const pair_safe::Residuals& res, int64_t m0, int64_t m1, int64_t p0,
                          int64_t p1) {
                         split_linear::gemm<PsStep::kTileRows>(g, res, m0, m1, p0, p1,
                                                      [](const GemmArgs& g, int64_t m, auto h, const int8_t* sub,
                                                         int64_t n0, const int8_t* pf) { avx2_tile::tile<PsStep, h()>(g, m, sub, n0, pf); });
                       });
}

}  // namespace int8_gemm
}  // namespace pyaccel
