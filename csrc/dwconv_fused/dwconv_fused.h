// Fused depthwise-separable convolution, fp32, NHWC:
//
//   t[p, c]  = act1( sum_{i,j} x[ih(p, i), iw(p, j), c] * Wd[c][i][j] + bd[c] )   (zero padding)
//   y[p, o]  = act2( sum_{c < C} t[p, c] * Wp[o][c] + bp[o] )
//
// p runs over the output pixels of one image; BatchNorm is folded into Wd/bd
// and Wp/bp at patch time (pyaccel/_pattern.py). One work item computes the
// depthwise output t of a band of output pixels into a thread-local,
// cache-resident buffer [band][c_pad] and feeds it straight into a
// register-blocked GEMM as its K dimension: t never goes to memory.
//
// Packed layout "DWS1" (pack.cpp), 96-byte header, then (64-byte aligned):
//   Wd  fp32 [kh*kw][c_pad]        (taps major, channels contiguous, zero pad)
//   bd  fp32 [c_pad]
//   Wp  fp32 [n_pad / nr][c][nr]   (panels of nr output channels; zero pad)
//   bp  fp32 [n_pad]
// The layout tag is the panel width nr, which depends on the kernel the
// ladder picked (32 on AVX-512, 16 below): a kernel refuses another one.
// The header also records what the packing bakes in (channels, window,
// stride, dilation, activations, which biases it holds): packing_error
// compares it with what a call asks for.
#pragma once
#include <cstdint>
#include <string>

#include "common/cpu_features.h"
#include "common/line_prefetch.h"

