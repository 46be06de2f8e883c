// int8 GEMM with dynamic per-row activation quantization and a fused
// dequantization epilogue:
//
//   y[m, n] = float(sum_k q[m, k] * w[n, k]) * sx[m] * sw[n] + bias[n]   (order: see split_scale)
//   q[m, :] = clamp(rne(x[m, :] * (127 / max|x[m, :]|)), -127, 127), sx[m] = max|x[m, :]| / 127
//   (opt-in 7-bit activations: 63 in place of 127, see select_kernel)
//   (a row with an inf or NaN: q = 0, sx = NaN, so its outputs are NaN; a row
//   with 0 < max|x| < 2^-64 is lifted by 2^64 first, see kTinyAmax)
//
// Weights (int8, symmetric per output channel) are packed once into the
// "NR64K4" layout (see pack.cpp); activations are quantized per call.
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/cpu_features.h"
#include "common/parallel.h"
#include "common/row_passes.h"
#include "common/row_tiles.h"

namespace pyaccel {
namespace int8_gemm {

// ---- packed weight layout -------------------------------------------------
constexpr int kPanel = 64;    // columns (output channels) per packed panel
constexpr int kKGroup = 4;    // consecutive k values per 32-bit lane (vpdpbusd)
constexpr uint32_t kMagic = 0x38495150u;  // "PQI8"
constexpr int32_t kLayoutNR64K4 = 1;

// 64-byte header at the front of every packed buffer; kernels refuse a buffer
// whose magic, layout, n or k differ from what the caller says.
struct PackedHeader {
  uint32_t magic;
  int32_t layout;
  int64_t n, k;          // logical weight shape [n, k]
  int64_t n_pad, k_pad;  // n rounded up to kPanel, k rounded up to kKGroup
  int64_t comp_offset;   // int32[n_pad]: 128 * sum_k w[n, k] (for u8 activations)
  int64_t data_offset;   // int8 panels
  int64_t ps_offset;     // the pair-safe section (PsHeader) right after the panels, or 0: none
};
static_assert(sizeof(PackedHeader) == 64, "header must stay 64 bytes");

// The pair-safe section: an optional second copy of the weights for the 8-bit
// AVX2 tile (qs8_gemm_4x16c4ps_avx2.cpp), split as w = s + r where every
// vpmaddubsw pair of s -- (w[n, 2j], w[n, 2j + 1]) -- has its positive parts
// and its negative parts each summing to at most 128 in magnitude, so that
// u0 * s0 + u1 * s1 with u in [0, 255] never leaves int16 (255 * 128 = 32640).
// Where a pair's same-sign weights sum past that, s keeps w[n, 2j] and the
// part of w[n, 2j + 1] that fits; the rest, r = w - s at k = 2j + 1, is a
// sparse residual entry (about 1 - 3 % of the weights of trained layers and
// 0.4 % of Gaussian ones). Layout, offsets from the buffer start:
//   [PsHeader: 64 B][lane: int32 x (n_pad + 1)][ek: int32 x E][er: int32 x E]
//   (zero-padded to 64 B)[panels of s: int8 x n_pad x k_pad]
// Channel c's entries are [lane[c], lane[c + 1]), by ascending k; ek = k,
// er = r as an int32 whose high int16 is 0 (vpmaddwd's operand).
// The panels of s come in PsHeader::panel_order: kPsPanels64, NR64K4 like the
// packing's own panels (sections that older versions packed: every
// quad-safe one before they too took kPsQuarters), or kPsQuarters (the pair- and quad-safe
// sections pack_weights writes now): each 64-channel panel as its four 16-channel
// quarters one after the other, each quarter k group by k group (16 channels
// x 4 bytes = one 64-byte line per group), so that the 4 x 16 tile, which
// runs over one quarter at a time, reads and prefetches it in address order.
//
// The quad-safe section (kind kPsQuad) has the same layout for the 7-bit
// AVX2 path (qs8_gemm_4x16c4qs_avx2.cpp), whose tile adds two vpmaddubsw
// results in int16 before one vpmaddwd: u in [1, 127] (q + 64) times the
// quad of s at k = 8j + 2p + {0, 1} and 8j + 4 + 2p + {0, 1} (pair p of
// groups 2j and 2j + 1) stays in int16 when the quad's positive parts and its
// negative parts each sum to at most kQsLimit in magnitude (127 * 258 =
// 32766). qs_split keeps each quad's values in k order as far as they fit;
// the rest are residual entries (0.02 % of N(0, sigma) weights at K = 4096,
// 0.24 % at K = 384). Groups past the last whole pair of groups (k_pad / 4
// odd) are not split: their pair sums are at most 2 * 127 * 127.
constexpr uint32_t kPsMagic = 0x53504951u;  // "QIPS"
constexpr int32_t kPsPair = 0;  // the 8-bit AVX2 path's split (PsHeader::kind)
constexpr int32_t kPsQuad = 1;  // the 7-bit AVX2 path's split
constexpr int kQsLimit = 258;
constexpr int64_t kPsPanels64 = 0;  // PsHeader::panel_order: NR64K4 panels
constexpr int64_t kPsQuarters = 1;  // 16-channel quarters, each in k order (int8_gemm packings, kind kPsPair)
struct PsHeader {
  uint32_t magic;
  int32_t kind;  // kPsPair or kPsQuad
  int64_t entries;  // E
  int64_t lane_offset, ek_offset, er_offset, panels_offset;
  int64_t total;  // bytes of the section, this header included
  int64_t panel_order;  // kPsPanels64 or kPsQuarters (0 in every section of older packings)
};
static_assert(sizeof(PsHeader) == 64, "header must stay 64 bytes");

// The pair-safe value of w1 in the vpmaddubsw pair (w0, w1); w1 minus it is
// the pair's residual entry (0: none).
inline int ps_value(int w0, int w1) {
  if (w0 > 0 && w1 > 0 && w0 + w1 > 128) return 128 - w0;
  if (w0 < 0 && w1 < 0 && w0 + w1 < -128) return -128 - w0;
  return w1;
}
// The quad-safe split of the 8 weights w[8j .. 8j + 8) of a channel (k
// order; zeros past k): s[i] keeps w[i] as far as its quad's same-sign sum
// stays within kQsLimit (the quads' members in k order), w - s is residual.
inline void qs_split(const int w[8], int s[8]) {
  for (int p = 0; p < 2; ++p) {
    int pos = 0, neg = 0;
    for (const int i : {2 * p, 2 * p + 1, 2 * p + 4, 2 * p + 5}) {
      const int v = w[i];
      s[i] = v > 0 ? std::min(v, kQsLimit - pos) : std::max(v, -kQsLimit - neg);
      if (v > 0) pos += s[i];
      else neg += s[i];
    }
  }
}
// Where each part of a pair-safe (or quad-safe) section lies (offsets from
// its start) for n_pad channels, `entries` residual entries and panel_bytes
// of split weights (the 2:4 int8 packing adds the same kind of section to its own).
PsHeader ps_layout(int64_t n_pad, int64_t entries, int64_t panel_bytes, int32_t kind = kPsPair);
// Writes a pair-safe section of `entries` residual entries at sec (header,
// lane table, entries; the caller then writes panel_bytes of split weights at
// sec + the returned PsHeader's panels_offset). pairs(c, emit) calls emit(k,
// w0, w1) for each vpmaddubsw pair of channel c < n (k: the input w1
// multiplies), in ascending k.
// The general form: residuals(c, emit) calls emit(k, r) for each nonzero
// residual r of channel c < n, in ascending k.
template <typename Residuals>
PsHeader write_section(uint8_t* sec, int64_t n, int64_t n_pad, int64_t entries, int64_t panel_bytes, int32_t kind,
                       const Residuals& residuals) {
  const PsHeader p = ps_layout(n_pad, entries, panel_bytes, kind);
  std::memset(sec, 0, static_cast<size_t>(p.panels_offset));
  std::memcpy(sec, &p, sizeof(p));
  int32_t* lane = reinterpret_cast<int32_t*>(sec + p.lane_offset);
  int32_t* ek = reinterpret_cast<int32_t*>(sec + p.ek_offset);
  int32_t* er = reinterpret_cast<int32_t*>(sec + p.er_offset);
  int64_t e = 0;
  for (int64_t c = 0; c < n_pad; ++c) {
    lane[c] = static_cast<int32_t>(e);
    if (c >= n) continue;
    residuals(c, [&](int64_t k, int r) {
      ek[e] = static_cast<int32_t>(k);
      er[e] = static_cast<int32_t>(static_cast<uint16_t>(static_cast<int16_t>(r)));
      ++e;
    });
  }
  lane[n_pad] = static_cast<int32_t>(e);
  return p;
}
template <typename Pairs>
PsHeader write_ps_section(uint8_t* sec, int64_t n, int64_t n_pad, int64_t entries, int64_t panel_bytes,
                          const Pairs& pairs) {
  return write_section(sec, n, n_pad, entries, panel_bytes, kPsPair, [&](int64_t c, const auto& emit) {
    pairs(c, [&](int64_t k, int w0, int w1) {
      const int r = w1 - ps_value(w0, w1);
      if (r != 0) emit(k, r);
    });
  });
}
// Validates the section at buf + offset of a packing of nbytes whose part
// before it has offset bytes (n_pad channels, panel_bytes of split weights,
// entries' k below k_limit): its layout, a lane table that starts at 0 and
// never decreases, every ek < k_limit and every er's high int16 0 (the
// kernels index with them: one pass over the entries, vectorized).
// nullptr, or what is wrong.
// allow_quad: an int8_gemm packing, where a quad-safe section and either kind
// in kPsQuarters order pass too (the 2:4 int8 packings hold pair-safe
// sections of NR64K4-ordered values only).
const char* check_ps_section(const uint8_t* buf, int64_t nbytes, int64_t offset, int64_t n_pad, int64_t panel_bytes,
                             int64_t k_limit, bool allow_quad = false);
// Bytes of the packing without / with the section of act_bits' AVX2 path (8:
// pair-safe, 7: quad-safe; w, ldw: as for pack_weights).
int64_t packed_nbytes(int64_t n, int64_t k);
int64_t packed_nbytes_ps(const int8_t* w, int64_t ldw, int64_t n, int64_t k, int act_bits = 8);
// Residual entries of w's pair-safe split (act_bits 8) or quad-safe one (7).
int64_t ps_entries(const int8_t* w, int64_t ldw, int64_t n, int64_t k, int act_bits = 8);
// A pair-safe section is built for weights with at most this fraction of
// residual entries: each entry costs about as much as 4 columns of the tile's
// work, so uniformly distributed weights (12 % entries, PyTorch's nn.Linear
// initialization) run slower than on the int16 tile while trained and
// Gaussian ones (0.2 - 1.4 %) run 1.1 - 1.35x faster (measured, Golden Cove
// capped at AVX2, 2 threads: 4096^2 and 1536x384 at M = 128 break even near
// 3 %).
constexpr double kPsMaxEntryFraction = 0.02;
// Whether the selected 8-bit kernel reads a pair-safe section (the int8
// packers add one then, where w's entries stay within kPsMaxEntryFraction).
bool wants_pair_safe();
// Whether the selected 7-bit kernel reads a quad-safe section.
bool wants_quad_safe();
// packed_nbytes_ps where the selected act_bits kernel reads a section and w
// qualifies, else packed_nbytes.
int64_t packed_nbytes_for(const int8_t* w, int64_t ldw, int64_t n, int64_t k, int act_bits = 8);
// w: int8 [n, k] with row stride ldw; out: packed_nbytes(n, k) bytes (or
// packed_nbytes_ps(..., act_bits) with with_ps), 64-byte aligned.
void pack_weights(const int8_t* w, int64_t ldw, int64_t n, int64_t k, uint8_t* out, bool with_ps = false,
                  int act_bits = 8);
// Returns nullptr if the buffer is a valid NR64K4 packing of an [n, k] weight
// (with or without a pair-safe section), else a message saying what is wrong.
const char* check_packed(const uint8_t* buf, int64_t nbytes, int64_t n, int64_t k);
// The pair-safe section of a checked packing, or nullptr.
inline const PsHeader* ps_section(const uint8_t* packed) {
  int64_t off;
  std::memcpy(&off, packed + offsetof(PackedHeader, ps_offset), sizeof(off));
  return off ? reinterpret_cast<const PsHeader*>(packed + off) : nullptr;
}
// The kind of a checked packing's section (kPsPair, kPsQuad), or -1: none.
inline int32_t ps_kind(const uint8_t* packed) {
  const PsHeader* p = ps_section(packed);
  if (!p) return -1;
  int32_t kind;
  std::memcpy(&kind, reinterpret_cast<const uint8_t*>(p) + offsetof(PsHeader, kind), sizeof(kind));
  return kind;
}

// ---- kernels ----------------------------------------------------------------
// Quantize rows [m0, m1) of x (fp32, or bf16 if x_bf16) to q in [-qmax, qmax]
// (qmax 127, or 63 for 7-bit activations) and write the per-row scale amax /
// qmax. Each byte stored is q + zero_point modulo 256 into q (row stride ldq,
// columns [k, k_pad) hold q = 0): zero_point 0x80 gives the uint8 q + 128 that
// vpdpbusd wants, 0x40 the uint8 q + 64 in [1, 127] of the 7-bit AVX2 kernel.
// For 0 and 0x80 the addition equals an XOR.
using QuantizeRowsFn = void (*)(const void* x, int64_t ldx, bool x_bf16, int64_t m0,
                                int64_t m1, int64_t k, int64_t k_pad, int64_t ldq, uint8_t zero_point,
                                int qmax, int8_t* q, float* scale);

// Largest activation magnitude per mode: 8-bit (default) and 7-bit activations.
constexpr int kQmax8 = 127;
constexpr int kQmax7 = 63;
// The stored byte for a quantized value q (see QuantizeRowsFn).
inline int8_t encode_q(int q, uint8_t zero_point) {
  return static_cast<int8_t>(static_cast<uint8_t>(q + zero_point));
}

// Rows with 0 < amax < kTinyAmax are quantized as rne((x * kTinyLift) *
// (qmax / (amax * kTinyLift))): 127 / amax overflows fp32 below amax ~ 3.7e-37,
// and both multiplications by 2^64 are exact (the results are normal). For
// every amax where 127 / amax is finite this gives the same q as x * (127 /
// amax) (the same real product, rounded once), so only tiny rows take this
// path. The scale stays fp32(amax / 127). pyaccel.reference.quantize_rows_fp32
// states the same rule.
constexpr float kTinyAmax = 0x1p-64f;
constexpr float kTinyLift = 0x1p64f;

// One row x [k] (fp32, or bf16 if x_bf16) with 0 < amax < kTinyAmax, amax =
// max|x|, quantized by the rule above into q_row (columns [k, k_pad) zero,
// encoded with zero_point). Portable code in qs8_quantize_rows_scalar.cpp, called
// by every ISA's quantizer for such rows. Returns false if the row holds an
// inf or NaN (q_row is then unspecified and the caller marks the row).
bool quantize_tiny_row(const void* row, bool x_bf16, int64_t k, int64_t k_pad, float amax,
                       uint8_t zero_point, int qmax, int8_t* q_row);

struct GemmArgs {
  const int8_t* a;      // quantized activations [m, k_pad]
  int64_t lda;
  const float* a_scale; // [m]
  const int8_t* w;      // packed panels
  const int32_t* comp;  // [n_pad]
  const float* w_scale; // [n]
  const float* bias;    // [n] or nullptr
  void* c;              // output [m, n], fp32 or bf16
  int64_t ldc;
  bool c_bf16;
  int64_t m, n, k_pad;
  // Kernels with Kernel::widen only: the same rows' activations widened to
  // int16 (row stride ld16), or nullptr (the kernel then widens them itself).
  const int16_t* a16 = nullptr;
  int64_t ld16 = 0;
  // The pair-safe tile only: the rows' bytes u = q + 128, column-major (row
  // m, column k at ut[k * ldt + m]), and, per panel, its residual sums (row
  // m, channel n at corr[m * 64 + n % 64]).
  const uint8_t* ut = nullptr;
  int64_t ldt = 0;
  const int32_t* corr = nullptr;
  // The split tiles only: whether g.w holds a pair-safe section's panels in
  // kPsQuarters order (else NR64K4), and how far the tile's prefetch pointer
  // moves per k group (0: one line, as the weights do).
  bool w_quarters = false;
  int64_t pf_step = 0;
};
// Computes rows [m0, m1) for panels [p0, p1).
using GemmFn = void (*)(const GemmArgs& args, int64_t m0, int64_t m1, int64_t p0, int64_t p1);
// rows x k_pad quantized activations (row stride lda) -> int16 (row stride ld16).
using WidenRowsFn = void (*)(const int8_t* a, int64_t lda, int64_t rows, int64_t k_pad, int16_t* out, int64_t ld16);
// The epilogues' arguments taken from another op's argument struct with the
// same field names (w_scale, bias, y, ldy, y_bf16), for channels [0, n).
template <typename G>
inline GemmArgs epilogue_args_from(const G& g, int64_t n) {
  GemmArgs e{};
  e.w_scale = g.w_scale;
  e.bias = g.bias;
  e.c = g.y;
  e.ldc = g.ldy;
  e.c_bf16 = g.y_bf16;
  e.n = n;
  return e;
}

struct Kernel {
  Isa isa;
  const char* name;     // e.g. "qs8_gemm_6x64c4_avx512vnni"
  int mr;               // rows per micro-tile
  uint8_t a_zero;       // activation encoding: byte = q + a_zero (0x80, 0x40: uint8 activations)
  QuantizeRowsFn quantize;
  GemmFn gemm;
  int row_path_rows = 0;  // calls of up to this many rows take the kernel's row path (0: none)
  int qmax = kQmax8;      // activations in [-qmax, qmax]: 127, or 63 in the 7-bit ladder
  bool panel_ranges = false;  // calls get ranges of panels (the AMX kernel keeps its rows in L2 across them)
  // Tiles that multiply int16 activations (the 8-bit AVX2 kernel): the drivers
  // widen each row pass of more than row_path_rows rows once with this
  // (GemmArgs::a16), instead of every panel's tiles widening them.
  WidenRowsFn widen = nullptr;
  // and up to this many on layers of >= kRowPathHugeWeights weights (0: row_path_rows)
  int row_path_rows_huge = 0;
};

// The AVX2 and AVX-VNNI kernels' row path (avx2_tile::tile_rows_kb: whole
// panels in k-blocks, in address order, with a prefetch stream) serves calls
// of up to these many rows; more rows take the kernel's tile.
// 8-bit AVX2: from 5 rows the 6x8 int16 tile (Zen 4 capped at AVX2, one
// core: the tile 0.83x the row path at 4 rows on 4096^2, 1.0 - 1.2x from 5 -
// 8 rows); its sign-trick step (4 instructions per 32 products) makes 5 - 8
// rows slower on the row path (Golden Cove capped at AVX2, 2 threads,
// 4096^2: x0.85 - x0.93 at 6 - 8 rows, weights hot).
constexpr int64_t kAvx2RowPathRows = 4;
// 7-bit AVX2 and AVX-VNNI: up to 4 rows, and up to kRowPathRowsHuge rows on
// layers of >= kRowPathHugeWeights weights, whose quarter tiles read their
// panels from L3 / DRAM 64 of every 256 bytes at a time (Golden Cove, 2
// threads, interleaved with torch.ao capped at AVX2; weights cycled over
// 24 copies, "cold", or one copy, "hot"). AVX-VNNI against its 6-row tile,
// 4096^2: 2 / 4 / 6 / 8 rows cold 1.07 / 1.13 / 1.09 / 1.19 ms -> 0.61 /
// 0.60 / 0.77 / 0.78, hot 0.49 / 0.47 / 0.49 / 0.63 -> 0.32 / 0.32 / 0.45 /
// 0.52; 1024x4096 likewise (x1.4 - x2.0 cold); at 12 - 32 rows the tile is
// 1.05 - 1.2x faster hot. 7-bit against the quad-safe path (which served 2
// rows on such layers), 4096^2 2 / 4 / 6 / 8 rows: cold 1.16 / 1.13 /
// 1.22 / 1.30 ms -> 0.65 / 0.62 / 0.78 / 0.96, hot 0.50 / 0.56 / 0.68 / 0.83
// -> 0.32 / 0.43 / 0.62 / 0.85. On smaller layers (MiniLM's 1536x384 and
// 384x1536, 1024^2) at 5 - 8 rows the tiles are 1.05 - 1.2x faster hot,
// the row path 1.1 - 1.3x cold: left at 4 there.
constexpr int64_t kAvx2U7RowPathRows = 4;
constexpr int64_t kAvxVnniRowPathRows = 4;
constexpr int64_t kRowPathRowsHuge = 8;
constexpr int64_t kRowPathHugeWeights = int64_t(4) << 20;
// The AMX kernel hands calls of fewer rows than this to the AVX-512 VNNI
// kernel (same activation encoding and exact sums: the same outputs).
constexpr int64_t kAmxMinRows = 8;

// The kernel for selected_isa(); chosen once per ISA-cap generation.
// act_bits 8: activations in [-127, 127]; 7: in [-63, 63] (the opt-in mode
// whose AVX2 kernel takes q + 64 as vpmaddubsw's unsigned operand: 3
// instructions per 32 products). Other values are the caller's error.
const Kernel& select_kernel(int act_bits = 8);

// Row stride of quantized activations: k_pad plus one cache line when k_pad is
// a multiple of 1 KiB, so the MR rows a micro-tile broadcasts from do not all
// fall in the same L1 set.
inline int64_t a_stride(int64_t k_pad) { return k_pad % 1024 == 0 ? k_pad + 64 : k_pad; }

// Row stride (int16 elements) of widened activations: k_pad, plus 32 when a
// row is a multiple of 2 KiB, so the 6 rows a tile broadcasts from do not
// share L1 sets.
inline int64_t a16_stride(int64_t k_pad) { return (2 * k_pad) % 2048 == 0 ? k_pad + 32 : k_pad; }

// This thread's scratch for rows x lda quantized activations and their scales
// (grown on demand, reused: large calls do not page-fault a fresh buffer), and
// for rows x ld16 widened ones (Kernel::widen).
struct QuantScratch {
  int8_t* q;
  float* scale;
};
QuantScratch quant_scratch(int64_t rows, int64_t lda);
int16_t* a16_scratch(int64_t rows, int64_t ld16);
void widen_rows_avx2(const int8_t* a, int64_t lda, int64_t rows, int64_t k_pad, int16_t* out, int64_t ld16);

// The int8 GEMMs' activation side (int8_gemm and sparse24_int8): x [m, k]
// quantized per row into scratch of row stride a_stride(k_pad), in row passes
// of <= ~8 MiB so that the scratch stays bounded for any batch (the weights
// are re-read once per pass); gemm(q, q_scale, lda, r0, rows) then runs the
// pass's rows [r0, r0 + rows).
// With widen (non-null), the threads also widen the rows they quantized into
// int16 scratch of row stride a16_stride(k_pad) (counted in the pass's
// scratch), and gemm gets it: gemm(q, q_scale, lda, a16, r0, rows); a16 is
// nullptr without widen and in passes of no more than widen_min_rows rows
// (which the kernel runs on its row path).
template <typename Gemm>
void quantized_passes16(QuantizeRowsFn quantize, WidenRowsFn widen, int64_t widen_min_rows, uint8_t a_zero, int qmax,
                        int64_t mr, const void* x, int64_t ldx, bool x_bf16, int64_t m, int64_t k, int64_t k_pad,
                        int nthreads, const Gemm& gemm) {
  const int64_t lda = a_stride(k_pad), ld16 = a16_stride(k_pad);
  const size_t xsize = x_bf16 ? 2 : 4;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1));  // >= ~16K values per thread
  for_each_row_pass(m, lda + (widen ? 2 * ld16 : 0), kRowPassBytes, 6 * mr, [&](int64_t r0, int64_t r1) {
    const QuantScratch s = quant_scratch(r1 - r0, lda);
    const WidenRowsFn wid = r1 - r0 > widen_min_rows ? widen : nullptr;
    int16_t* a16 = wid ? a16_scratch(r1 - r0, ld16) : nullptr;
    const void* xr = static_cast<const char*>(x) + r0 * ldx * xsize;
    parallel_for(r1 - r0, grain, nthreads, [&](int64_t m0, int64_t m1) {
      quantize(xr, ldx, x_bf16, m0, m1, k, k_pad, lda, a_zero, qmax, s.q, s.scale);
      if (wid) wid(s.q + m0 * lda, lda, m1 - m0, k_pad, a16 + m0 * ld16, ld16);
    });
    gemm(s.q, s.scale, lda, static_cast<const int16_t*>(a16), r0, r1 - r0);
  });
}

