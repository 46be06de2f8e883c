// The BSR int8 row kernels' activation words (qs8_bsr_gemm_avx512vnni.cpp,
// qs8_bsr_gemm_avx2.cpp): the 32-bit words of one row of quantized
// activations at the byte offsets of a channel's blocks, by scalar loads and
// inserts (vpgatherdd was those kernels' bound on Zen 5). Include only from
// sources compiled with SSE4.1 or later.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace pyaccel {
namespace block_sparse {

// Words 4h .. 4h + 3 of the blocks at byte offsets cols[0 .. left) into the
// row a; lanes at or past `left` repeat the last block's word (the callers'
// weights are zero there). Static: each includer compiles its own copy with
// its own ISA flags (an inline function's one definition would be shared).
static inline __m128i row_words_quarter(const int8_t* a, const int32_t* cols, int h, int left) {
  int32_t v[4];
  if (left >= 4 * h + 4) {  // every chunk but a channel's last
    for (int e = 0; e < 4; ++e) std::memcpy(&v[e], a + cols[4 * h + e], 4);
  } else {
    for (int e = 0; e < 4; ++e) std::memcpy(&v[e], a + cols[std::min(4 * h + e, left - 1)], 4);
  }
  return _mm_insert_epi32(_mm_insert_epi32(_mm_insert_epi32(_mm_cvtsi32_si128(v[0]), v[1], 1), v[2], 2), v[3], 3);
}

}  // namespace block_sparse
}  // namespace pyaccel
