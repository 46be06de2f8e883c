// int8 GEMM, AVX2, 7-bit activations (act_bits=7) on quad-safe weights: two
// vpmaddubsw results added in int16 before one vpmaddwd, 5 instructions per
// 64 products where the 7-bit kernel (qs8_gemm_4x16c4u7_avx2.cpp) issues 6,
// of which 3 multiplies against 4.
//
// With u = q + 64 in [1, 127] (quantizer zero point 0x40) a vpmaddubsw pair
// sum u0 * w0 + u1 * w1 stays within 2 * 127 * 127, but two of them added can
// reach twice that. The packer splits w = s + r (a quad-safe section: PsHeader
// kind kPsQuad, int8_gemm.h): in s, each quad -- pair p of k groups 2j and 2j
// + 1, k = 8j + 2p + {0, 1} and 8j + 4 + 2p + {0, 1} -- has its positive parts
// and its negative parts each summing to at most 258 in magnitude, so its four
// products sum to within 127 * 258 = 32766 and vpaddw of the two pair sums is
// exact. The sparse residual r is multiplied from the activations transposed
// to byte columns, per panel, as on the 8-bit pair-safe path
// (pair_safe_avx2.h); the epilogue adds those sums and subtracts 64 * sum_k w
// (comp / 2), leaving sum_k q * w exactly, the integer every other kernel
// computes. A last k group without a partner (k_pad / 4 odd) is not split and
// takes the 3-instruction step.

#include "int8_gemm/split_linear_avx2.h"

namespace pyaccel {
namespace int8_gemm {
namespace {

// acc + residual sums - 64 * sum_k w for row m, channels [n0, n0 + 8).
inline __m256i finish(const GemmArgs& g, __m256i acc, int64_t m, int64_t n0) {
  const __m256i comp = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g.comp + n0));
  const __m256i corr = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g.corr + m * kPanel + n0 % kPanel));
  return _mm256_sub_epi32(_mm256_add_epi32(acc, corr), _mm256_srai_epi32(comp, 1));
}

// c += the 8 channels' products with u0 (k group g, weights w0) and u1
// (group g + 1, weights w1): both vpmaddubsw pair sums, added in int16 (exact
// on quad-safe weights), one vpmaddwd and one vpaddd. Inline asm: with the
// intrinsics GCC spilled accumulators and copied them between registers;
// w1 in a register or in memory ("xm": the tile holds 3 of its 4 weight
// vectors in registers, 16 ymm in all).
inline void quad_step(__m256i& c, __m256i w0, const __m256i& w1, __m256i u0, __m256i u1, __m256i ones) {
  __m256i t, s;
  __asm__(
      "vpmaddubsw %[w0], %[u0], %[t]\n\t"
      "vpmaddubsw %[w1], %[u1], %[s]\n\t"
      "vpaddw %[s], %[t], %[t]\n\t"
      "vpmaddwd %[ones], %[t], %[t]\n\t"
      "vpaddd %[t], %[c], %[c]"
      : [c] "+x"(c), [t] "=&x"(t), [s] "=&x"(s)
      : [w0] "x"(w0), [w1] "xm"(w1), [u0] "x"(u0), [u1] "x"(u1), [ones] "x"(ones));
}

