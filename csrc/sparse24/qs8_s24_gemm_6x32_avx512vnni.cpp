// 2:4 int8 GEMM, AVX-512 VNNI: 6 rows x 32 channels (two panels), 8 inputs
// (2 groups) per step.
//
// Per step and channel, vpshufb gathers the 4 kept activations (of 8) into
// one dword, driven by a control dword built from the channel's position byte;
// one vpdpbusd then adds 4 products = 2 groups. Activations are uint8
// (q ^ 0x80); the epilogue subtracts comp = 128 * sum of the row's values.
#include <immintrin.h>

#include <cstring>

#include "int8_gemm/epilogue_avx512.h"
#include "sparse24/sparse24_int8.h"

namespace pyaccel {
namespace sparse24_int8 {
namespace {

static inline void dpbusd(__m512i& c, __m512i a_u8, __m512i b_s8) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(c) : "v"(a_u8), "v"(b_s8));  // see int8_gemm's VNNI kernel
}

// 16 position bytes -> 16 vpshufb control dwords [i0, i1, 4 + j0, 4 + j1]:
// two 16-entry lookups (vpermd) on the low and high nibble.
static inline __m512i control(const uint8_t* pos, __m512i lut_lo, __m512i lut_hi) {
  const __m512i t = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pos)));
  return _mm512_or_si512(_mm512_permutexvar_epi32(t, lut_lo),  // vpermd uses the low 4 bits
                         _mm512_permutexvar_epi32(_mm512_srli_epi32(t, 4), lut_hi));
}

static inline __m512i make_lut(int base) {
  alignas(64) int32_t v[16];
  for (int nib = 0; nib < 16; ++nib) v[nib] = ((base + (nib & 3)) | ((base + (nib >> 2)) << 8)) << (base ? 16 : 0);
  return _mm512_load_si512(v);
}

inline void store(const GemmArgs& ga, __m512i acc, const int32_t* comp, float sa, int64_t m, int64_t n0) {
  // reuse int8_gemm's epilogue: it reads w_scale/bias/y from an int8_gemm::GemmArgs
  int8_gemm::GemmArgs e{};
  e.w_scale = ga.w_scale;
  e.bias = ga.bias;
  e.c = ga.y;
  e.ldc = ga.ldy;
  e.c_bf16 = ga.y_bf16;
  e.n = ga.n;
  int8_gemm::avx512::store16(e, _mm512_sub_epi32(acc, _mm512_loadu_si512(comp)), sa, m, n0);
}

#define S24I8_ROW(r)                                                          \
  if constexpr (MR > r) {                                                     \
    int64_t a8;                                                               \
    std::memcpy(&a8, a##r + 8 * pb, 8);                                       \
    const __m512i ab = _mm512_set1_epi64(a8);                                 \
    dpbusd(c##r##0, _mm512_shuffle_epi8(ab, k0), v0);                         \
    dpbusd(c##r##1, _mm512_shuffle_epi8(ab, k1), v1);                         \
  }
#define S24I8_STORE(r)                                                        \
  if constexpr (MR > r) {                                                     \
    store(g, c##r##0, g.comp + n0, g.a_scale[m + r], m + r, n0);              \
    if (two) store(g, c##r##1, g.comp + n0 + kPanel, g.a_scale[m + r], m + r, n0 + kPanel); \
  }

template <int MR>
inline void tile(const GemmArgs& g, int64_t m, int64_t p, bool two) {
  __m512i c00 = _mm512_setzero_si512(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,
          c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  const uint8_t* a0 = g.a + m * g.lda;
  const uint8_t* a1 = MR > 1 ? a0 + g.lda : a0;
  const uint8_t* a2 = MR > 2 ? a0 + 2 * g.lda : a0;
  const uint8_t* a3 = MR > 3 ? a0 + 3 * g.lda : a0;
  const uint8_t* a4 = MR > 4 ? a0 + 4 * g.lda : a0;
  const uint8_t* a5 = MR > 5 ? a0 + 5 * g.lda : a0;
  const __m512i lut_lo = make_lut(0), lut_hi = make_lut(4);
  const uint8_t* b0 = g.w + p * g.pairs * kPairBytes;
  const uint8_t* b1 = two ? b0 + g.pairs * kPairBytes : b0;
  for (int64_t pb = 0; pb < g.pairs; ++pb, b0 += kPairBytes, b1 += kPairBytes) {
    const __m512i v0 = _mm512_loadu_si512(b0), v1 = _mm512_loadu_si512(b1);
    const __m512i k0 = control(b0 + kPanel * 4, lut_lo, lut_hi), k1 = control(b1 + kPanel * 4, lut_lo, lut_hi);
    S24I8_ROW(0) S24I8_ROW(1) S24I8_ROW(2) S24I8_ROW(3) S24I8_ROW(4) S24I8_ROW(5)
  }
  const int64_t n0 = p * kPanel;
  S24I8_STORE(0) S24I8_STORE(1) S24I8_STORE(2) S24I8_STORE(3) S24I8_STORE(4) S24I8_STORE(5)
}

}  // namespace

void qs8_s24_gemm_6x32_avx512vnni(const GemmArgs& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; p += 2) {
    const bool two = p + 1 < p1;
    int8_gemm::for_each_row_tile<6>(m0, m1, [&](int64_t m, auto h) { tile<h()>(g, m, p, two); });
  }
}

}  // namespace sparse24_int8
}  // namespace pyaccel
