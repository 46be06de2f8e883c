// 2:4 int8 GEMM, AVX2: 4 rows x 16 channels (half a panel, as two halves of 8);
// one row, and 2 - Mul::kRowPathRows rows (tile_rows_kb), take row paths over
// whole panels.
// Gather as in the VNNI kernel (vpshufb with per-channel control dwords, read
// from the packing's control table -- layout 5 -- or, without one, decoded
// once a call and panel for all its row tiles), multiply with
// int8_gemm's AVX2 sign trick: |a| x (v with a's sign), so the int16 pair sums
// of vpmaddubsw never saturate.
//
// The same tiles serve the AVX-VNNI level (qs8_s24_gemm_4x16_avxvnni): the
// multiply is one vpdpbusd on the gathered u8 activations (q ^ 0x80) and the
// epilogue subtracts comp = 128 * sum of the row's values. As in
// int8_gemm/qs8_gemm_6x16c4_avxvnni.cpp, a VEX build ("{vex} vpdpbusd",
// AVX-VNNI) and an EVEX twin (AVX-512 VNNI + VL, what AVX-512 machines capped
// at avx_vnni run and test) differ only in that instruction.
#include <immintrin.h>

#include <cstring>
#include <vector>

#include "common/cpu_features.h"
#include "common/line_prefetch.h"
#include "common/vnni_ymm.h"
#include "common/packed_header.h"
#include "common/parallel.h"
#include "int8_gemm/pair_safe_avx2.h"
#include "int8_gemm/qs8_gemm_avx2_tile.h"  // avx2_tile::store8, maddubs_step
#include "sparse24/sparse24_int8.h"

namespace pyaccel {
namespace sparse24_int8 {
namespace {

// int8_gemm's AVX2 epilogue (split_scale's products, bias, fp32 or bf16 out)
inline void store8(const GemmArgs& g, __m256i acc, float sa, int64_t m, int64_t n0) {
  int8_gemm::avx2_tile::store8(epilogue_args(g), acc, sa, m, n0);
}

// The multiply of 8 channels x 4 gathered activations x (int8 activations,
// sign trick)
struct SignMul {
  static constexpr int kOctetRows = 0;  // the 4 x 16 tile
  static constexpr bool kRowPrefetch = true;  // tile_row_table's prefetch stream
  static constexpr int kRowPathRows = kRowPathRowsAvx2;  // tile_rows_kb from 2 rows up to this many
  static void madd(__m256i& c, __m256i x, __m256i w, __m256i ones) {
    c = _mm256_add_epi32(c, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(x), _mm256_sign_epi8(w, x)), ones));
  }
  static __m256i finish(const GemmArgs&, __m256i acc, int64_t, int64_t) { return acc; }
};
// (u8 activations q ^ 0x80, vpdpbusd; Vex: the AVX-VNNI encoding, else EVEX)
template <bool Vex>
struct VnniMul {
  static constexpr int kOctetRows = 12;  // the 12 x 8 tile
  // none: at one vpdpbusd a step the prefetches cost more than they gain
  // (Golden Cove, M = 1: hot x1.00 - 1.02 -> x0.92 - 0.95 dense int8 on
  // MiniLM-sized layers, streamed x1.13 - 1.25 either way)
  static constexpr bool kRowPrefetch = false;
  static constexpr int kRowPathRows = kRowPathRowsAvxVnni;
  static void madd(__m256i& c, __m256i x, __m256i w, __m256i) { dpbusd_ymm<Vex>(c, x, w); }
  static __m256i finish(const GemmArgs& g, __m256i acc, int64_t, int64_t n0) {
    return _mm256_sub_epi32(acc, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g.comp + n0)));
  }
};

// (u8 activations q ^ 0x80 times the pair-safe values of a packing's
// section: vpmaddubsw's int16 pair sums stay in range, int8_gemm.h PsHeader;
// the epilogue adds the residual sums and subtracts comp)
struct PsMul {
  static constexpr int kOctetRows = 0;  // the 4 x 16 tile
  static constexpr bool kRowPrefetch = true;
  static constexpr int kRowPathRows = 0;  // gemm_ps runs the tiles only
  static void madd(__m256i& c, __m256i x, __m256i w, __m256i ones) { int8_gemm::avx2_tile::maddubs_step(c, w, x, ones); }
  static __m256i finish(const GemmArgs& g, __m256i acc, int64_t m, int64_t n0) {
    const __m256i comp = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g.comp + n0));
    const __m256i corr = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g.corr + m * kPanel + n0 % kPanel));
    return _mm256_sub_epi32(_mm256_add_epi32(acc, corr), comp);
  }
};

