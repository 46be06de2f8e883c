// Shared by the column kernels (AVX-512 and AVX2 files): the slab walk of the
// x transposition, an 8 x 8 fp32 transpose and the memory-operand FMA. Internal linkage: each ISA
// file compiles its own copy with its own flags.
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "common/transpose_avx2.h"
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
// (0 past k), and where its lines [k0..][0..16) start: out_at(slab, k0).
template <int KB, typename OutAt, typename Block>
inline void for_each_xt_block(int64_t m, int64_t k, int64_t kp, int64_t s0, int64_t s1, const OutAt& out_at,
                              const Block& block) {
  for (int64_t s = s0; s < s1; ++s) {
    const int64_t rows = m - s * 16 < 16 ? m - s * 16 : 16;
    for (int64_t k0 = 0; k0 < kp; k0 += KB) {
      const int64_t cols = k - k0 <= 0 ? 0 : (k - k0 < KB ? k - k0 : KB);
      block(s * 16, rows, cols, k0, out_at(s, k0));
    }
  }
}

// out_at for whole slabs (xt[slab][kp][16], slab_floats(kp) apart): where the
// lines of slab s start at input k0
struct SlabLines {
  float* xt;
  int64_t kp;
  float* operator()(int64_t s, int64_t k0) const { return xt + s * slab_floats(kp) + k0 * 16; }
};
// out_at for k-blocked xt (kXtKbGroups; slabs: the pass's, ceil(m / 16))
struct KBlockedLines {
  float* xt;
  int64_t slabs;
  float* operator()(int64_t s, int64_t k0) const {
    constexpr int64_t kInputs = kXtKbGroups * 4;
    return xt + (k0 / kInputs * slabs + s) * kXtKbSlabFloats + k0 % kInputs * 16;
  }
};

// The ISA files' x transposition: whole fp32 blocks (16 rows x KB inputs) go
// to full(x at the block's first element, ldx, out), the others (rows past m,
// inputs past k, bf16) to edge(x, ldx, x_bf16, row0, rows, cols, k0, out), kept
// out of line so that the loop over blocks inlines the whole-block path.
// KB divides 4 * kXtKbGroups: a block never straddles two k-blocks.
template <int KB, typename OutAt, typename Full, typename Edge>
inline void pack_xt_blocks(const void* x, int64_t ldx, bool x_bf16, int64_t m, int64_t k, int64_t kp,
                           int64_t s0, int64_t s1, const OutAt& out_at, const Full& full, const Edge& edge) {
  static_assert((4 * kXtKbGroups) % KB == 0, "blocks within k-blocks");
  const float* const xf = static_cast<const float*>(x);
  for_each_xt_block<KB>(m, k, kp, s0, s1, out_at, [&](int64_t row0, int64_t rows, int64_t cols, int64_t k0, float* out) {
    if (rows == 16 && cols == KB && !x_bf16)
      full(xf + row0 * ldx + k0, ldx, out);
    else
      edge(x, ldx, x_bf16, row0, rows, cols, k0, out);
  });
}
}  // namespace
}  // namespace sparse24
}  // namespace pyaccel
