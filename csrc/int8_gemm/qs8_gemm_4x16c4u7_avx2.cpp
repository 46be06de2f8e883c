// int8 GEMM micro-kernel, AVX2, 7-bit activations (the opt-in act_bits=7
// mode): 4 rows x 16 channels, 4 k per step, and the k-blocked row path over
// whole panels (tiles: qs8_gemm_avx2_tile.h). Activations arrive as u = q + 64 with
// q in [-63, 63] (quantizer zero point 0x40), so u in [1, 127] is vpmaddubsw's
// unsigned operand and the packed weight w in [-127, 127] its signed one: each
// int16 pair sum u0*w0 + u1*w1 lies in [-2*127*127, 2*127*127] and never
// saturates. One step is vpmaddubsw + vpmaddwd + vpaddd per 32 products -- the
// 3-instruction budget, against the sign trick's 4. The epilogue removes the
// offset: sum_k u*w = sum_k q*w + 64 * sum_k w, and the packed header's
// comp = 128 * sum_k w, so acc - comp / 2 (exact: comp is even and, for
// K <= INT8_MAX_K, does not wrap).
#include "int8_gemm/qs8_gemm_avx2_tile.h"

namespace pyaccel {
namespace int8_gemm {
namespace {

struct U7Step {
  static constexpr int64_t kRowPathRows = kAvx2U7RowPathRows;
  static constexpr int64_t kRowPathRowsHuge = int8_gemm::kRowPathRowsHuge;
  static constexpr int kTileRows = 4;  // the step's temporary and ones leave room for 8 accumulators
  static __m256i weights(const int8_t* b) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)); }
  // c += w * u: u in [1, 127] keeps every pair sum in int16 (avx2_tile::maddubs_step)
  static void madd(__m256i& c, const __m256i& w, __m256i u, __m256i ones) { avx2_tile::maddubs_step(c, w, u, ones); }
  static void step(__m256i& c, __m256i w, __m256i u, const int8_t*, __m256i ones) { madd(c, w, u, ones); }
  static __m256i row_a(__m256i u) { return u; }
  // Row path: the weights straight from memory (one load per step, in address order).
  static void row_step(__m256i& c, __m256i u, const int8_t* b, __m256i ones) {
    madd(c, *reinterpret_cast<const __m256i*>(b), u, ones);
  }
  // acc - 64 * sum_k w[n, k] for channels [n0, n0 + 8) (comp holds n_pad entries).
  static __m256i finish(const GemmArgs& g, __m256i acc, int64_t, int64_t n0) {
    const __m256i comp = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g.comp + n0));
    return _mm256_sub_epi32(acc, _mm256_srai_epi32(comp, 1));
  }
};

}  // namespace

void qs8_gemm_4x16c4u7_avx2(const GemmArgs& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  avx2_tile::gemm<U7Step>(g, m0, m1, p0, p1);
}

}  // namespace int8_gemm
}  // namespace pyaccel