// The panel's control table (sparse24_int8.h, layout 5) decoded from its
// position bytes, for packings without one: per pair and 8 channels, 6 ops
// make the control dwords [i0, i1, 4 + j0, 4 + j1]: vpshufb copies pair j's
// byte b into bytes 0 - 1 of each dword and b >> 4 (from a copy of the
// positions shifted once a quad) into bytes 2 - 3; one AND leaves [i0, 4 *
// i1, j0, 4 * j1], one vpmaddubsw with [1, 64] per word makes them [i0, i1,
// j0, j1], one OR adds the second group's 4. Then one shift and one OR per
// two octets put the second octet's indices into the high nibbles.
void panel_controls(const GemmArgs& g, int64_t p, uint8_t* ctrl) {
  const uint8_t* b = g.w + p * g.quads * kQuadBytes;
  const __m256i fields = _mm256_set1_epi32(0x0C030C03), scale = _mm256_set1_epi16(0x4001);
  const __m256i plus4 = _mm256_set1_epi32(0x04040000);
  for (int64_t qb = 0; qb < g.quads; ++qb, b += kQuadBytes, ctrl += kCtrlQuadBytes) {
    __m256i pos[4], hi[4];
    for (int v = 0; v < 4; ++v) {
      pos[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + kQuadPosOffset + 32 * v));
      hi[v] = _mm256_srli_epi16(pos[v], 4);  // byte j's low nibble: b >> 4 (high nibble: junk)
    }
#pragma GCC unroll 4
    for (int j = 0; j < kQuadPairs; ++j) {
      // byte j of each dword into bytes 0, 1 (from pos) and 2, 3 (from hi)
      const __m256i pick = _mm256_add_epi8(_mm256_setr_epi8(0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12,
                                                            0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12),
                                           _mm256_set1_epi8(static_cast<char>(j)));
      __m256i c[4];
      for (int v = 0; v < 4; ++v) {
        const __m256i t = _mm256_blend_epi16(_mm256_shuffle_epi8(pos[v], pick), _mm256_shuffle_epi8(hi[v], pick), 0xAA);
        c[v] = _mm256_or_si256(_mm256_maddubs_epi16(_mm256_and_si256(t, fields), scale), plus4);
      }
      for (int h = 0; h < 2; ++h)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(ctrl + j * kCtrlPairBytes + h * kCtrlHalfBytes),
                            _mm256_or_si256(c[2 * h], _mm256_slli_epi16(c[2 * h + 1], 4)));
    }
  }
}

// The control pair (low nibbles, high nibbles) of a table's 32 bytes at t:
// the gather controls of octets 2h and 2h + 1.
inline __m256i ctrl_lo(const uint8_t* t) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t)); }
inline __m256i ctrl_hi(__m256i lo) { return _mm256_srli_epi16(lo, 4); }

// Where each row tile of panel p prefetches: kPfLines lines a quad of the
// next panel (the one this thread most likely runs next) into L2, in address
// order; later tiles wrap. (A panel here is 80 KiB + 32 KiB of controls at K
// = 4096, so two fit a 512 KiB L2; int8_gemm's 256 KiB panels prefetch one
// quarter ahead instead, avx2_tile::next_quarter_lines.) The tiles read half of each 128-byte pair block at a time, which the
// hardware prefetchers follow poorly from L3 / DRAM. The last panel
// prefetches itself.
constexpr int kPfLines = 3;
inline PanelChunks next_panel_lines(const GemmArgs& g, int64_t p) {
  const int64_t panel_bytes = g.quads * kQuadBytes;
  return PanelChunks(g.w + (p + 1 < (g.n + kPanel - 1) / kPanel ? p + 1 : p) * panel_bytes, panel_bytes,
                     g.quads * kPfLines * 64);
}
// ... and one line a quad of the next panel's control table (packings with one;
// else the tiles prefetch their own panel's scratch table, already in L1 / L2)
inline PanelChunks next_ctrl_lines(const GemmArgs& g, int64_t p, const uint8_t* cp) {
  const int64_t panel_bytes = g.quads * kCtrlQuadBytes;
  const uint8_t* next = g.ctrl && p + 1 < (g.n + kPanel - 1) / kPanel ? g.ctrl + (p + 1) * panel_bytes : cp;
  return PanelChunks(next, panel_bytes, g.quads * 64);
}

