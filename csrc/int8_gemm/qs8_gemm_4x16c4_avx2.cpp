// int8 GEMM micro-kernel, AVX2, 8-bit activations: 4 rows x 16 channels (a
// quarter of a packed panel), 4 k per step; a one-row path over whole panels
// for small calls (tiles: qs8_gemm_avx2_tile.h). Same sign trick as the
// AVX-512 BW kernel with the roles swapped: |w| in the unsigned operand of
// vpmaddubsw, w's sign applied to the activations with vpsignb, so int16 pair
// sums never saturate (<= 2*127*127).
#include "int8_gemm/qs8_gemm_avx2_tile.h"

namespace pyaccel {
namespace int8_gemm {
namespace {

struct SignStep {
  // The row path beats the 4-row tile up to here (measured, Zen 4 capped at
  // AVX2, interleaved: 1.0 - 3.6x at 1 - 16 rows on the four issue shapes,
  // 0.87 - 1.17x at 32 - 128 rows).
  static constexpr int64_t kRowPathRows = kAvx2RowPathRows;
  static __m256i weights(const int8_t* b) {
    return _mm256_abs_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)));
  }
  // One multiply-add step of the tile: c += w * a for 8 channels x 4 k, with
  // |w| (precomputed once per k group, shared by the rows) as vpmaddubsw's
  // unsigned operand and a carrying w's sign (vpsignb: a, -a or 0) as its
  // signed one. |w| <= 127 and |a| <= 127 (the quantizer never emits -128), so
  // each int16 pair sum is at most 2 * 127 * 127 and never saturates. Inline
  // asm: with intrinsics GCC keeps copying the accumulators and spills two of them.
  static void step(__m256i& c, __m256i w_abs, __m256i a, const int8_t* w, __m256i ones) {
    __m256i t;
    __asm__(
        "vpsignb %[w], %[a], %[t]\n\t"
        "vpmaddubsw %[t], %[u], %[t]\n\t"
        "vpmaddwd %[ones], %[t], %[t]\n\t"
        "vpaddd %[t], %[c], %[c]"
        : [c] "+x"(c), [t] "=&x"(t)
        : [w] "m"(*reinterpret_cast<const __m256i*>(w)), [a] "x"(a), [u] "x"(w_abs), [ones] "x"(ones));
  }
  // Row path: |a| as the unsigned operand, w with a's sign as the signed one.
  struct RowA {
    __m256i abs, sgn;
  };
  static RowA row_a(__m256i a) { return {_mm256_abs_epi8(a), a}; }
  static void row_step(__m256i& c, const RowA& ra, const int8_t* b, __m256i ones) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b));
    c = _mm256_add_epi32(c, _mm256_madd_epi16(_mm256_maddubs_epi16(ra.abs, _mm256_sign_epi8(w, ra.sgn)), ones));
  }
  static __m256i finish(const GemmArgs&, __m256i acc, int64_t) { return acc; }
};

}  // namespace

void qs8_gemm_4x16c4_avx2(const GemmArgs& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  avx2_tile::gemm<SignStep>(g, m0, m1, p0, p1);
}

}  // namespace int8_gemm
}  // namespace pyaccel
