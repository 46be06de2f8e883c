// Binary (XNOR) convolution and linear layers: ±1 activations and weights
// packed as bits, dot = K - 2 * popcount(x xor w), a fused float epilogue.
//
//   y[n, oh, ow, oc] = act( dot(n, oh, ow, oc) * scale[oc] + shift[oc] )
//   dot = sum over taps (i, j) inside the input and channels c of group g:
//         sign(x[n, c, oh*sh - ph + i*dh, ow*sw - pw + j*dw]) * sign(w[oc, c, i, j])
//
// sign(v) = -1 for v < 0, else +1 (bit 1 = -1). Activations are packed once
// per call, channels-last, into a buffer padded spatially with +1 (zero
// words): [N][Hp][Wp][G][CW] uint64, CW = ceil(Cg / 64), bits past Cg zero.
// The kernels then read every tap without bounds checks (implicit GEMM: each
// output pixel's taps are word offsets from its top-left corner, no im2col
// copy). With exact zero padding (pad_mode kPadZeros) a tap outside the input
// contributed sum_c sign(w[oc, c, tap]) (= wsum[oc][tap]) instead of 0; the
// epilogue subtracts the sum of those per output pixel (border correction,
// a per-border-class table built per call). With kPadOnes nothing is subtracted.
//
// Weights come packed by pyaccel.formats.binary.pack_conv_weight:
// [G][ceil(OCg / 32)][taps][CW][32] uint64 (machine-independent; every ISA
// reads the same blocks). A Linear layer is the 1 x 1 case with H = W = 1.
#pragma once
#include <cstdint>
#include <vector>

#include "common/cpu_features.h"

