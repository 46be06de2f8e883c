// Shared by the column kernels (AVX-512 and AVX2 files): the slab walk of the
// x transposition, an 8 x 8 fp32 transpose and the memory-operand FMA. Internal linkage: each ISA
// file compiles its own copy with its own flags.
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "sparse24/sparse24.h"

namespace pyaccel {
namespace sparse24 {
namespace {

// acc += w * (the vector at p), always as vfmadd231ps with a memory operand:
// with intrinsics GCC picks the 132 form into the dying weight register and
// then moves accumulators between registers (same speed measured, less noise
// in the loop). V: __m512 or __m256.
template <typename V>
inline void fma231(V& acc, V w, const char* p) {
  asm("vfmadd231ps %[m], %[w], %[acc]" : [acc] "+v"(acc) : [w] "v"(w), [m] "m"(*reinterpret_cast<const V*>(p)));
}

// Walks slabs [s0, s1) of 16 rows in blocks of KB inputs: block(row0, rows,
// cols, k0, out) with the block's first row, its real rows (<= 16) and inputs
// (0 past k), and where its lines xt[slab][k0..][0..16) start.
template <int KB, typename Block>
inline void for_each_xt_block(int64_t m, int64_t k, int64_t kp, float* xt, int64_t s0, int64_t s1,
                              const Block& block) {
  for (int64_t s = s0; s < s1; ++s) {
    const int64_t rows = m - s * 16 < 16 ? m - s * 16 : 16;
    float* out = xt + s * slab_floats(kp);
    for (int64_t k0 = 0; k0 < kp; k0 += KB) {
      const int64_t cols = k - k0 <= 0 ? 0 : (k - k0 < KB ? k - k0 : KB);
      block(s * 16, rows, cols, k0, out + k0 * 16);
    }
  }
}

// rows r[0..8) -> columns, in place
inline void transpose8x8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

}  // namespace
}  // namespace sparse24
}  // namespace pyaccel