// Rows per thread from which row_chunk_passes splits a pass by rows.
constexpr int64_t kRowChunkMinRows = 64;

// quantized_passes16 for many rows: in each pass, one chunk of whole mr-row
// tiles per thread (parallel_row_chunks): a thread quantizes (and widens) its
// own chunk and runs item(q, q_scale, lda, a16, r0, rows, unit, a0, a1) --
// units [0, units) x sub-chunks of ~64 rows of that chunk, pass rows [a0, a1) --
// before the leftovers of other chunks: on quiet cores each reads only the
// rows it wrote. Returns false (nothing done) when the passes would have
// fewer than kRowChunkMinRows rows a thread.
template <typename Item>
bool row_chunk_passes(QuantizeRowsFn quantize, WidenRowsFn widen, int64_t widen_min_rows, uint8_t a_zero, int qmax,
                      int64_t mr, const void* x, int64_t ldx, bool x_bf16, int64_t m, int64_t k, int64_t k_pad,
                      int64_t units, int nthreads, const Item& item) {
  const int nt = effective_threads(nthreads);
  const int64_t lda = a_stride(k_pad), ld16 = a16_stride(k_pad);
  const int64_t row_bytes = lda + (widen ? 2 * ld16 : 0), multiple = 6 * mr;
  if (nt < 2 || units < 1 || m <= 0 ||
      std::min(m, row_pass_rows(m, row_bytes, kRowPassBytes, multiple)) < kRowChunkMinRows * nt)
    return false;
  const size_t xsize = x_bf16 ? 2 : 4;
  for_each_row_pass(m, row_bytes, kRowPassBytes, multiple, [&](int64_t r0, int64_t r1) {
    const QuantScratch s = quant_scratch(r1 - r0, lda);
    const WidenRowsFn wid = r1 - r0 > widen_min_rows ? widen : nullptr;
    int16_t* a16 = wid ? a16_scratch(r1 - r0, ld16) : nullptr;
    const void* xr = static_cast<const char*>(x) + r0 * ldx * xsize;
    parallel_row_chunks(
        r1 - r0, mr, units, 64, nt,
        [&](int, int64_t a0, int64_t a1) {
          quantize(xr, ldx, x_bf16, a0, a1, k, k_pad, lda, a_zero, qmax, s.q, s.scale);
          if (wid) wid(s.q + a0 * lda, lda, a1 - a0, k_pad, a16 + a0 * ld16, ld16);
        },
        [&](int, int64_t u, int64_t a0, int64_t a1) {
          item(s.q, s.scale, lda, static_cast<const int16_t*>(a16), r0, r1 - r0, u, a0, a1);
        });
  });
  return true;
}

