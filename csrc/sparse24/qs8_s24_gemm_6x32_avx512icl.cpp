// 2:4 int8 GEMM, AVX-512 ICL level (VNNI + VBMI): one vpmultishiftqb picks
// the four 2-bit fields of pair j's position byte into the four bytes of each
// channel's dword, one vpternlogd keeps their low 2 bits and adds 4 to the
// second group's two -- 2 ops per control vector instead of 4 (+ a shift) with
// the vpermd lookups. Body: qs8_s24_gemm_6x32_avx512.h.
#include "sparse24/qs8_s24_gemm_6x32_avx512.h"

namespace pyaccel {
namespace sparse24_int8 {
namespace {

struct MultishiftControl {
  __m512i sel[kQuadPairs], low2, plus4;
  MultishiftControl() {
    for (int j = 0; j < kQuadPairs; ++j) {
      // byte b of each qword <- 8 bits of the qword from bit offset: channel 2i (low dword) fields
      // at 8j + {0, 2, 4, 6}; channel 2i+1 (high dword) the same + 32
      uint64_t s = 0;
      for (int b = 0; b < 8; ++b) s |= static_cast<uint64_t>(8 * j + 2 * (b % 4) + 32 * (b / 4)) << (8 * b);
      sel[j] = _mm512_set1_epi64(static_cast<long long>(s));
    }
    low2 = _mm512_set1_epi32(0x03030303);
    plus4 = _mm512_set1_epi32(0x04040000);
  }
  template <int J>
  __m512i pair(__m512i pos) const {  // (fields & 3) | (4 for the second group), imm (A & B) | C = 0xEA
    return _mm512_ternarylogic_epi32(_mm512_multishift_epi64_epi8(sel[J], pos), low2, plus4, 0xEA);
  }
};

}  // namespace

void qs8_s24_gemm_6x32_avx512icl(const GemmArgs& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  gemm_6x32<MultishiftControl>(g, m0, m1, p0, p1);
}

}  // namespace sparse24_int8
}  // namespace pyaccel
