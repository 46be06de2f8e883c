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

#include "block_sparse/block_sparse.h"

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

// The one-row kernels' loop: for each row m of x in [m0, m1) and block row r
// in [r0, r1), block_row(a, r, b0, b1, nch, out) pushes the sums of the block
// row's first nch channels (those below n; its blocks are [b0, b1)) into out,
// a Sums (the ISA's RowSums: {epilogue args, a_scale, m, first channel}),
// which hands them to the epilogue in channel order.
template <class Sums, class Fn>
inline void each_block_row(const GemmArgsI8& g, int64_t m0, int64_t m1, int64_t r0, int64_t r1, const Fn& block_row) {
  const int64_t c_first = r0 * g.bh, c_last = std::min<int64_t>(r1 * g.bh, g.n);
  const int8_gemm::GemmArgs e = epilogue_args(g, c_last);
  for (int64_t m = m0; m < m1; ++m) {
    Sums out{e, g.a_scale[m], m, c_first};
    for (int64_t r = r0; r < r1; ++r)
      block_row(g.a + m * g.lda, r, g.rowptr[r], g.rowptr[r + 1],
                static_cast<int>(std::min<int64_t>(g.bh, c_last - r * g.bh)), out);
    out.flush();
  }
}

}  // namespace block_sparse
}  // namespace pyaccel