template <typename Gemm>
void quantized_passes(QuantizeRowsFn quantize, uint8_t a_zero, int qmax, int64_t mr, const void* x, int64_t ldx,
                      bool x_bf16, int64_t m, int64_t k, int64_t k_pad, int nthreads, const Gemm& gemm) {
  quantized_passes16(quantize, nullptr, 0, a_zero, qmax, mr, x, ldx, x_bf16, m, k, k_pad, nthreads,
                     [&](const int8_t* q, const float* qs, int64_t lda, const int16_t*, int64_t r0, int64_t rows) {
                       gemm(q, qs, lda, r0, rows);
                     });
}

// 8-bit activations (the other int8 families' drivers call this one).
template <typename Gemm>
void quantized_passes(QuantizeRowsFn quantize, uint8_t a_zero, int64_t mr, const void* x, int64_t ldx, bool x_bf16,
                      int64_t m, int64_t k, int64_t k_pad, int nthreads, const Gemm& gemm) {
  quantized_passes(quantize, a_zero, kQmax8, mr, x, ldx, x_bf16, m, k, k_pad, nthreads, gemm);
}

// Whole linear: quantize x [m, k] with act_bits-bit activations (8 or 7, see
// select_kernel) and multiply. nthreads: OpenMP threads.
void linear(const void* x, int64_t ldx, bool x_bf16, int64_t m, int64_t k,
            const uint8_t* packed, const float* w_scale, const float* bias, void* y,
            int64_t ldy, bool y_bf16, int nthreads, int act_bits = 8);