inline int64_t load_u64(const uint8_t* p) {
  int64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

// Rows [m, m + MR) x 16 channels (half of panel p). Named accumulators and
// row pointers: as arrays GCC kept the accumulators on the stack (a load and
// a store each per quad).
#define S24_ROW(r)                                                  \
  if constexpr (MR > r) {                                           \
    const __m256i ab = _mm256_set1_epi64x(load_u64(a##r + off));    \
    Mul::madd(c##r##0, _mm256_shuffle_epi8(ab, k0), v0, ones);      \
    Mul::madd(c##r##1, _mm256_shuffle_epi8(ab, k1), v1, ones);      \
  }
#define S24_STORE(r)                                                                              \
  if constexpr (MR > r) {                                                                         \
    store8(g, Mul::finish(g, c##r##0, m + r, n0), g.a_scale[m + r], m + r, n0);                   \
    store8(g, Mul::finish(g, c##r##1, m + r, n0 + 8), g.a_scale[m + r], m + r, n0 + 8);           \
  }
template <class Mul, int MR>
inline void tile(const GemmArgs& g, const uint8_t* cp, int64_t m, int64_t p, int half, const char* pf,
                 const char* pfc) {
  static_assert(MR >= 1 && MR <= 4, "tile rows");
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00,
          c31 = c00;
  const uint8_t* a0 = g.a + m * g.lda;
  const uint8_t* a1 = MR > 1 ? a0 + g.lda : a0;
  const uint8_t* a2 = MR > 2 ? a0 + 2 * g.lda : a0;
  const uint8_t* a3 = MR > 3 ? a0 + 3 * g.lda : a0;
  const uint8_t* b = g.w + p * g.quads * kQuadBytes + kQuadValOffset + 64 * half;  // channels 16 * half ..
  const uint8_t* t = cp + kCtrlHalfBytes * half;
  for (int64_t qb = 0; qb < g.quads;
       ++qb, b += kQuadBytes, t += kCtrlQuadBytes, pf += kPfLines * 64, pfc += 64) {
    for (int l = 0; l < kPfLines; ++l) _mm_prefetch(pf + 64 * l, _MM_HINT_T1);
    _mm_prefetch(pfc, _MM_HINT_T1);
#pragma GCC unroll 4
    for (int j = 0; j < kQuadPairs; ++j) {
      const int64_t off = kQuadInputs * qb + 8 * j;
      const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + j * kPairBytes));
      const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + j * kPairBytes + 32));
      const __m256i k0 = ctrl_lo(t + j * kCtrlPairBytes), k1 = ctrl_hi(k0);
      S24_ROW(0) S24_ROW(1) S24_ROW(2) S24_ROW(3)
    }
  }
  const int64_t n0 = p * kPanel + 16 * half;
  S24_STORE(0) S24_STORE(1) S24_STORE(2) S24_STORE(3)
}
#undef S24_ROW
#undef S24_STORE

// ---- AVX-VNNI: 12 rows x 8 channels ------------------------------------------
// Per pair of groups one control and one value register serve 12 rows: per
// row a broadcast load, one vpshufb and one vpdpbusd. 12 accumulators (ymm
// vpdpbusd has a latency of 5 at 2 a cycle on Golden Cove: 10 chains keep it
// busy), named variables (GCC keeps an array of them on the stack).
#define S24V_ALL(OP) OP(0) OP(1) OP(2) OP(3) OP(4) OP(5) OP(6) OP(7) OP(8) OP(9) OP(10) OP(11)
#define S24V_DECL(r) __m256i c##r = _mm256_setzero_si256();
#define S24V_ROW(r)                                                                          \
  if (MR > r) {                                                                              \
    const __m256i ab = _mm256_set1_epi64x(load_u64(a0 + (r) * g.lda + kQuadInputs * qb + 8 * j)); \
    Mul::madd(c##r, _mm256_shuffle_epi8(ab, k), v, ones);                                    \
  }
#define S24V_STORE(r) \
  if (MR > r) store8(g, Mul::finish(g, c##r, m + r, n0), g.a_scale[m + r], m + r, n0);

// MR rows (<= 12) x channels 8 * oct .. 8 * oct + 8 of panel p
template <class Mul, int MR>
inline void tile_octet(const GemmArgs& g, const uint8_t* cp, int64_t m, int64_t p, int oct) {
  const __m256i ones = _mm256_set1_epi16(1);
  S24V_ALL(S24V_DECL)
  const uint8_t* a0 = g.a + m * g.lda;
  const uint8_t* b = g.w + p * g.quads * kQuadBytes + kQuadValOffset + 32 * oct;
  const uint8_t* t = cp + kCtrlHalfBytes * (oct / 2);
  const __m128i nibble = _mm_cvtsi32_si128(4 * (oct % 2));  // octet 2h + 1: the high nibbles
  for (int64_t qb = 0; qb < g.quads; ++qb, b += kQuadBytes, t += kCtrlQuadBytes) {
#pragma GCC unroll 4
    for (int j = 0; j < kQuadPairs; ++j) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + j * kPairBytes));
      const __m256i k = _mm256_srl_epi16(ctrl_lo(t + j * kCtrlPairBytes), nibble);
      S24V_ALL(S24V_ROW)
    }
  }
  const int64_t n0 = p * kPanel + 8 * oct;
  S24V_ALL(S24V_STORE)
}

// ---- one row (M = 1) -----------------------------------------------------------
// At one row the control decoding is most of the work (24 of 37 ops per 16
// channels and pair of groups with the 12-op decoding panel_controls had
// before); the path below needs 24 in all. Measured on Zen 4 capped at AVX2,
// interleaved with the 4-row tile at M = 1: 1.0 - 1.35x (hot and streamed,
// the four issue-3 shapes). It decodes a control in 4 ops: pshufb copies pair j's
// byte b into all four bytes of the channel's dword, one AND keeps b's two
// fields in place -- byte 0 = i0 (0..3), byte 1 = 4 * i1 (0, 4, 8, 12) --
// and b >> 4 gives group g + 1's fields the same way. The activations come
// from per-group 16-byte lanes built once per call, laid out for exactly
// those indices: slots 0..3 = x[4g .. 4g + 3], slots 4, 8, 12 = x[4g + 1 .. 4g + 3]
// (slot 0 serves both). One pshufb per group and a word blend then give the
// channel's [x(i0), x(i1), x(j0), x(j1)].

// lanes[16 g .. 16 g + 16) for the groups of one quantized row (a_stride bytes)
void build_lanes(const int8_t* a, int64_t groups, int8_t* lanes) {
  // per 128-bit half: the lane of group 2h of the 4 groups in the loaded 16 bytes
  // (pattern A) or of group 2h + 1 (pattern B); 0x80 zeroes the unused slots
  const __m256i pa = _mm256_setr_epi8(0, 1, 2, 3, 1, -128, -128, -128, 2, -128, -128, -128, 3, -128, -128, -128,
                                      8, 9, 10, 11, 9, -128, -128, -128, 10, -128, -128, -128, 11, -128, -128, -128);
  const __m256i pb = _mm256_add_epi8(pa, _mm256_set1_epi8(4));  // 0x80 + 4 keeps bit 7: still zero
  for (int64_t g = 0; g < groups; g += 4) {  // groups: 8 per quad
    const __m256i x = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + 4 * g)));
    const __m256i la = _mm256_shuffle_epi8(x, pa), lb = _mm256_shuffle_epi8(x, pb);  // groups g, g+2 | g+1, g+3
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(lanes + 16 * g), _mm256_permute2x128_si256(la, lb, 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(lanes + 16 * g + 32), _mm256_permute2x128_si256(la, lb, 0x31));
  }
}

// One row x one whole panel (32 channels: the panel's bytes in address order,
// and each activation lane load serves 32 channels).
template <class Mul>
inline void tile_row(const GemmArgs& g, const int8_t* lanes, int64_t m, int64_t p) {
  const __m256i ones = _mm256_set1_epi16(1), fields = _mm256_set1_epi32(0x0C030C03);
  const __m256i dwords = _mm256_setr_epi32(0, 0x04040404, 0x08080808, 0x0C0C0C0C, 0, 0x04040404, 0x08080808, 0x0C0C0C0C);
  __m256i c[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
  const uint8_t* b = g.w + p * g.quads * kQuadBytes;
  for (int64_t qb = 0; qb < g.quads; ++qb, b += kQuadBytes) {
    __m256i pos[4];
    for (int v = 0; v < 4; ++v) pos[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + kQuadPosOffset + 32 * v));
    const int8_t* lq = lanes + 16 * 8 * qb;
#pragma GCC unroll 4
    for (int j = 0; j < kQuadPairs; ++j) {
      const uint8_t* bj = b + kQuadValOffset + j * kPairBytes;
      // byte j of each dword into all four of its bytes
      const __m256i bc = _mm256_add_epi8(dwords, _mm256_set1_epi8(static_cast<char>(j)));
      const __m256i lg = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lq + 32 * j)));
      const __m256i lh = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lq + 32 * j + 16)));
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) {  // channels 8v .. 8v + 8
        const __m256i t = _mm256_shuffle_epi8(pos[v], bc);
        // words 0 (group g) from lg by b's low fields, words 1 (group g + 1) from lh by b >> 4
        const __m256i x = _mm256_blend_epi16(_mm256_shuffle_epi8(lg, _mm256_and_si256(t, fields)),
                                             _mm256_shuffle_epi8(lh, _mm256_and_si256(_mm256_srli_epi32(t, 4), fields)),
                                             0xAA);
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bj + 32 * v));
        Mul::madd(c[v], x, w, ones);
      }
    }
  }
  for (int v = 0; v < 4 && p * kPanel + 8 * v < g.n; ++v)
    store8(g, Mul::finish(g, c[v], m, p * kPanel + 8 * v), g.a_scale[m], m, p * kPanel + 8 * v);
}