#define PYACCEL_QS_ROW(r)                                                                   \
  if constexpr (MR > r) {                                                                   \
    const __m256i v0 = _mm256_set1_epi32(*reinterpret_cast<const int32_t*>(a##r + off));     \
    const __m256i v1 = _mm256_set1_epi32(*reinterpret_cast<const int32_t*>(a##r + off + 4)); \
    quad_step(c##r##0, wa0, wb0, v0, v1, ones);                                             \
    quad_step(c##r##1, wa1, *wb1, v0, v1, ones);                                            \
  }
#define PYACCEL_QS_LAST(r)                                                              \
  if constexpr (MR > r) {                                                               \
    const __m256i v0 = _mm256_set1_epi32(*reinterpret_cast<const int32_t*>(a##r + off)); \
    avx2_tile::maddubs_step(c##r##0, wa0, v0, ones);                                    \
    avx2_tile::maddubs_step(c##r##1, wa1, v0, ones);                                    \
  }
#define PYACCEL_QS_STORE(r)                                                                 \
  if constexpr (MR > r) {                                                                   \
    const float sa = g.a_scale[m + r];                                                      \
    avx2_tile::store8(g, finish(g, c##r##0, m + r, n0), sa, m + r, n0);                     \
    avx2_tile::store8(g, finish(g, c##r##1, m + r, n0 + 8), sa, m + r, n0 + 8);             \
  }

// Rows [m, m + MR) x 16 channels (a quarter of a packed panel), MR <= 4: 8
// accumulators, 3 of the two k groups' 4 weight vectors, ones, 2 broadcasts
// and 2 temporaries fill the 16 ymm registers. pf: what to pull into L2
// (prefetcht1), advancing g.pf_step bytes a k group (0: as the weights; see
// split_linear::gemm).
template <int MR>
inline void quad_tile(const GemmArgs& g, int64_t m, const int8_t* sub, int64_t n0, const int8_t* pf) {
  const int64_t groups = g.k_pad / kKGroup, pairs = groups / 2;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
  const int8_t *a0 = g.a + m * g.lda, *a1 = a0 + (MR > 1 ? g.lda : 0), *a2 = a0 + (MR > 2 ? 2 * g.lda : 0),
               *a3 = a0 + (MR > 3 ? 3 * g.lda : 0);
  const int8_t* b = sub;
  // one k group's 16 channels: 64 contiguous bytes in kPsQuarters order, one
  // 64-byte line of each 256-byte NR64K4 group otherwise
  const int64_t stride = g.w_quarters ? 16 * kKGroup : kPanel * kKGroup;
  const int64_t pf_step = g.pf_step ? g.pf_step : stride;
  for (int64_t j = 0; j < pairs; ++j, b += 2 * stride, pf += 2 * pf_step) {
    const int64_t off = j * 2 * kKGroup;
    _mm_prefetch(reinterpret_cast<const char*>(pf), _MM_HINT_T1);
    _mm_prefetch(reinterpret_cast<const char*>(pf) + pf_step, _MM_HINT_T1);
    const __m256i wa0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)),
                  wa1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 32)),
                  wb0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + stride));
    const __m256i* const wb1 = reinterpret_cast<const __m256i*>(b + stride + 32);  // a memory operand
    PYACCEL_QS_ROW(0) PYACCEL_QS_ROW(1) PYACCEL_QS_ROW(2) PYACCEL_QS_ROW(3)
  }
  if (groups % 2) {  // the last group: the 3-instruction step (not split)
    const int64_t off = (groups - 1) * kKGroup;
    _mm_prefetch(reinterpret_cast<const char*>(pf), _MM_HINT_T1);
    const __m256i wa0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)),
                  wa1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 32));
    PYACCEL_QS_LAST(0) PYACCEL_QS_LAST(1) PYACCEL_QS_LAST(2) PYACCEL_QS_LAST(3)
  }
  PYACCEL_QS_STORE(0) PYACCEL_QS_STORE(1) PYACCEL_QS_STORE(2) PYACCEL_QS_STORE(3)
}
#undef PYACCEL_QS_ROW
#undef PYACCEL_QS_LAST
#undef PYACCEL_QS_STORE

}  // namespace

void linear_qs_avx2(const Kernel& kern, const void* x, int64_t ldx, bool x_bf16, int64_t m, int64_t k,
                    const uint8_t* packed, const float* w_scale, const float* bias, void* y, int64_t ldy,
                    bool y_bf16, int nthreads) {
  split_linear::linear(kern.quantize, kern.a_zero, kern.qmax, x, ldx, x_bf16, m, k, packed, w_scale, bias, y, ldy, y_bf16,
                       nthreads,
                       [](const GemmArgs& g, const pair_safe::Residuals& res, int64_t m0, int64_t m1, int64_t p0,
                          int64_t p1) {
                         split_linear::gemm<4>(g, res, m0, m1, p0, p1,
                                                      [](const GemmArgs& g, int64_t m, auto h, const int8_t* sub,
                                                         int64_t n0, const int8_t* pf) { quad_tile<h()>(g, m, sub, n0, pf); });
                       });
}

}  // namespace int8_gemm
}  // namespace pyaccel