// Multiply already-quantized int8 activations (row stride lda, k valid columns).
void gemm_prequantized(const int8_t* q, int64_t lda, const float* q_scale, int64_t m,
                       int64_t k, const uint8_t* packed, const float* w_scale,
                       const float* bias, void* y, int64_t ldy, bool y_bf16, int nthreads);

// Just the quantization (for tests and the standalone op): q is [m, k] int8
// in [-qmax, qmax] (qmax 127 or 63), by the selected ISA's quantizer.
void quantize_rows(const void* x, int64_t ldx, bool x_bf16, int64_t m, int64_t k,
                   int8_t* q, int64_t ldq, float* scale, int nthreads, int qmax = kQmax8);

// ---- per-ISA entry points (one file each) ---------------------------------
void quantize_rows_scalar(const void*, int64_t, bool, int64_t, int64_t, int64_t, int64_t,
                          int64_t, uint8_t, int, int8_t*, float*);
void quantize_rows_avx2(const void*, int64_t, bool, int64_t, int64_t, int64_t, int64_t,
                        int64_t, uint8_t, int, int8_t*, float*);
void quantize_rows_avx512(const void*, int64_t, bool, int64_t, int64_t, int64_t, int64_t,
                          int64_t, uint8_t, int, int8_t*, float*);