// One row x one whole panel from the control table: per pair of groups one
// broadcast of the row's 8 inputs, two table loads and two shifts serve the 4
// octets, then per octet one vpshufb and the multiply (Mul). Named
// accumulators (as an array GCC kept them on the stack). With
// Mul::kRowPrefetch (the AVX2 sign-trick and pair-safe steps) each quad pulls the
// values (8 lines) and table lines (4) of the quad kRowPfQuads on into L2
// (prefetcht1; past the panel's end that is the next panel's, which packings
// and tables hold contiguously): the value stream skips the quads' position
// bytes, and without it, weights from DRAM, the path ran x0.61 - x1.11 of
// dense int8 and bimodal on MiniLM-sized layers; with it x1.06 - x1.36
// (Golden Cove capped at AVX2, M = 1, 2 threads, in-process, 21 rounds;
// 384x1536, 1536x384, 1024x4096, 4096^2), at a 5 - 8 % cost on cached
// MiniLM-sized layers (x1.16 - 1.22 -> x1.08 - 1.13 hot). 2, 8 and 16 quads
// ahead ran the same; prefetcht0 no better.
constexpr int64_t kRowPfQuads = 4;
template <class Mul>
inline void tile_row_table(const GemmArgs& g, const uint8_t* cp, int64_t m, int64_t p) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0;
  const uint8_t* a = g.a + m * g.lda;
  const uint8_t* b = g.w + p * g.quads * kQuadBytes + kQuadValOffset;
  const uint8_t* t = cp;
  for (int64_t qb = 0; qb < g.quads; ++qb, b += kQuadBytes, t += kCtrlQuadBytes) {
    if constexpr (Mul::kRowPrefetch) {
      const char* pv = reinterpret_cast<const char*>(b + kRowPfQuads * kQuadBytes);
      const char* pt = reinterpret_cast<const char*>(t + kRowPfQuads * kCtrlQuadBytes);
#pragma GCC unroll 8
      for (int i = 0; i < kQuadPairs * kPairBytes / 64; ++i) _mm_prefetch(pv + 64 * i, _MM_HINT_T1);
#pragma GCC unroll 4
      for (int i = 0; i < kCtrlQuadBytes / 64; ++i) _mm_prefetch(pt + 64 * i, _MM_HINT_T1);
    }
#pragma GCC unroll 4
    for (int j = 0; j < kQuadPairs; ++j) {
      const __m256i ab = _mm256_set1_epi64x(load_u64(a + kQuadInputs * qb + 8 * j));
      const __m256i k0 = ctrl_lo(t + j * kCtrlPairBytes), k2 = ctrl_lo(t + j * kCtrlPairBytes + kCtrlHalfBytes);
      const uint8_t* bj = b + j * kPairBytes;
      Mul::madd(c0, _mm256_shuffle_epi8(ab, k0), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bj)), ones);
      Mul::madd(c1, _mm256_shuffle_epi8(ab, ctrl_hi(k0)), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bj + 32)),
                ones);
      Mul::madd(c2, _mm256_shuffle_epi8(ab, k2), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bj + 64)), ones);
      Mul::madd(c3, _mm256_shuffle_epi8(ab, ctrl_hi(k2)), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bj + 96)),
                ones);
    }
  }
  const __m256i acc[4] = {c0, c1, c2, c3};
  for (int v = 0; v < 4 && p * kPanel + 8 * v < g.n; ++v)
    store8(g, Mul::finish(g, acc[v], m, p * kPanel + 8 * v), g.a_scale[m], m, p * kPanel + 8 * v);
}