namespace pyaccel {
namespace binary {

constexpr int kNR = 32;        // output channels per weight block
constexpr int kMaxMR = 8;      // most pixels a micro-kernel takes at once
// Float outputs from this size on (bytes) are written with non-temporal
// stores: above the L2 of a core (512 KiB - 1 MiB on Zen 3 / 4) they cannot
// stay there for the next layer, and skipping the read for ownership saves a
// third of the output's memory traffic.
constexpr int64_t kStreamMinBytes = int64_t(1) << 20;
constexpr int kPadZeros = 0;   // exact zero padding (border correction)
constexpr int kPadOnes = 1;    // pad the ±1 input with +1

enum Act : int { kActNone = 0, kActRelu = 1, kActHardtanh = 2, kActPrelu = 3 };

// What one micro-kernel call needs besides its pixels.
struct TileArgs {
  int ntaps;                 // kh * kw
  const int64_t* tap_off;    // word offset of each tap from a pixel's first tap
  int64_t cw;                // words per pixel per group
  int32_t ktot;              // ntaps * Cg: the dot of two all-(+1) operands
  const float* scale;        // [OC] or null (1)
  const float* shift;        // [OC] or null (0)
  int act;                   // Act
  float lo, hi;              // hardtanh bounds
  const float* slope;        // [OC] PReLU slopes (act == kActPrelu)
  bool stream = false;       // full 16-channel groups of y go out with non-temporal stores (y 64-byte aligned)
};

// One tile: mr (<= the kernel's MR) pixels x one block of up to 32 output
// channels (nvalid of them stored). x[p]: pixel p's first word (its group's
// words at tap 0); w: the block [taps][cw][32]; corr[p]: int32 per output
// channel (indexed like y[p]) to subtract, or null; y[p]: pixel p's output
// channels of this block (fp32); oc0: global index of the block's channel 0
// (for scale, shift, slope).
using TileFn = void (*)(const TileArgs& a, int mr, const uint64_t* const* x, const uint64_t* w,
                        const int32_t* const* corr, float* const* y, int nvalid, int64_t oc0);

// Pack x (fp32, element strides sn, sc, sh, sw) into the padded buffer (rows
// [h0, h1) of every image). Interior pixels only: the caller zeroes the border.
using PackFn = void (*)(const float* x, int64_t c, int64_t w, int64_t sc, int64_t sw, int64_t groups,
                        int64_t cg, int64_t cw, uint64_t* out /* row start, interior pixel 0 */);

struct Kernel {
  Isa isa;
  const char* name;
  int mr;
  TileFn tile;
  PackFn pack_row;
};

const Kernel& select_kernel();

void tile_avx512icl(const TileArgs& a, int mr, const uint64_t* const* x, const uint64_t* w,
                    const int32_t* const* corr, float* const* y, int nvalid, int64_t oc0);
void tile_avx2(const TileArgs& a, int mr, const uint64_t* const* x, const uint64_t* w, const int32_t* const* corr,
               float* const* y, int nvalid, int64_t oc0);
void tile_scalar(const TileArgs& a, int mr, const uint64_t* const* x, const uint64_t* w, const int32_t* const* corr,
                 float* const* y, int nvalid, int64_t oc0);
void pack_row_avx512(const float* x, int64_t c, int64_t w, int64_t sc, int64_t sw, int64_t groups, int64_t cg,
                     int64_t cw, uint64_t* out);
void pack_row_avx2(const float* x, int64_t c, int64_t w, int64_t sc, int64_t sw, int64_t groups, int64_t cg,
                   int64_t cw, uint64_t* out);
void pack_row_scalar(const float* x, int64_t c, int64_t w, int64_t sc, int64_t sw, int64_t groups, int64_t cg,
                     int64_t cw, uint64_t* out);

// The scalar epilogue every kernel shares for its stores: v = dot as float.
inline float epilogue_one(const TileArgs& a, float v, int64_t oc) {
  if (a.scale) v = v * a.scale[oc];
  if (a.shift) v = v + a.shift[oc];
  switch (a.act) {
    case kActRelu: v = v < 0.f ? 0.f : v; break;  // NaN stays NaN, as in torch
    case kActHardtanh: v = v < a.lo ? a.lo : (v > a.hi ? a.hi : v); break;
    case kActPrelu: v = v >= 0.f ? v : v * a.slope[oc]; break;
    default: break;
  }
  return v;
}

struct ConvArgs {
  const float* x;
  int64_t n, c, h, w;
  int64_t sxn, sxc, sxh, sxw;  // element strides of x (NCHW indexing)
  int64_t groups;
  const uint64_t* wpacked;     // [G][nb][taps][CW][32]
  int64_t oc, kh, kw, sh, sw, ph, pw, dh, dw;
  int pad_mode;
  const int32_t* wsum;         // [OC][taps] (kPadZeros)
  const float* scale;
  const float* shift;
  int act;
  float lo, hi;
  const float* slope;
  float* y;                    // [N][OH][OW][OC] (unused with ybits)
  int64_t oh, ow;
  // Bit-packed hand-off between binary layers (both optional):
  // xbits: the input as signs already packed, [N][H][W][ceil(C / 64)] uint64
  //   (bits past C are ignored: masked off as the rows are copied), read
  //   instead of x; needs groups == 1.
  // ybits: write sign(y) packed the same way, [N][OH][OW][ceil(OC / 64)],
  //   instead of y (bit = y < 0; NaN counts +1, as sign does); the caller
  //   zeroes it (channel blocks store 32-bit halves: OC / groups must be a
  //   multiple of 32 when groups > 1).
  const uint64_t* xbits = nullptr;
  uint64_t* ybits = nullptr;
};

// Exact zero padding's border correction (kPadZeros): output rows and
// columns fall into classes by which kernel rows / columns lie outside the
// input; corr[(rcls[oy] * ncls + ccls[ox]) * OC + oc] = the sum of
// wsum[oc][tap] over the taps outside (class 0: none, all zeros). Depends on
// wsum and the geometry only (not on x): a caller that runs one layer many
// times builds it once (border_table) and passes it to conv.
struct BorderTable {
  bool correct = false;      // false: nothing to subtract (one-padding, no padding)
  std::vector<int> rcls, ccls;
  int64_t ncls = 1;
  std::vector<int32_t> corr;
};
BorderTable border_table(const ConvArgs& a);

// phase_seconds (optional, 3 entries): wall time of the activation packing,
// the border-correction table and the tiles (the inner loop), in seconds.
// table: border_table(a) built earlier for the same wsum and geometry, or
// null (built here).
void conv(const ConvArgs& a, int nthreads, double* phase_seconds = nullptr, const BorderTable* table = nullptr);

}  // namespace binary
}  // namespace pyaccel