void qs8_gemm_1x64c4_scalar(const GemmArgs&, int64_t, int64_t, int64_t, int64_t);
void qs8_gemm_6x8c4_avx2(const GemmArgs&, int64_t, int64_t, int64_t, int64_t);
void qs8_gemm_4x16c4u7_avx2(const GemmArgs&, int64_t, int64_t, int64_t, int64_t);
// The 7-bit AVX2 kernel's quad-safe path: linear() hands it calls of at
// least qs_min_rows(n, k_pad) rows on packings with a quad-safe section; fewer
// rows take the 7-bit kernel on the plain panels. Below those row counts the
// transposition and the residual sums (and their second pass over the
// panels' rows) cost what the tile saves (measured, Golden Cove capped at
// AVX2, 2 threads, modules, against the 7-bit tile, with the 16-row columns
// of a one-thread transposition: 4096^2 x1.01 / 1.05 at 5 / 8 rows, 1024x4096
// x0.99 / 1.03 / 1.05 at 5 / 8 / 12 - 20; MiniLM's 1536x384 and 384x1536
// x0.92 / 0.97 at 8 rows, x0.98 / 1.03 at 16, x1.02 at 24). On layers of
// >= kQsHugeWeights weights it takes over from the k-blocked row path, which
// serves up to kRowPathRowsHuge rows there (see kAvx2U7RowPathRows).
constexpr int64_t kQsMinRows = 24;
constexpr int64_t kQsMinRowsHuge = kRowPathRowsHuge + 1;
constexpr int64_t kQsHugeWeights = kRowPathHugeWeights;
// k_pad: the layer's inputs rounded up to the k group (as the kernels count weights)
inline int64_t qs_min_rows(int64_t n, int64_t k_pad) { return n * k_pad >= kQsHugeWeights ? kQsMinRowsHuge : kQsMinRows; }
void linear_qs_avx2(const Kernel& kern, const void* x, int64_t ldx, bool x_bf16, int64_t m, int64_t k,
                    const uint8_t* packed, const float* w_scale, const float* bias, void* y, int64_t ldy,
                    bool y_bf16, int nthreads);