// ---- 2 - Mul::kRowPathRows rows: the k-blocked row path ------------------------
// Rows x one whole panel from the control table, in k-blocks of
// kRowsKbQuads quads: per k-block the rows go in passes of two (one pass of
// one for an odd last row), each pass's 8 partial sums in registers over the
// k-block, in L1 (`sums`) between k-blocks. Per pair of groups a pass loads
// the 4 value registers and 2 table registers once for both rows, then per
// row one broadcast of its 8 inputs and per octet one vpshufb and the
// multiply (Mul). The panel's bytes go in address order (the 4 x 16 tile
// reads half of each 128-byte pair block per pass, which L3 and DRAM serve
// slowly), the passes after the first read the k-block from L1. One software
// stream pulls the values (8 lines a quad) and table lines (4) of the quad
// kRowsKbPfQuads on into L2 (prefetcht1), spread over the passes (pass i of
// np issues lines i, i + np, ...), so that the weights stream while every
// row computes; past the panel's end it runs into the next panel's (packings
// and tables hold panels contiguously; a scratch table's overrun is only
// prefetched). Measured on Golden Cove, 2 threads, modules in-process
// against dense int8 (which runs its own k-blocked row path there), weights
// cycled from DRAM / cached: 4096^2 and 1024x4096 at 2 - 4 rows x0.79 - 1.07
// -> x1.05 - 1.43 / x1.05 - 1.43 -> x1.13 - 1.29 at avx2; at avx_vnni, 2 -
// 6 rows x0.81 - 1.03 -> x1.06 - 1.24 / x1.12 - 1.52 -> x1.10 - 1.36 (README.md).
constexpr int64_t kRowsKbQuads = 3;
constexpr int64_t kRowsKbPfQuads = 6;
constexpr int kRowsKbMaxRows = 8;
constexpr int kQuadValueLines = static_cast<int>(kQuadPairs * kPairBytes / 64);              // 8
constexpr int kQuadLines = kQuadValueLines + static_cast<int>(kCtrlQuadBytes / 64);  // + 4 table lines
static_assert(kRowPathRowsAvx2 <= kRowsKbMaxRows && kRowPathRowsAvxVnni <= kRowsKbMaxRows, "tile_rows_kb's sums");

