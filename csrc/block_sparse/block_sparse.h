// Block-sparse (BSR) linear layer, fp32 values:
//
//   y[m, n] = sum over the kept blocks (r, c) of block row r = n / bh:
//             sum_{j < bw} x[m, c * bw + j] * B[n - r * bh][j]   + bias[n]
//
// Weights come in torch's BSR form (values [nnzb, bh, bw], int32 row pointers
// and block columns; pyaccel/formats/block_sparse.py) and are packed once into
// the "BSR_F32_T16" layout (see pack.cpp): each block transposed to
// [bw][bh_pad] with bh_pad = bh rounded up to 16, so that for every input j
// the block's output channels are one run of vectors. A kernel computes a
// tile of rows x (a chunk of) one block row's channels, looping over that
// row's blocks; x is read at each block's columns, in place.
#pragma once
#include <cstdint>

#include <algorithm>
#include <functional>
#include <string>
#include <type_traits>

#include "common/cpu_features.h"
#include "common/packed_header.h"
#include "common/parallel.h"
#include "int8_gemm/int8_gemm.h"

namespace pyaccel {
namespace block_sparse {

constexpr uint32_t kMagic = 0x46525342u;  // "BSRF"
constexpr int32_t kLayoutF32T16 = 1;      // bh > kSmallBlockRows: blocks transposed, channels padded to 16
constexpr int32_t kLayoutF32RowMajor = 2; // bh <= kSmallBlockRows: blocks as they are, [bh][bw]
constexpr int kChannelPad = 16;  // bh is padded to this many channels in layout 1
// Blocks of at most this many rows (1 x 4, 4 x 4, 8 x 8, ...) would waste most of
// a 16-channel tile: they keep their row-major layout and get their own kernels,
// a row kernel (dot products along the block's inputs) below kSlabRowsFrom rows
// of x, and from there a slab kernel that vectorizes over 16 rows of x
// (x transposed into 16-row slabs) and broadcasts each weight.
constexpr int kSmallBlockRows = 8;
constexpr int64_t kSlabRowsFrom = 2;
inline int32_t layout_for(int bh) { return bh <= kSmallBlockRows ? kLayoutF32RowMajor : kLayoutF32T16; }

// 64-byte header; then int32 rowptr[nbr + 1] and int32 colk[nnzb] (each
// block's first input, c * bw), then the blocks (64-byte aligned).
struct PackedHeader {
  uint32_t magic;
  int32_t layout;
  int64_t n, k;
  int64_t n_pad;        // n rounded up to bh
  int32_t bh, bw;       // block shape
  int32_t bh_pad;       // bh rounded up to kChannelPad
  int32_t nbr;          // block rows, n_pad / bh
  int64_t nnzb;         // kept blocks
  int64_t data_offset;  // fp32 blocks [nnzb][bw][bh_pad]
};
static_assert(sizeof(PackedHeader) == 64, "header must stay 64 bytes");

int64_t packed_nbytes(int64_t n, int64_t k, int bh, int bw, int64_t nnzb);

// Band lists (fp32 blocks of <= kSmallBlockRows rows with bw % 4 == 0;
// packed after the blocks, 64-byte aligned): the kept
// weights as entries of one channel x 4 inputs (a 1 x 4 block is one entry,
// a bh x bw block bh x bw / 4), listed per band of band_rows_for(bh)
// channels (whole block rows) and per group g of 4 inputs (4g .. 4g + 3):
//   int32 goff[nbands][ngroups + 1]  entries of (band, g): [goff[band][g], goff[band][g + 1])
//   uint16 row[nentries]             channel - band * band_rows_for(bh)
//   fp32 w[nentries][4]              zero past n and k
// The scatter kernels walk a band group by group: the group's slab lines of
// x stay in registers while every entry of the group adds into its channel's
// partial sums (kept in L1/L2 for the band), so each slab line is read once
// per band instead of once per block.
// ~256 channels: a band's partial sums (256 x 4 slabs x 64 B at most) sit in L2.
// The kernels trust nothing in the lists beyond the header: they clamp each
// group's entry range to [0, nentries) and read a row as row & (kBandChannels
// - 1) into partial sums of kBandChannels rows, so a corrupted packing gives
// wrong numbers, never a read or write out of bounds.
constexpr int64_t kBandChannels = 256;
static_assert((kBandChannels & (kBandChannels - 1)) == 0, "row masks need a power of 2");
inline int64_t band_rows_for(int bh) { return kBandChannels / bh * bh; }
struct BandLists {
  const int32_t* goff;
  const uint16_t* row;
  const void* w;  // const float [nentries][4]
  int64_t nbands, ngroups, band_rows, nentries;
  struct Sizes {
    int64_t nbands, ngroups, nentries, goff_offset, row_offset, w_offset, total;  // total 0: no lists
  };
  // n_pad: channels padded to bh; entry_bytes: 16 (fp32)
  static Sizes sizes(int64_t n_pad, int64_t k, int bh, int bw, int64_t nnzb, int entry_bytes);
  static BandLists at(const uint8_t* lists, const Sizes& z, int bh);  // lists: where the packing keeps them
  static BandLists at(const uint8_t* packed);  // fp32 packing; goff null when it has none
};
// Writes the lists of a packing (z from sizes()) at `lists` (zeroed first):
// put(w, entry, r, b, i, q) stores the weights of channel i of block b (block
// row r), inputs colk[b] + 4q .. + 3, as entry `entry` of the w array.
void write_band_lists(const int32_t* crow, const int32_t* colk, int64_t nbr, int bh, int bw,
                      const BandLists::Sizes& z, uint8_t* lists,
                      const std::function<void(uint8_t* w, int64_t entry, int64_t r, int64_t b, int i, int64_t q)>& put);

// Both packings start alike: the header, then rowptr (= crow) and colk
// (= col * bw) right after it. Writes them into out; returns colk.
int32_t* write_header_and_indices(uint8_t* out, uint32_t magic, int32_t layout, int64_t n, int64_t k, int bh, int bw,
                                  int64_t bh_pad, int64_t nbr, int64_t nnzb, int64_t data_offset,
                                  const int32_t* crow, const int32_t* col);
// values: fp32 [nnzb, bh, bw] (contiguous); crow: int32 [nbr + 1]; col: int32
// [nnzb]; already validated (pyaccel.formats.block_sparse.canonical_error).
void pack(const float* values, const int32_t* crow, const int32_t* col, int64_t n, int64_t k, int bh, int bw,
          int64_t nnzb, uint8_t* out);
// nullptr if buf is a valid packing of an [n, k] weight, else what is wrong.
const char* check_packed(const uint8_t* buf, int64_t nbytes, int64_t n, int64_t k);

// What a packing of a given weight must hold: its format and what the layout
// implies for the weight's shape, block shape and kept blocks.
struct PackingFormat {
  uint32_t magic;
  int32_t layout;
  int64_t bh_pad, data_offset, total;
};
// "" when buf (nbytes) is a packing in format f of the [n, k] weight of nnzb
// kept bh x bw blocks whose pattern is crow [nbr + 1] / col [nnzb] (canonical
// BSR, int32), else what differs: "expected ..., the buffer holds ...".
// Reads the header, then compares the packing's row pointers with crow and its
// column entries (col * bw) with col: O(nbr + nnzb). The values are not
// compared: a packing of another weight with the same pattern passes.
std::string packing_error_for(const uint8_t* buf, int64_t nbytes, int64_t n, int64_t k, int bh, int bw,
                              int64_t nnzb, const int32_t* crow, const int32_t* col, const PackingFormat& f);
// packing_error_for with the fp32 format (pack) / the int8 format (pack_int8).
std::string packing_error(const uint8_t* buf, int64_t nbytes, int64_t n, int64_t k, int bh, int bw, int64_t nnzb,
                          const int32_t* crow, const int32_t* col);
std::string packing_error_int8(const uint8_t* buf, int64_t nbytes, int64_t n, int64_t k, int bh, int bw,
                               int64_t nnzb, const int32_t* crow, const int32_t* col);

struct GemmArgs {
  const float* x;  // [m, >= k] fp32, row stride ldx
  int64_t ldx;
  const int32_t* rowptr;
  const int32_t* colk;
  const float* blocks;
  int64_t k, n;
  int bh, bw, bh_pad;
  const float* bias;  // [n] or null
  void* y;            // [m, n] fp32 or bf16, row stride ldy
  int64_t ldy;
  bool y_bf16;
  BandLists lists{};  // goff null: the packing has none
};

// Rows [m0, m1) x block rows [r0, r1).
using GemmFn = void (*)(const GemmArgs& g, int64_t m0, int64_t m1, int64_t r0, int64_t r1);
// Small blocks, many rows: slabs [s0, s1) of xt ([k][nslabs][sw] fp32: x
// transposed in slabs of sw rows, input-major so that one input's slab lines
// are contiguous; rows past m zero) x block rows [r0, r1); rows of y past m
// unwritten. sw: 16, or 8 where Kernel::narrow_slabs says so.
using SlabFn = void (*)(const GemmArgs& g, const float* xt, int64_t nslabs, int64_t m, int64_t s0, int64_t s1,
                        int64_t r0, int64_t r1, int sw);

// Band lists (g.lists), many rows: xt as for SlabFn but with
// round_up(k, bw) lines (lines past k zero) x bands [b0, b1).
using ScatterFn = void (*)(const GemmArgs& g, const float* xt, int64_t nslabs, int64_t m, int64_t s0, int64_t s1,
                           int64_t b0, int64_t b1, int sw);

// xt for the slab kernels: slabs [s0, s1) of sw rows of x ([m, k] fp32 or
// bf16, row stride ldx), rows past m zero.
using PackSlabsFn = void (*)(const void* x, int64_t ldx, bool x_bf16, int64_t m, int64_t k, float* xt,
                             int64_t nslabs, int64_t s0, int64_t s1, int sw);

struct Kernel {
  Isa isa;
  const char* name;
  int mr;  // rows per micro-tile for 32-channel chunks
  GemmFn gemm;
  GemmFn small_rows;   // layout 2, fewer than kSlabRowsFrom rows
  SlabFn small_slabs;  // layout 2, from kSlabRowsFrom rows
  PackSlabsFn pack_slabs;
  bool narrow_slabs;  // slabs of 8 rows for batches of <= 8 rows (else always 16)
  ScatterFn scatter;  // null: the slab kernel serves packings with band lists too
  int scatter_sw;     // slab rows the scatter kernel takes: 16 (8 for <= 8 rows) or always 8
};
const Kernel& select_kernel();

void linear(const void* x, int64_t ldx, bool x_bf16, int64_t m, int64_t k, const uint8_t* packed,
            const float* bias, void* y, int64_t ldy, bool y_bf16, int nthreads);

// ---- int8 values ("BSR_I8_K4") ---------------------------------------------------
// Blocks int8 in [-127, 127] with fp32 scales per output channel; activations
// quantized per row as for int8_gemm (same quantizers, same rule), int32
// accumulation, the same dequantization epilogue. Each block is packed as
// [bw4 / 4][bh_pad][4] (bw4 = bw rounded up to 4: one 32-bit lane per
// channel and 4 inputs, vpdpbusd's layout), entries past k or n zeroed; after
// the indices, comp int32 [nbr][bh_pad] = 128 * (sum of the row's kept weights)
// for kernels that take uint8 activations. The quantized activations of a row
// are read at colk + 4 g for g < bw4 / 4: their scratch has kpad_a columns.
constexpr uint32_t kMagicI8 = 0x38525342u;  // "BSR8"
constexpr int32_t kLayoutI8K4 = 1;

int64_t packed_nbytes_int8(int64_t n, int64_t k, int bh, int bw, int64_t nnzb);
// Small blocks with bw % 4 == 0 also keep their values compact (pack_int8.cpp):
// below kCompactSlabRowsFrom rows of x a row kernel reads them, from there
// the slab kernel.
constexpr int64_t kCompactSlabRowsFrom = 2;
inline bool has_compact_int8(int bh, int bw) { return bh <= kSmallBlockRows && bw % 4 == 0; }
const int32_t* compact_int8(const uint8_t* packed);  // null when the packing has none
void pack_int8(const int8_t* values, const int32_t* crow, const int32_t* col, int64_t n, int64_t k, int bh, int bw,
               int64_t nnzb, uint8_t* out);
const char* check_packed_int8(const uint8_t* buf, int64_t nbytes, int64_t n, int64_t k);
// Columns of the quantized-activation scratch the int8 kernels read.
inline int64_t kpad_a(int64_t k, int bw) { return round_up((k + bw - 1) / bw * bw, 4) + 4; }

struct GemmArgsI8 {
  const int8_t* a;  // quantized activations [m, kpad_a], row stride lda
  int64_t lda;
  const float* a_scale;  // [m]
  const int32_t* rowptr;
  const int32_t* colk;
  const int32_t* comp;  // [nbr][bh_pad]
  const int8_t* blocks;
  int64_t n;
  int bh, bw4, bh_pad;
  const float* w_scale;  // [n]
  const float* bias;     // [n] or null
  void* y;
  int64_t ldy;
  bool y_bf16;
  const int32_t* w4 = nullptr;  // compact blocks (one word: 4 inputs of a channel) or null
  bool colk4 = false;           // every colk is a multiple of 4 (block width % 4 == 0)
};
using GemmI8Fn = void (*)(const GemmArgsI8& g, int64_t m0, int64_t m1, int64_t r0, int64_t r1);
// int8_gemm's epilogues read scales, bias and y from its own argument struct
// (channels past n not written).
inline int8_gemm::GemmArgs epilogue_args(const GemmArgsI8& g, int64_t n) {
  return int8_gemm::epilogue_args_from(g, n);
}

// Compact small blocks (g.w4), from 2 rows: xg = the quantized activations
// regrouped into slabs of sw rows, slab-major: slab s at xg + s * sst, then
// [group g][sw] int32 (lane: inputs 4g .. 4g + 3 of a row), so a block's
// lines sit at colk / 4 * sw from the slab start; x block rows [r0, r1).
using SlabsI8Fn = void (*)(const GemmArgsI8& g, const int32_t* xg, int64_t sst, int64_t m, int64_t s0,
                           int64_t s1, int64_t r0, int64_t r1, int sw);
// xg slabs [s0, s1) of sw rows from quantized activations q [m, >= 4 ngroups] (row stride lda)
using PackGroupsFn = void (*)(const int8_t* q, int64_t lda, int64_t m, int64_t ngroups, int32_t* xg,
                              int64_t sst, int64_t s0, int64_t s1, int sw);
// int32 between slabs: ngroups lines and 64 bytes, so that the lines one
// block reads from consecutive slabs are not 4 KiB apart
inline int64_t xg_slab_stride(int64_t ngroups, int sw) { return round_up(ngroups * sw, 16) + 16; }

struct KernelI8 {
  Isa isa;
  const char* name;
  int mr;
  uint8_t a_xor;  // 0x80: the kernel takes uint8 activations (comp subtracted)
  GemmI8Fn gemm;
  SlabsI8Fn slabs = nullptr;  // null: gemm serves small blocks too
  GemmI8Fn rows = nullptr;    // compact small blocks, fewer than kCompactSlabRowsFrom rows (null: gemm)
  PackGroupsFn pack_groups = nullptr;
  int slab_rows = 0;  // rows of an xg slab
  bool narrow_slabs = false;  // 8-row slabs for batches of <= 8 rows
};
const KernelI8& select_kernel_int8();

void linear_int8(const void* x, int64_t ldx, bool x_bf16, int64_t m, int64_t k, const uint8_t* packed,
                 const float* w_scale, const float* bias, void* y, int64_t ldy, bool y_bf16, int nthreads);

void qs8_bsr_gemm_scalar(const GemmArgsI8&, int64_t, int64_t, int64_t, int64_t);
void qs8_bsr_gemm_avx2(const GemmArgsI8&, int64_t, int64_t, int64_t, int64_t);
void qs8_bsr_slabs_avx2(const GemmArgsI8&, const int32_t*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int);
void qs8_bsr_rows_avx2(const GemmArgsI8&, int64_t, int64_t, int64_t, int64_t);
// AVX-VNNI level (qs8_bsr_gemm_avx2.cpp): the VEX builds where the CPU has
// AVX-VNNI, else their EVEX twins (exported for the encoding test).
void qs8_bsr_gemm_avxvnni(const GemmArgsI8&, int64_t, int64_t, int64_t, int64_t);
void qs8_bsr_slabs_avxvnni(const GemmArgsI8&, const int32_t*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int);
void qs8_bsr_rows_avxvnni(const GemmArgsI8&, int64_t, int64_t, int64_t, int64_t);
void qs8_bsr_gemm_avxvnni_vex(const GemmArgsI8&, int64_t, int64_t, int64_t, int64_t);
void qs8_bsr_gemm_avxvnni_evex(const GemmArgsI8&, int64_t, int64_t, int64_t, int64_t);
void qs8_bsr_slabs_avxvnni_vex(const GemmArgsI8&, const int32_t*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                               int);
void qs8_bsr_slabs_avxvnni_evex(const GemmArgsI8&, const int32_t*, int64_t, int64_t, int64_t, int64_t, int64_t,
                                int64_t, int);
void qs8_bsr_rows_avxvnni_vex(const GemmArgsI8&, int64_t, int64_t, int64_t, int64_t);
void qs8_bsr_rows_avxvnni_evex(const GemmArgsI8&, int64_t, int64_t, int64_t, int64_t);
void qs8_bsr_pack_groups_avx2(const int8_t*, int64_t, int64_t, int64_t, int32_t*, int64_t, int64_t, int64_t, int);
void qs8_bsr_gemm_avx512vnni(const GemmArgsI8&, int64_t, int64_t, int64_t, int64_t);
void qs8_bsr_slabs_avx512vnni(const GemmArgsI8&, const int32_t*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int);
void qs8_bsr_rows_avx512vnni(const GemmArgsI8&, int64_t, int64_t, int64_t, int64_t);
void qs8_bsr_pack_groups_avx512(const int8_t*, int64_t, int64_t, int64_t, int32_t*, int64_t, int64_t, int64_t, int);

void bsr_gemm_scalar(const GemmArgs&, int64_t, int64_t, int64_t, int64_t);
void bsr_gemm_avx2(const GemmArgs&, int64_t, int64_t, int64_t, int64_t);
void bsr_gemm_avx512(const GemmArgs&, int64_t, int64_t, int64_t, int64_t);
void bsr_small_rows_scalar(const GemmArgs&, int64_t, int64_t, int64_t, int64_t);
void bsr_small_slabs_scalar(const GemmArgs&, const float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int);
void bsr_small_rows_avx2(const GemmArgs&, int64_t, int64_t, int64_t, int64_t);
void bsr_small_slabs_avx2(const GemmArgs&, const float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int);
void bsr_small_rows_avx512(const GemmArgs&, int64_t, int64_t, int64_t, int64_t);
void bsr_small_slabs_avx512(const GemmArgs&, const float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int);
void bsr_scatter_avx512(const GemmArgs&, const float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int);
void bsr_scatter_avx2(const GemmArgs&, const float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int);
void bsr_pack_slabs_scalar(const void*, int64_t, bool, int64_t, int64_t, float*, int64_t, int64_t, int64_t, int);
void bsr_pack_slabs_avx2(const void*, int64_t, bool, int64_t, int64_t, float*, int64_t, int64_t, int64_t, int);
void bsr_pack_slabs_avx512(const void*, int64_t, bool, int64_t, int64_t, float*, int64_t, int64_t, int64_t, int);

// fn(s, std::integral_constant<int, S>) over [s0, s1) in runs of S = MAX, ...,
// 2, 1 slabs (MAX a power of 2 up to 8).
template <int MAX, typename Fn>
inline void for_each_slab_run(int64_t s0, int64_t s1, const Fn& fn) {
  int64_t s = s0;
  for (; s + MAX <= s1; s += MAX) fn(s, std::integral_constant<int, MAX>{});
  if constexpr (MAX > 4) {
    if (s + 4 <= s1) { fn(s, std::integral_constant<int, 4>{}); s += 4; }
  }
  if constexpr (MAX > 2) {
    if (s + 2 <= s1) { fn(s, std::integral_constant<int, 2>{}); s += 2; }
  }
  if constexpr (MAX > 1) {
    for (; s < s1; ++s) fn(s, std::integral_constant<int, 1>{});
  }
}

// The thread split both drivers use: fn(r0, r1) on the threads, over block-row
// ranges of about equal numbers of kept blocks (rowptr [nbr + 1]).
template <typename Fn>
void split_by_blocks(const int32_t* rowptr, int64_t nbr, int64_t nnzb, int nthreads, const Fn& fn) {
  const int64_t nt = nthreads < 1 ? 1 : nthreads;
  auto row_at = [&](int64_t target) { return std::lower_bound(rowptr, rowptr + nbr + 1, target) - rowptr; };
  parallel_for(nt, 1, nthreads, [&](int64_t t0, int64_t t1) {
    const int64_t r0 = t0 == 0 ? 0 : row_at(nnzb * t0 / nt);
    const int64_t r1 = t1 == nt ? nbr : row_at(nnzb * t1 / nt);
    if (r0 < r1) fn(r0, r1);
  });
}

// y[m, n] for channel n of a tile: bias added, stored as fp32 or bf16.
void store_scalar(const GemmArgs& g, int64_t m, int64_t n, float v);

}  // namespace block_sparse
}  // namespace pyaccel