// The 8-bit AVX2 kernel's pair-safe path: linear() hands it calls of more
// than kAvx2RowPathRows rows on packings with a pair-safe section; fewer take
// the k-blocked row path, which streams the weights in address order while
// the rows compute, whereas the quarter tiles read 64 of every 256 bytes,
// which L3 and DRAM serve slowly. Weights from DRAM, 2 threads, against
// torch.ao at 2 - 4 rows: Zen 3 4096^2 pair-safe x0.58 - x0.71, the row path
// x1.00 - x1.12 (an AVX2 read of 16 MB in quarter order ran 7 - 12 GB/s
// against 14 in address order); Golden Cove capped at AVX2 4096^2 x0.93 -
// x0.98 -> x1.22 - x1.29, 1024x4096 x1.08 - x1.37 -> x1.54 - x1.76 (hot:
// x0.96 - x1.28 against x1.01 - x1.35).
constexpr int64_t kPs8MinRows = kAvx2RowPathRows + 1;
void linear_ps_avx2(const Kernel& kern, const void* x, int64_t ldx, bool x_bf16, int64_t m, int64_t k,
                    const uint8_t* packed, const float* w_scale, const float* bias, void* y, int64_t ldy,
                    bool y_bf16, int nthreads);
// AVX-VNNI level: the VEX build where the CPU has AVX-VNNI, else its EVEX twin
// (qs8_gemm_6x16c4_avxvnni.cpp); the two are exported for the encoding test.
void qs8_gemm_6x16c4_avxvnni(const GemmArgs&, int64_t, int64_t, int64_t, int64_t);
void qs8_gemm_6x16c4_avxvnni_vex(const GemmArgs&, int64_t, int64_t, int64_t, int64_t);
void qs8_gemm_6x16c4_avxvnni_evex(const GemmArgs&, int64_t, int64_t, int64_t, int64_t);
void qs8_gemm_4x64c4_avx512bw(const GemmArgs&, int64_t, int64_t, int64_t, int64_t);
void qs8_gemm_6x64c4_avx512vnni(const GemmArgs&, int64_t, int64_t, int64_t, int64_t);
// AMX-INT8 (built only where the compiler knows AMX: PYACCEL_AMX_BUILT)
void qs8_gemm_32x64c4_amx(const GemmArgs&, int64_t, int64_t, int64_t, int64_t);