// One pass: rows m, m + RP - 1 (RP = 1 or 2) x quads [kb, ke) of panel p
// (b: its values, t: its table lines at quad kb); partial sums in sm (RP x 4
// registers) unless first, the outputs stored when last. Pass ip of np
// issues the prefetch lines ip, ip + np, ... of each quad.
template <class Mul, int RP>
inline void kb_pass(const GemmArgs& g, const uint8_t* b, const uint8_t* t, int64_t kb, int64_t ke, int64_t m,
                    int64_t p, __m256i* sm, bool first, bool last, int ip, int np) {
  static_assert(RP == 1 || RP == 2, "rows a pass");
  const __m256i ones = _mm256_set1_epi16(1), z = _mm256_setzero_si256();
  __m256i c00 = first ? z : _mm256_load_si256(sm), c01 = first ? z : _mm256_load_si256(sm + 1),
          c02 = first ? z : _mm256_load_si256(sm + 2), c03 = first ? z : _mm256_load_si256(sm + 3);
  __m256i c10 = z, c11 = z, c12 = z, c13 = z;
  if (RP > 1 && !first) {
    c10 = _mm256_load_si256(sm + 4);
    c11 = _mm256_load_si256(sm + 5);
    c12 = _mm256_load_si256(sm + 6);
    c13 = _mm256_load_si256(sm + 7);
  }
  const uint8_t* a0 = g.a + m * g.lda;
  const uint8_t* a1 = RP > 1 ? a0 + g.lda : a0;
  for (int64_t qb = kb; qb < ke; ++qb, b += kQuadBytes, t += kCtrlQuadBytes) {
    const char* pv = reinterpret_cast<const char*>(b + kRowsKbPfQuads * kQuadBytes);
    const char* pt = reinterpret_cast<const char*>(t + kRowsKbPfQuads * kCtrlQuadBytes);
    for (int l = ip; l < kQuadLines; l += np) _mm_prefetch(l < kQuadValueLines ? pv + 64 * l : pt + 64 * (l - kQuadValueLines), _MM_HINT_T1);
#pragma GCC unroll 4
    for (int j = 0; j < kQuadPairs; ++j) {
      const __m256i ab0 = _mm256_set1_epi64x(load_u64(a0 + kQuadInputs * qb + 8 * j));
      const __m256i ab1 = RP > 1 ? _mm256_set1_epi64x(load_u64(a1 + kQuadInputs * qb + 8 * j)) : ab0;
      const uint8_t* bj = b + j * kPairBytes;
#define S24KB_OCTETS(h, ca, cb, da, db)                                                              \
  {                                                                                                  \
    const __m256i k = ctrl_lo(t + j * kCtrlPairBytes + (h) * kCtrlHalfBytes), kh = ctrl_hi(k);       \
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bj + 64 * (h)));          \
    Mul::madd(ca, _mm256_shuffle_epi8(ab0, k), w, ones);                                             \
    if (RP > 1) Mul::madd(da, _mm256_shuffle_epi8(ab1, k), w, ones);                                 \
    const __m256i wh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bj + 64 * (h) + 32));    \
    Mul::madd(cb, _mm256_shuffle_epi8(ab0, kh), wh, ones);                                           \
    if (RP > 1) Mul::madd(db, _mm256_shuffle_epi8(ab1, kh), wh, ones);                               \
  }
      S24KB_OCTETS(0, c00, c01, c10, c11)
      S24KB_OCTETS(1, c02, c03, c12, c13)