namespace pyaccel {
namespace dws {

constexpr uint32_t kMagic = 0x31535744u;  // "DWS1"
constexpr int kChannelPad = 16;           // c_pad = c rounded up to this

// Activation codes (pyaccel/_pattern.py ActKind)
enum Act : int32_t { kNone = 0, kRelu = 1, kRelu6 = 2, kHardswish = 3, kSilu = 4, kHardtanh = 5 };

constexpr int32_t kHasDwBias = 1;
constexpr int32_t kHasPwBias = 2;

struct ActParams {
  int32_t kind;
  float lo, hi;  // kHardtanh bounds
};

struct PackedHeader {
  uint32_t magic;
  int32_t layout;   // = nr
  int64_t n, k;     // n = out channels, k = c = in channels
  int64_t n_pad;    // n rounded up to nr
  int32_t c_pad;
  int32_t kh, kw, sh, sw, dh, dw;
  int32_t act1, act2;
  float lo1, hi1, lo2, hi2;
  int32_t flags;    // kHasDwBias | kHasPwBias: the biases pack() was given (else zeros)
  int64_t total_bytes;
};
static_assert(sizeof(PackedHeader) == 96, "header size");

inline int64_t align64(int64_t v) { return (v + 63) / 64 * 64; }

struct Offsets {
  int64_t wd, bd, wp, bp, total;
};
Offsets offsets(int64_t c, int64_t n, int kh, int kw, int nr);

// One image's problem and a band's place in it.
// fp32 outputs (forward) of this many bytes or more are written with
// non-temporal stores (N a multiple of 16, y 64-byte aligned).
constexpr int64_t kStreamMinBytes = int64_t(1) << 20;

struct Problem {
  const float* x;      // NHWC [h][w][c] of one image
  int64_t h, w, c;
  int64_t oh, ow;      // output size
  int64_t pad_t, pad_l;
  const PackedHeader* hd;
  const float* wd;     // packed depthwise weights, bias
  const float* bd;
  const float* wp;     // packed pointwise panels, bias
  const float* bp;
  float* y;            // NHWC [oh][ow][n] of one image
  bool stream = false; // full vectors of y go out with non-temporal stores (see forward)
  bool prefetch = false; // the depthwise stage prefetches the next output row's new input row
  // Input bytes [pf, pf_end) the pointwise stage prefetches into L2, spread over its
  // tiles: the rows of x the thread's next work item reads (see forward).
  const char* pf = nullptr;
  const char* pf_end = nullptr;
};

// Depthwise stage: t[(p - p0) * ldt + c] for output pixels p in [p0, p1), act1 applied.
using DwFn = void (*)(const Problem& pr, int64_t p0, int64_t p1, float* t, int64_t ldt);
// Pointwise stage: y rows [p0, p1) (pixels), panels [q0, q1), from t (rows p - p0).
using PwFn = void (*)(const Problem& pr, const float* t, int64_t ldt, int64_t p0, int64_t p1, int64_t q0,
                      int64_t q1);

// LinePrefetch (common/line_prefetch.h): the next work item's input rows, Problem::pf.

// act2 in place over y rows [0, rows) x columns [c0, c1), ldy floats apart (the int8 stage's epilogue).
using ActFn = void (*)(float* y, int64_t ldy, int64_t rows, int64_t c0, int64_t c1, const PackedHeader& h);

struct Kernel {
  Isa isa;
  const char* name;  // the pointwise micro-kernel: dws_<MR>x<NR>_<isa>
  int mr, nr;
  DwFn dw;
  PwFn pw;
  ActFn act2;
};

void act2_avx512(float*, int64_t, int64_t, int64_t, int64_t, const PackedHeader&);
void act2_avx2(float*, int64_t, int64_t, int64_t, int64_t, const PackedHeader&);
void act2_portable(float*, int64_t, int64_t, int64_t, int64_t, const PackedHeader&);
void dw_avx512(const Problem&, int64_t, int64_t, float*, int64_t);
void pw_avx512(const Problem&, const float*, int64_t, int64_t, int64_t, int64_t, int64_t);
void dw_avx2(const Problem&, int64_t, int64_t, float*, int64_t);
void pw_avx2(const Problem&, const float*, int64_t, int64_t, int64_t, int64_t, int64_t);
void dw_scalar(const Problem&, int64_t, int64_t, float*, int64_t);
void pw_scalar(const Problem&, const float*, int64_t, int64_t, int64_t, int64_t, int64_t);

const Kernel& select_kernel();

// The pixel at index p of the depthwise window sum, in scalar arithmetic (the
// portable kernel, and the reference for the tails).

// Pack (weights fp32, contiguous, already validated by Python):
//   wd [c][kh][kw], bd [c] (or null: zeros), wp [n][c], bp [n] (or null).
int64_t packed_nbytes(int64_t c, int64_t n, int kh, int kw, int nr);
void pack(const float* wd, const float* bd, const float* wp, const float* bp, int64_t c, int64_t n, int kh, int kw,
          int sh, int sw, int dh, int dw, ActParams a1, ActParams a2, int nr, uint8_t* out);
// nullptr when `packed` fits (c, n, kh, kw) and the selected kernel, else why.
const char* check_packed(const uint8_t* packed, int64_t nbytes, int64_t c, int64_t n, int kh, int kw);

// What a call asks of a packing: everything pack() bakes into it but the weight values.
struct PackingSpec {
  int64_t c, n;
  int kh, kw, sh, sw, dh, dw;
  ActParams a1, a2;
  int32_t flags;  // kHasDwBias | kHasPwBias
};
// "" when `packed` is a DWS1 packing made for `want` by any kernel of this
// build (check_packed then says whether the selected one takes its panel
// width), else what differs: "expected ..., the buffer holds ...". Reads the
// header only (O(1)).
std::string packing_error(const uint8_t* packed, int64_t nbytes, const PackingSpec& want);
// True when nr is the panel width of a kernel of this build (any ISA).
bool is_panel_width(int nr);

// x: NHWC fp32 [batch][h][w][c] contiguous; y: NHWC fp32 [batch][oh][ow][n].
void forward(const float* x, int64_t batch, int64_t h, int64_t w, int64_t c, const uint8_t* packed, float* y,
             int64_t oh, int64_t ow, int64_t pad_t, int64_t pad_l, int nthreads);

// int8 pointwise stage: the depthwise part packed as "DWS1" with n = 0
// (pack(..., n = 0, ...): no pointwise panels; act2 is still read from it),
// the pointwise weights as int8_gemm's NR64K4 packing (int8 per output
// channel, scales w_scale). Per band: depthwise output t (fp32), quantized per
// pixel (int8_gemm's row quantizer: symmetric, max|t| / 127), int8 GEMM with
// int8_gemm's micro-kernel and dequantization epilogue (+ bias), then act2 on
// the band's outputs while they are in cache.
void forward_int8(const float* x, int64_t batch, int64_t h, int64_t w, int64_t c, const uint8_t* packed_dw,
                  const uint8_t* packed_i8, int64_t n, const float* w_scale, const float* bias, float* y, int64_t oh,
                  int64_t ow, int64_t pad_t, int64_t pad_l, int nthreads);

}  // namespace dws
}  // namespace pyaccel