inline uint16_t fp32_to_bf16(float f);

// for_each_row_tile: csrc/common/row_tiles.h (shared by every op's kernels)
using pyaccel::for_each_row_tile;

// The epilogue forms float(acc) * sx * sw as (float(acc) * lo) * (hi * sw),
// (lo, hi) = (sx, 1) when sx < 1, else (1, sx):
// - sx < 1: |acc * sx| < 2^31 cannot overflow and is >= sx (acc != 0), so a
//   tiny or subnormal sx costs only its own precision; sx * sw first would
//   underflow (sx = 7.9e-43, sw = 2e-4 gives 1.6e-46 -> 0).
// - sx >= 1 (or NaN): float(acc) * (sx * sw); |sx * sw| >= |sw| loses nothing
//   to underflow beyond sw's own, and huge activations do not overflow an
//   intermediate acc * sx.
// So y is accurate unless y itself is subnormal or beyond fp32. The reference
// (pyaccel.reference.int8_linear) and the Triton epilogue use the same split.
struct ScaleSplit {
  float lo, hi;
};
inline ScaleSplit split_scale(float sx) { return sx < 1.f ? ScaleSplit{sx, 1.f} : ScaleSplit{1.f, sx}; }

// Scalar output store shared by the portable kernels and the scalar tails:
// y[m, n] = v (+ bias[n]) as fp32 or bf16.
inline void store_output(void* y, int64_t ldy, bool y_bf16, const float* bias, int64_t m, int64_t n, float v) {
  if (bias) v += bias[n];
  if (y_bf16)
    static_cast<uint16_t*>(y)[m * ldy + n] = fp32_to_bf16(v);
  else
    static_cast<float*>(y)[m * ldy + n] = v;
}

// A row holding an inf or NaN quantizes to q = 0 with scale NaN, so its
// outputs are NaN (as the float layer's would be), never finite garbage.
inline void mark_nonfinite_row(int8_t* q_row, int64_t k_pad, uint8_t zero_point, float* scale) {
  for (int64_t i = 0; i < k_pad; ++i) q_row[i] = static_cast<int8_t>(zero_point);
  *scale = __builtin_nanf("");
}

// fp32 -> bf16, round to nearest even (what torch's .to(bfloat16) does).
inline uint16_t fp32_to_bf16(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float bf16_to_fp32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

}  // namespace int8_gemm
}  // namespace pyaccel