#undef S24KB_OCTETS
    }
  }
  const __m256i acc[8] = {c00, c01, c02, c03, c10, c11, c12, c13};
  for (int r = 0; r < RP; ++r) {
    if (!last) {
      for (int v = 0; v < 4; ++v) _mm256_store_si256(sm + 4 * r + v, acc[4 * r + v]);
      continue;
    }
    for (int v = 0; v < 4 && p * kPanel + 8 * v < g.n; ++v)
      store8(g, Mul::finish(g, acc[4 * r + v], m + r, p * kPanel + 8 * v), g.a_scale[m + r], m + r,
             p * kPanel + 8 * v);
  }
}

// Rows [m0, m1) (2 - kRowsKbMaxRows) x panel p (cp: its control table)
template <class Mul>
inline void tile_rows_kb(const GemmArgs& g, const uint8_t* cp, int64_t m0, int64_t m1, int64_t p) {
  const int64_t rows = m1 - m0;
  alignas(32) int32_t sums[kRowsKbMaxRows][kPanel];
  const uint8_t* const values = g.w + p * g.quads * kQuadBytes + kQuadValOffset;
  const int np = static_cast<int>((rows + 1) / 2);
  for (int64_t kb = 0; kb < g.quads; kb += kRowsKbQuads) {
    const int64_t ke = kb + kRowsKbQuads < g.quads ? kb + kRowsKbQuads : g.quads;
    const uint8_t* b = values + kb * kQuadBytes;
    const uint8_t* t = cp + kb * kCtrlQuadBytes;
    const bool first = kb == 0, last = ke == g.quads;
    for (int64_t r = 0; r < rows; r += 2) {
      __m256i* sm = reinterpret_cast<__m256i*>(sums[r]);
      const int ip = static_cast<int>(r / 2);
      if (r + 1 < rows)
        kb_pass<Mul, 2>(g, b, t, kb, ke, m0 + r, p, sm, first, last, ip, np);
      else
        kb_pass<Mul, 1>(g, b, t, kb, ke, m0 + r, p, sm, first, last, ip, np);
    }
  }
}

thread_local std::vector<int8_t> t_lanes;
thread_local std::vector<uint8_t> t_ctrl;

// Panel p's control table: the packing's (layout 5), else decoded into this
// thread's scratch.
inline const uint8_t* panel_table(const GemmArgs& g, int64_t p) {
  if (g.ctrl) return g.ctrl + p * g.quads * kCtrlQuadBytes;
  const size_t bytes = static_cast<size_t>(g.quads * kCtrlQuadBytes);
  if (t_ctrl.size() < bytes) t_ctrl.resize(bytes);
  panel_controls(g, p, t_ctrl.data());
  return t_ctrl.data();
}

template <class Mul>
inline void gemm(const GemmArgs& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  if (m1 - m0 == 1) {
    // from the packing's control table where it has one, on every layer
    // size: decoding in the loop (the lanes path) costs less only while the
    // weights stream from DRAM, where the table is 40 % more bytes (see
    // README.md for both sides measured)
    if (g.ctrl) {
      for (int64_t p = p0; p < p1; ++p) tile_row_table<Mul>(g, panel_table(g, p), m0, p);
      return;
    }
    const int64_t groups = 8 * g.quads;
    if (t_lanes.size() < static_cast<size_t>(16 * groups)) t_lanes.resize(16 * groups);
    build_lanes(reinterpret_cast<const int8_t*>(g.a + m0 * g.lda), groups, t_lanes.data());
    for (int64_t p = p0; p < p1; ++p) tile_row<Mul>(g, t_lanes.data(), m0, p);
    return;
  }
  if constexpr (Mul::kRowPathRows > 1) {
    if (m1 - m0 <= Mul::kRowPathRows) {
      for (int64_t p = p0; p < p1; ++p) tile_rows_kb<Mul>(g, panel_table(g, p), m0, m1, p);
      return;
    }
  }
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* cp = panel_table(g, p);
    if constexpr (Mul::kOctetRows > 0) {
      if (m1 - m0 >= Mul::kOctetRows) {
        for (int oct = 0; oct < 4 && p * kPanel + 8 * oct < g.n; ++oct)
          int8_gemm::for_each_row_tile<Mul::kOctetRows>(
              m0, m1, [&](int64_t m, auto h) { tile_octet<Mul, h()>(g, cp, m, p, oct); });
        continue;
      }
    }
    PanelChunks pf = next_panel_lines(g, p), pfc = next_ctrl_lines(g, p, cp);
    for (int half = 0; half < 2 && p * kPanel + 16 * half < g.n; ++half)
      int8_gemm::for_each_row_tile<4>(
          m0, m1, [&](int64_t m, auto h) { tile<Mul, h()>(g, cp, m, p, half, pf.take(), pfc.take()); });
  }
}

thread_local std::vector<int32_t> t_corr;

