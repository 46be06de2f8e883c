// 2:4 sparse + int8: int8 values (symmetric per output channel) and 2-bit
// positions, activations quantized per row at run time (as in int8_gemm):
//
//   y[m, n] = float(sum_g q[m, 4g+i0] * v0[n, g] + q[m, 4g+i1] * v1[n, g]) * sx[m] * sw[n] + bias[n]
//
// Weight bytes per group of 4 inputs: 2 values + half a position byte (2.5 vs
// 4 for dense int8).
#pragma once
#include <cstdint>

#include "common/cpu_features.h"
#include "int8_gemm/int8_gemm.h"  // the epilogues' argument struct

namespace pyaccel {
namespace sparse24_int8 {

// ---- packed layout "S24I8_P32Q4" ------------------------------------------
// Panels of 32 channels; inside a panel, quads of group pairs (32 inputs):
//   pos[32 ch] uint32                (byte j = pair j's positions: nibble g | nibble g+1 << 4,
//                                     nibble = i0 | i1 << 2)
//   vals[4 pairs][32 ch][4] int8     (per pair j and channel: v0 g, v1 g, v0 g+1, v1 g+1
//                                     with g = 8 * quad + 2 * j)              = 640 bytes.
// A panel is one sequential stream (what the hardware prefetchers follow at
// M = 1, where the kernels are bound by these bytes), read in address order:
// the positions come first because the kernels load them first. Layout 3 had
// them after the values; the kernels then jumped back 512 bytes at every
// quad, and streamed weights ran 16 - 22 % slower (18 vs 22 GB/s on one
// core, interleaved A/B; 4 % slower from L3). One position dword per
// channel and quad lets the kernels pull pair j's byte out with a shift (or
// one vpmultishiftqb) instead of a widening load.
// Preceded by comp int32[n_pad] = 128 * sum of the row's values (for the
// uint8 activations of vpdpbusd). n pads to 32, groups to a multiple of 8 (zeros).
constexpr int kPanel = 32;
constexpr int kQuadPairs = 4;
constexpr int64_t kQuadInputs = 8 * kQuadPairs;
constexpr int64_t kPairBytes = kPanel * 4;                  // one pair's values
constexpr int64_t kQuadPosOffset = 0;
constexpr int64_t kQuadValOffset = kPanel * 4;                            // 128
constexpr int64_t kQuadBytes = kQuadValOffset + kQuadPairs * kPairBytes;  // 640
constexpr uint32_t kMagic = 0x38493253u;  // "S2I8"
constexpr int32_t kLayoutP32Q4 = 4;  // 3: positions after the values
// Layout 5: layout 4 plus, right after the quads, the AVX2 and AVX-VNNI
// kernels' control table (what the packers add where one of them is
// selected, wanted_parts()): per panel,
// quad, pair j and half h (channels 16h .. 16h + 15), 32 bytes whose dword c
// (c < 8) holds in its bytes' low nibbles the vpshufb indices [i0, i1, 4 + j0,
// 4 + j1] of channel 16h + c -- its two groups' kept inputs within the pair's
// 8 -- and in their high nibbles those of channel 16h + 8 + c. Indices are <=
// 7, so bit 7 stays clear and one vpsrlw by 4 brings the high nibbles down:
// one load gives the gather controls of 16 channels, which the kernel
// otherwise decodes from the position bytes (6 - 7 instructions per pair and
// 8 channels). 256 bytes a quad and panel: 40 % more than its 640 bytes of
// positions and values.
constexpr int32_t kLayoutP32Q4Ctrl = 5;
constexpr int64_t kCtrlHalfBytes = 32;
constexpr int64_t kCtrlPairBytes = 2 * kCtrlHalfBytes;
constexpr int64_t kCtrlQuadBytes = kQuadPairs * kCtrlPairBytes;  // 256

struct PackedHeader {
  uint32_t magic;
  int32_t layout;
  int64_t n, k;
  int64_t n_pad, quads;  // quads = ceil(k / 32)
  int64_t comp_offset, data_offset;
  int64_t ps_offset;  // a pair-safe section (int8_gemm::PsHeader) after the quads (layout 5: after the
                      // control table), or 0: none
};
static_assert(sizeof(PackedHeader) == 64, "header must stay 64 bytes");

int64_t packed_nbytes(int64_t n, int64_t k);  // layout 4
int64_t ctrl_nbytes(int64_t n, int64_t k);    // layout 5's control table
// The control table of a packing (layout 5), or nullptr (layout 4).
const uint8_t* ctrl_table(const uint8_t* packed);
// With a pair-safe section (as int8_gemm's, PsHeader): where the selected
// kernel is the AVX2 one, a copy of the quads whose vpmaddubsw pairs -- a
// group's two values (v0, v1) -- are split by int8_gemm::ps_value, plus the
// residual entries (k = 4g + i1), when they are at most kPsMaxEntryFraction
// of the stored values; else packed_nbytes. A group keeps its two largest
// magnitudes, so same-sign pairs past 128 are common: ~5 % of the values of
// a pruned Gaussian layer (0.4 - 1.4 % in dense int8). The sign-trick tile
// the section replaces issues 6 instructions per 32 products against 4, so
// the limit is higher than dense int8's.
constexpr double kPsMaxEntryFraction = 0.08;
// Whether the selected kernel reads pair-safe sections (the AVX2 one).
bool wants_pair_safe();
// What the packers add for the selected kernel: 0 nothing (layout 4), 1 the
// control table (layout 5: the AVX-VNNI kernel), 2 the table and, where the
// values qualify, a pair-safe section (the AVX2 kernel).
int wanted_parts();
// Bytes with the control table (layout 5), and with the table and the
// pair-safe section, whatever the kernel and the entries.
int64_t packed_nbytes_ctrl(int64_t n, int64_t k);
int64_t packed_nbytes_ps(const int8_t* values, int64_t ldv, int64_t n, int64_t k);
// By wanted_parts(): packed_nbytes_ps where the values qualify for a
// section, packed_nbytes_ctrl where they do not or only the table is wanted,
// else packed_nbytes.
int64_t packed_nbytes_for(const int8_t* values, int64_t ldv, const uint8_t* pos, int64_t ldp, int64_t n, int64_t k);
// values: int8 [n, 2*ceil(k/4)] (row stride ldv), in [-127, 127]; pos: one byte per group
// (i0 | i1 << 2), [n, ceil(k/4)] (row stride ldp). out_nbytes: packed_nbytes,
// packed_nbytes_ctrl or packed_nbytes_ps (the parts it adds are written).
void pack(const int8_t* values, int64_t ldv, const uint8_t* pos, int64_t ldp, int64_t n, int64_t k,
          uint8_t* out, int64_t out_nbytes);
// nullptr when buf (nbytes) is a packing of an n x k weight (layout 4 or 5,
// with or without a pair-safe section, every header field the kernels read
// as pack() writes it), else what is wrong.
const char* check_packed(const uint8_t* buf, int64_t nbytes, int64_t n, int64_t k);

struct GemmArgs {
  const uint8_t* a;  // quantized activations (q ^ a_xor), [m, 32 * quads], row stride lda
  int64_t lda;
  const float* a_scale;
  const uint8_t* w;  // quad blocks
  const int32_t* comp;
  const float* w_scale;
  const float* bias;
  void* y;
  int64_t ldy;
  bool y_bf16;
  int64_t m, n, quads;
  // the pair-safe tile only: row m's residual sums of channel n at corr[m * 32 + n % 32]
  const int32_t* corr = nullptr;
  // the AVX2 / AVX-VNNI kernels: the packing's control table (layout 5), or nullptr: decoded per call
  const uint8_t* ctrl = nullptr;
};
// Rows [m0, m1) x panels [p0, p1).
using GemmFn = void (*)(const GemmArgs&, int64_t m0, int64_t m1, int64_t p0, int64_t p1);
// int8_gemm's epilogues read scales, bias and y from its own argument struct
// (channels past n not written).
inline int8_gemm::GemmArgs epilogue_args(const GemmArgs& g) { return int8_gemm::epilogue_args_from(g, g.n); }

struct Kernel {
  Isa isa;
  const char* name;
  int mr;
  uint8_t a_xor;
  GemmFn gemm;
  // From this many rows on the dense int8 kernel is faster than this one
  // (0: never), up to the sparse_from_rows_* below; measured, see README.md.
  // The modules switch there (dense_wins).
  int dense_from_rows;
  // calls of up to this many rows take the kernel's row paths (one row: the
  // one-row path; from 2: the k-blocked row path, qs8_s24_gemm_4x16_avx2.cpp; 0: none)
  int row_path_rows = 0;
  // ... until this many rows, from which this kernel wins again (0: never;
  // dense_from_rows or less: no window, never dense): on layers of at least
  // kBigLayerWeights weights, and on smaller ones
  int sparse_from_rows_big = 0, sparse_from_rows_small = 0;
};
constexpr int64_t kBigLayerWeights = int64_t(1) << 22;
// The k-blocked row path's reach (rows per call) in the AVX2 and AVX-VNNI
// kernels; Kernel::row_path_rows reports it (measured: README.md).
constexpr int kRowPathRowsAvx2 = 4, kRowPathRowsAvxVnni = 6;
// The AVX2 kernel's pair-safe path runs calls of at least ps_min_rows(n, k)
// rows (packings with a section); fewer take the sign-trick tile, whose
// per-call work is smaller (no transposition, no residual sums over 16-row
// blocks, one parallel region less). Measured, Golden Cove capped at AVX2, 2
// threads, pruned N(0, 0.02) layers (1.6 - 5 % residual entries), with the
// 16-row columns of a one-thread transposition: the pair-safe path x0.97 /
// 1.14 at 4 / 6 rows on 4096^2, x1.04 / 1.16 at 6 / 8 on 1024x4096, x0.89 -
// 0.93 / 1.12 - 1.13 at 8 / 16 on 1536x384 and 384x1536.
constexpr int64_t kPsMinRowsBig = 6, kPsMinRowsSmall = 16;
inline int64_t ps_min_rows(int64_t n, int64_t k) { return n * k >= kBigLayerWeights ? kPsMinRowsBig : kPsMinRowsSmall; }
const Kernel& select_kernel();
// True when the selected kernel says dense int8 beats it at m rows of an
// n x k layer (the modules run their dense int8 plan then).
bool dense_wins(int64_t m, int64_t n, int64_t k);

void linear(const void* x, int64_t ldx, bool x_bf16, int64_t m, int64_t k, const uint8_t* packed,
            const float* w_scale, const float* bias, void* y, int64_t ldy, bool y_bf16, int nthreads);

void qs8_s24_gemm_1x32_scalar(const GemmArgs&, int64_t, int64_t, int64_t, int64_t);
void qs8_s24_gemm_4x16_avx2(const GemmArgs&, int64_t, int64_t, int64_t, int64_t);
// The AVX2 kernel's pair-safe path: linear() hands it calls of at least
// ps_min_rows rows on packings with a pair-safe section (quantize: the AVX2 quantizer).
void linear_ps_avx2(int8_gemm::QuantizeRowsFn quantize, const void* x, int64_t ldx, bool x_bf16, int64_t m,
                    int64_t k, const uint8_t* packed, const float* w_scale, const float* bias, void* y, int64_t ldy,
                    bool y_bf16, int nthreads);
// AVX-VNNI level: the VEX build where the CPU has AVX-VNNI, else its EVEX twin
// (qs8_s24_gemm_4x16_avx2.cpp); the two are exported for the encoding test.
void qs8_s24_gemm_4x16_avxvnni(const GemmArgs&, int64_t, int64_t, int64_t, int64_t);
void qs8_s24_gemm_4x16_avxvnni_vex(const GemmArgs&, int64_t, int64_t, int64_t, int64_t);
void qs8_s24_gemm_4x16_avxvnni_evex(const GemmArgs&, int64_t, int64_t, int64_t, int64_t);
void qs8_s24_gemm_6x32_avx512vnni(const GemmArgs&, int64_t, int64_t, int64_t, int64_t);
void qs8_s24_gemm_6x32_avx512icl(const GemmArgs&, int64_t, int64_t, int64_t, int64_t);

}  // namespace sparse24_int8
}  // namespace pyaccel
