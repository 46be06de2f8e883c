// 2:4 semi-structured sparse linear with fp32 values:
//
//   y[m, n] = sum_g ( x[m, 4g + i0] * v0[n, g] + x[m, 4g + i1] * v1[n, g] ) + bias[n]
//
// x: fp32 or bf16 activations; values fp32; positions i0 < i1 in 0..3 per
// group of 4 input features. Half the multiply-adds of dense and about half
// the weight bytes (8 value bytes + 1 position byte per group of 4, vs 16).
#pragma once
#include <cstdint>

#include "common/cpu_features.h"

namespace pyaccel {
namespace sparse24 {

// ---- packed layout "S24F32_P16B4" -----------------------------------------
// Panels of 16 output channels; inside a panel, groups in blocks of 4:
//   pos[4 groups][16 ch] uint8 | then per group j: v0[16 ch] fp32 | v1[16 ch] fp32
// = 576 bytes (9 cache lines) per block, in the order the row kernels read
// them: a panel is read in address order, which the hardware prefetchers
// follow (layout 2 -- v0[4][16] | v1[4][16] | pos -- jumped back and forth
// inside each block and streamed 20 - 25 % slower on one core). Position byte = i0 | i1 << 2 | i1 << 4
// | i0 << 6, serving the kernels directly: vpermilps picks x[4g + i0] by the
// low 2 bits from 4 x values repeated in each lane, and again by byte >> 2 for
// i1; the column kernel takes the offsets 64 * i0 = byte & 0xC0 and 64 * i1 =
// 4 * (byte & 0x30). n pads to 16, groups to 4 (zeros).
constexpr int kPanel = 16;
constexpr int kBlockGroups = 4;
constexpr int64_t kBlockBytes = kBlockGroups * kPanel * (4 + 4 + 1);
// byte offsets in a block: group j's position bytes, v0 and v1 values (+ the
// channel's lane, times 4 for the values)
constexpr int64_t kBlockPosBytes = kBlockGroups * kPanel;
constexpr int64_t pos_at(int j) { return j * kPanel; }
constexpr int64_t v0_at(int j) { return kBlockPosBytes + 2 * j * kPanel * 4; }
constexpr int64_t v1_at(int j) { return v0_at(j) + kPanel * 4; }
constexpr uint32_t kMagic = 0x34325350u;  // "PS24"
constexpr int32_t kLayoutF32P16B4 = 3;  // 2: positions after the values; 1: byte i0 | i1 << 2 only

struct PackedHeader {
  uint32_t magic;
  int32_t layout;
  int64_t n, k;
  int64_t n_pad, groups_pad;  // n to 16, ceil(k/4) to 4
  int64_t data_offset;
  int64_t reserved[2];
};
static_assert(sizeof(PackedHeader) == 64, "header must stay 64 bytes");

int64_t packed_nbytes(int64_t n, int64_t k);
// values: fp32 [n, 2*ceil(k/4)] (row stride ldv); pos: uint8 [n, ceil(k/4)]
// (row stride ldp), one byte per group = i0 | i1 << 2.
void pack(const float* values, int64_t ldv, const uint8_t* pos, int64_t ldp, int64_t n,
          int64_t k, uint8_t* out);
const char* check_packed(const uint8_t* buf, int64_t nbytes, int64_t n, int64_t k);

// ---- kernels --------------------------------------------------------------
struct GemmArgs {
  const float* x;  // [m, >= 4*groups_pad] fp32, row stride ldx, zero past k
  int64_t ldx;
  const uint8_t* w;  // packed blocks (after the header)
  const float* bias;  // [n] or nullptr
  void* y;  // [m, n] fp32 or bf16, row stride ldy
  int64_t ldy;
  bool y_bf16;
  int64_t m, n, groups_pad;
};
// rows [m0, m1) x panels [p0, p1)
using GemmFn = void (*)(const GemmArgs&, int64_t m0, int64_t m1, int64_t p0, int64_t p1);

// Many rows: x transposed into slabs of 16 rows, xt[slab][kp][16] fp32 (zero
// past m and k, 64-byte aligned; or k-blocked, see kXtKbGroups, where the rest
// of the last k-block stays unwritten and unread); tiles of 8 channels x up to
// 48 rows.
// Slabs start slab_floats(kp) apart: kp * 16 plus 1 KB, so that the lines one
// nonzero reads from consecutive slabs are not 4 KB apart (Zen 4 ran such
// loads 5 - 25 % slower in a synthetic test).
inline int64_t slab_floats(int64_t kp) { return kp * 16 + 256; }
struct ColsArgs {
  const float* xt;
  int64_t kp;  // 4 * groups_pad
  const uint8_t* w;  // packed blocks (after the header)
  const float* bias;
  void* y;
  int64_t ldy;
  bool y_bf16;
  int64_t m, n, groups_pad;
  int64_t kc_groups;  // groups per k-block (a multiple of kBlockGroups)
  int64_t xt_kb_floats = 0;  // k-blocked xt (Kernel::xt_kblocked): floats between k-blocks; else 0
};
// channel tiles [t0, t1) (cols_nr channels each) x all rows; `part`: scratch
// of cols_part(m, t1 - t0) floats (64-byte aligned; the 2 x 48 AVX2 tile keeps
// its sums there even when kc_groups == groups_pad)
using ColsFn = void (*)(const ColsArgs&, int64_t t0, int64_t t1, float* part);
using ColsPartFn = int64_t (*)(int64_t m, int64_t tiles);
// slabs [s0, s1) of xt from x ([m, k] fp32 or bf16, row stride ldx): slab s at
// xt + s * slab_floats(kp), or k-blocked (Kernel::xt_kblocked, below)
using PackXtFn = void (*)(const void* x, int64_t ldx, bool x_bf16, int64_t m, int64_t k, int64_t kp,
                          float* xt, int64_t s0, int64_t s1);
// AVX-512: row tiles of up to 3 slabs x 8 channels; AVX2: 16 floats a row slab and channel
// (the 4 x 24 tile keeps 32 a half slab and 4 channels, the 2 x 48 tile 2 channels x rows padded to 8)
inline int64_t cols_part_avx512(int64_t m, int64_t tiles) { return ((m + 15) / 16 + 2) / 3 * tiles * 8 * 3 * 16; }
inline int64_t cols_part_avx2(int64_t m, int64_t tiles) { return (m + 15) / 16 * tiles * 4 * 16; }

struct Kernel {
  Isa isa;
  const char* name;
  int mr;
  GemmFn gemm;
  ColsFn cols;  // nullptr: the row-tile kernel serves every m
  PackXtFn pack_xt;
  ColsPartFn cols_part;
  int cols_nr;  // channels per column-kernel tile
  int cols_from_rows;
  const char* cols_name;
  int row_path_rows = 0;  // calls of up to this many rows take the kernel's row path (0: none)
  // the column kernel's k-blocks: at most this many groups (0: kColsWholeKGroups whole,
  // else blocks of about kColsKBlockGroups; see cols_kc_groups)
  int cols_kc_max = 0;
  // -1: any core; else the core family (a Tuning value) this entry is tuned for:
  // an entry of another family is skipped (see cpu_tuning())
  int tuning = -1;
  // x transposed k-blocked (pack_xt and cols; see kXtKbGroups) instead of whole slabs
  bool xt_kblocked = false;
};

// The AVX2 row kernel's row path (whole 16-channel panel per row) serves
// calls of up to this many rows.
constexpr int64_t kAvx2RowPathRows = 2;
// The AVX-512 column kernel takes all of K in one block up to this many
// 4-input groups, and blocks of about kColsKBlockGroups beyond.
constexpr int64_t kColsWholeKGroups = 512;
constexpr int64_t kColsKBlockGroups = 128;

// K-blocked xt (the AVX2 2 x 48 column kernel): K in k-blocks of kXtKbGroups
// groups, xt[k-block][slab][kXtKbGroups * 4 inputs][16 rows] fp32; within a
// k-block the slabs lie kXtKbSlabFloats apart, a compile-time stride, so that
// the FMAs of one kept weight address every slab of a row tile as [one
// pointer + displacement]; k-blocks lie (slabs of the pass) x kXtKbSlabFloats
// apart (ColsArgs::xt_kb_floats), the last one's storage whole. The column
// kernel's k-blocks are these (cols_kc_groups). The 64 floats past each slab
// keep one input's lines in consecutive slabs off the same L1 set (8 KiB apart).
constexpr int64_t kXtKbGroups = 32;
constexpr int64_t kXtKbSlabFloats = kXtKbGroups * 4 * 16 + 64;
inline int64_t xt_kblocks(int64_t kp) { return (kp / 4 + kXtKbGroups - 1) / kXtKbGroups; }
// floats from one slab of xt to the next (a pass's first slab to a chunk's)
inline int64_t xt_slab_stride(const Kernel& kern, int64_t kp) {
  return kern.xt_kblocked ? kXtKbSlabFloats : slab_floats(kp);
}
// floats of xt for `slabs` slabs of 16 rows
inline int64_t xt_floats(const Kernel& kern, int64_t slabs, int64_t kp) {
  return kern.xt_kblocked ? xt_kblocks(kp) * slabs * kXtKbSlabFloats : slabs * slab_floats(kp);
}
// ColsArgs::xt_kb_floats for a pass of `slabs` slabs
inline int64_t xt_kb_floats(const Kernel& kern, int64_t slabs) { return kern.xt_kblocked ? slabs * kXtKbSlabFloats : 0; }
// bytes of xt per row, for sizing row passes
inline int64_t xt_row_bytes(const Kernel& kern, int64_t kp) {
  return kern.xt_kblocked ? xt_kblocks(kp) * kXtKbSlabFloats * 4 / 16 : kp * 4;
}
const Kernel& select_kernel();

void linear(const void* x, int64_t ldx, bool x_bf16, int64_t m, int64_t k, const uint8_t* packed,
            const float* bias, void* y, int64_t ldy, bool y_bf16, int nthreads);

void s24_gemm_1x16_scalar(const GemmArgs&, int64_t, int64_t, int64_t, int64_t);
void s24_gemm_4x8_avx2(const GemmArgs&, int64_t, int64_t, int64_t, int64_t);
void s24_gemm_4x32_avx512(const GemmArgs&, int64_t, int64_t, int64_t, int64_t);
void s24_gemm_cols_avx512(const ColsArgs&, int64_t, int64_t, float*);
void s24_pack_xt_avx512(const void*, int64_t, bool, int64_t, int64_t, int64_t, float*, int64_t, int64_t);
void s24_gemm_cols_4x24_avx2(const ColsArgs&, int64_t, int64_t, float*);
void s24_gemm_cols_2x48_avx2(const ColsArgs&, int64_t, int64_t, float*);
void s24_pack_xt_avx2(const void*, int64_t, bool, int64_t, int64_t, int64_t, float*, int64_t, int64_t);
void s24_pack_xt_kb_avx2(const void*, int64_t, bool, int64_t, int64_t, int64_t, float*, int64_t, int64_t);

}  // namespace sparse24
}  // namespace pyaccel