// Rows [m0, m1) (m0 a multiple of 16) x panel p on a pair-safe section's
// quads: the panel's residual sums, then the 4 x 16 tiles.
void gemm_ps(const GemmArgs& g0, const int8_gemm::pair_safe::Residuals& res, const uint8_t* ut, int64_t ldt,
             int64_t m0, int64_t m1, int64_t p) {
  if (t_corr.size() < static_cast<size_t>((m1 - m0) * kPanel)) t_corr.resize((m1 - m0) * kPanel);
  int8_gemm::pair_safe::panel_residuals<kPanel>(res, ut, ldt, m0, m1, p * kPanel, t_corr.data());
  GemmArgs g = g0;
  // finish() indexes corr by the absolute row m
  g.corr = reinterpret_cast<const int32_t*>(reinterpret_cast<uintptr_t>(t_corr.data()) - m0 * kPanel * 4);
  const uint8_t* cp = panel_table(g, p);
  PanelChunks pf = next_panel_lines(g, p), pfc = next_ctrl_lines(g, p, cp);
  for (int half = 0; half < 2 && p * kPanel + 16 * half < g.n; ++half)
    int8_gemm::for_each_row_tile<4>(
        m0, m1, [&](int64_t m, auto h) { tile<PsMul, h()>(g, cp, m, p, half, pf.take(), pfc.take()); });
}

}  // namespace

void linear_ps_avx2(int8_gemm::QuantizeRowsFn quantize, const void* x, int64_t ldx, bool x_bf16, int64_t m,
                    int64_t k, const uint8_t* packed, const float* w_scale, const float* bias, void* y, int64_t ldy,
                    bool y_bf16, int nthreads) {
  PackedHeader h;
  std::memcpy(&h, packed, sizeof(h));
  const int8_gemm::pair_safe::Section sec = int8_gemm::pair_safe::section_of(packed + h.ps_offset);
  const size_t ysize = y_bf16 ? 2 : 4;
  auto pass_args = [&](const int8_t* q, const float* qs, int64_t lda, int64_t r0, int64_t rows) {
    GemmArgs g{reinterpret_cast<const uint8_t*>(q), lda, qs, sec.panels,
               reinterpret_cast<const int32_t*>(packed + h.comp_offset), w_scale, bias,
               static_cast<char*>(y) + r0 * ldy * ysize, ldy, y_bf16, rows, h.n, h.quads};
    g.ctrl = ctrl_table(packed);
    return g;
  };
  namespace ps = int8_gemm::pair_safe;
  if (ps::affine_passes(quantize, 0x80, int8_gemm::kQmax8, x, ldx, x_bf16, m, k, kQuadInputs * h.quads, kPanel,
                        h.n_pad / kPanel, nthreads, [&](const ps::PassView& v, int64_t p, int64_t a0, int64_t a1) {
                          gemm_ps(pass_args(v.q, v.qs, v.lda, v.r0, v.rows), sec.res, v.ut, v.ldt, a0, a1, p);
                        }))
    return;
  ps::transposed_passes(
      quantize, 0x80, int8_gemm::kQmax8, x, ldx, x_bf16, m, k, kQuadInputs * h.quads, kPanel, nthreads,
      [&](const int8_t* q, const float* qs, int64_t lda, const uint8_t* ut, int64_t ldt, int64_t r0, int64_t rows) {
        const GemmArgs g = pass_args(q, qs, lda, r0, rows);
        parallel_units_rows(h.n_pad / kPanel, rows, 16, nthreads,
                            [&](int64_t p, int64_t a0, int64_t a1) { gemm_ps(g, sec.res, ut, ldt, a0, a1, p); });
      });
}

void qs8_s24_gemm_4x16_avx2(const GemmArgs& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  gemm<SignMul>(g, m0, m1, p0, p1);
}

// The AVX-VNNI level's two encodings, each one function with everything
// inlined (flatten) for the encoding test (tests/ops/test_int8_avxvnni.py).
__attribute__((flatten, noinline)) void qs8_s24_gemm_4x16_avxvnni_vex(const GemmArgs& g, int64_t m0, int64_t m1,
                                                                      int64_t p0, int64_t p1) {
  gemm<VnniMul<true>>(g, m0, m1, p0, p1);
}
__attribute__((flatten, noinline)) void qs8_s24_gemm_4x16_avxvnni_evex(const GemmArgs& g, int64_t m0, int64_t m1,
                                                                       int64_t p0, int64_t p1) {
  gemm<VnniMul<false>>(g, m0, m1, p0, p1);
}
void qs8_s24_gemm_4x16_avxvnni(const GemmArgs& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  static const auto build = avx_vnni_build(&qs8_s24_gemm_4x16_avxvnni_vex, &qs8_s24_gemm_4x16_avxvnni_evex);
  build(g, m0, m1, p0, p1);
}

}  // namespace sparse24_int8
}  // namespace pyaccel
