// 2:4 int8 GEMM, AVX-512 VNNI (Cascade Lake level): the control dwords come
// from two 16-entry vpermd lookups on the low and high nibble of the pair's
// position byte. Body: qs8_s24_gemm_6x32_avx512.h.
#include "sparse24/qs8_s24_gemm_6x32_avx512.h"

namespace pyaccel {
namespace sparse24_int8 {
namespace {

struct LutControl {
  __m512i lo, hi;
  LutControl() : lo(make(0)), hi(make(4)) {}
  static __m512i make(int base) {
    alignas(64) int32_t v[16];
    for (int nib = 0; nib < 16; ++nib)
      v[nib] = ((base + (nib & 3)) | ((base + (nib >> 2)) << 8)) << (base ? 16 : 0);
    return _mm512_load_si512(v);
  }
  template <int J>
  __m512i pair(__m512i pos) const {  // vpermd reads the low 4 bits of each index dword
    const __m512i l = J ? _mm512_srli_epi32(pos, 8 * J) : pos;
    return _mm512_or_si512(_mm512_permutexvar_epi32(l, lo),
                           _mm512_permutexvar_epi32(_mm512_srli_epi32(pos, 8 * J + 4), hi));
  }
};

}  // namespace

void qs8_s24_gemm_6x32_avx512vnni(const GemmArgs& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  gemm_6x32<LutControl>(g, m0, m1, p0, p1);
}

}  // namespace sparse24_int8
}  // namespace pyaccel
