// int8 GEMM micro-kernel, AMX-INT8 (Intel AMX, `tdpbusd`): 32 rows x 32
// channels per tile pass, a 64-channel panel in two passes.
//
// tdpbusd (Intel SDM, TDPBUSD) adds to each int32 element C[m][n] of a tile
// the products of the 4·KB/4 uint8 bytes of row m of A with the int8 bytes of
// column n of B, where B holds 4 consecutive k of one channel per 32-bit
// element: for KB = 64 bytes of k, A is 16 rows x 64 bytes and B is 16 rows
// (k groups of 4) x 16 channels x 4 bytes. That is exactly one k group row of
// the NR64K4 panel (64 channels x 4 bytes = 256 bytes) cut to 16 channels, so
// B tiles load straight from the packed panel with a 256-byte row stride:
// the same packing serves every ISA. Activations are q ^ 0x80 (uint8), and
// the epilogue subtracts comp[n] = 128 * sum_k w[n, k], as in the AVX-512
// VNNI kernel; no saturation (int32 wraps only past k ~ 66 000).
//
// Tiles (one configuration, every tile 16 rows x 64 bytes): tmm0-3 the int32
// accumulators of 2 row blocks x 2 channel blocks, tmm4-5 the two row
// blocks' activations, tmm6-7 the two channel blocks' weights: per 64 k,
// 4 loads and 4 tdpbusd. The accumulators go to a thread's int32 buffer,
// where k groups past the last whole 64 (k_pad % 64, at most 15 groups) are
// added with zmm vpdpbusd, then the AVX-512 epilogue dequantizes.
//
// Rows: blocks of 16; a block with fewer valid rows reads them from a copy
// padded to 16 (the extra rows' results are not stored). Calls of fewer than
// kAmxMinRows rows run the AVX-512 VNNI kernel (same encoding, same exact
// int32 sums, so the same outputs).
//
// The OS must grant the process the AMX tile state first (Linux:
// arch_prctl(ARCH_REQ_XCOMP_PERM)); cpu_features.cpp asks once, when the
// level is first selected, and the level is only selected when granted. Each call loads its own tile
// configuration and releases the tiles at the end, so other AMX code on the
// thread (oneDNN's) never sees ours and we never rely on theirs.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "common/line_prefetch.h"
#include "int8_gemm/epilogue_avx512.h"
#include "int8_gemm/int8_gemm.h"

namespace pyaccel {
namespace int8_gemm {
namespace {

constexpr int kRows = 16;       // rows per AMX tile
constexpr int kKBytes = 64;     // k bytes per tdpbusd step (16 groups of 4)
constexpr int kPanelBytes = kPanel * kKGroup;  // one k group row of a panel: 256 bytes

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
static_assert(sizeof(TileConfig) == 64, "LDTILECFG reads 64 bytes");

// GCC's AMX intrinsics declare no memory operands (tileloadd, tilestored) or
// only 8 bytes (ldtilecfg): a compiler barrier orders plain stores before the
// tile instructions that read them, and the tile stores before plain loads.
inline void compiler_barrier() { __asm__ volatile("" ::: "memory"); }

inline void configure_tiles() {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = kKBytes;
    cfg.rows[t] = kRows;
  }
  compiler_barrier();  // the cfg stores before ldtilecfg
  _tile_loadconfig(&cfg);
}

// One tile pass: the int32 sums of row blocks a0 (rows 0-15) and a1 (rows
// 16-31; TwoBlocks false: none) x channels [16 * cb, 16 * cb + 32) of the
// panel over all `steps` k steps (64 k each), stored to acc [32][64] int32
// (row stride kPanel).
template <bool TwoBlocks>
inline void pass(const int8_t* a0, const int8_t* a1, int64_t lda, const int8_t* panel, int cb, int64_t steps,
                 int32_t* acc, LinePrefetch& pf) {
  compiler_barrier();  // finish()'s plain loads and stores of acc before the tile stores below
  constexpr int64_t ldc = kPanel * sizeof(int32_t);
  int32_t* c0 = acc + cb * 16;
  int32_t* c1 = acc + kRows * kPanel + cb * 16;
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (TwoBlocks) {
    _tile_zero(2);
    _tile_zero(3);
  }
  const int8_t* b = panel + cb * 64;
  for (int64_t s = 0; s < steps; ++s, b += 16 * kPanelBytes) {
    pf.step();
    _tile_loadd(4, a0 + s * kKBytes, lda);
    _tile_loadd(6, b, kPanelBytes);
    _tile_loadd(7, b + 64, kPanelBytes);
    _tile_dpbusd(0, 4, 6);
    _tile_dpbusd(1, 4, 7);
    if constexpr (TwoBlocks) {
      _tile_loadd(5, a1 + s * kKBytes, lda);
      _tile_dpbusd(2, 5, 6);
      _tile_dpbusd(3, 5, 7);
    }
  }
  _tile_stored(0, c0, ldc);
  _tile_stored(1, c0 + 16, ldc);
  if constexpr (TwoBlocks) {
    _tile_stored(2, c1, ldc);
    _tile_stored(3, c1 + 16, ldc);
  }
  compiler_barrier();  // finish() reads acc with plain loads
}

// The k groups past the whole 64-byte steps (zmm vpdpbusd into the sums),
// then the epilogue: rows [m, m + rows) (rows <= 32) of panel p from acc.
void finish(const GemmArgs& g, const int8_t* a0, const int8_t* a1, int64_t m, int64_t rows, int64_t p,
            const int8_t* panel, int32_t* acc) {
  const int64_t groups = g.k_pad / kKGroup;
  const int64_t g0 = g.k_pad / kKBytes * (kKBytes / kKGroup);
  if (g0 < groups) {
    for (int64_t r = 0; r < rows; ++r) {
      const int8_t* ar = (r < kRows ? a0 + r * g.lda : a1 + (r - kRows) * g.lda);
      int32_t* cr = acc + r * kPanel;
      __m512i c0 = _mm512_loadu_si512(cr), c1 = _mm512_loadu_si512(cr + 16),
              c2 = _mm512_loadu_si512(cr + 32), c3 = _mm512_loadu_si512(cr + 48);
      const int8_t* b = panel + g0 * kPanelBytes;
      for (int64_t grp = g0; grp < groups; ++grp, b += kPanelBytes) {
        const __m512i av = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(ar + grp * kKGroup));
        c0 = _mm512_dpbusd_epi32(c0, av, _mm512_loadu_si512(b));
        c1 = _mm512_dpbusd_epi32(c1, av, _mm512_loadu_si512(b + 64));
        c2 = _mm512_dpbusd_epi32(c2, av, _mm512_loadu_si512(b + 128));
        c3 = _mm512_dpbusd_epi32(c3, av, _mm512_loadu_si512(b + 192));
      }
      _mm512_storeu_si512(cr, c0);
      _mm512_storeu_si512(cr + 16, c1);
      _mm512_storeu_si512(cr + 32, c2);
      _mm512_storeu_si512(cr + 48, c3);
    }
  }
  const int32_t* comp = g.comp + p * kPanel;
  const int64_t n0 = p * kPanel;
  for (int64_t r = 0; r < rows; ++r) {
    const float sa = g.a_scale[m + r];
    const int32_t* cr = acc + r * kPanel;
    for (int j = 0; j < 4; ++j)
      avx512::store16(g, _mm512_sub_epi32(_mm512_loadu_si512(cr + 16 * j), _mm512_loadu_si512(comp + 16 * j)), sa,
                      m + r, n0 + 16 * j);
  }
}

// Rows whose activations (kGroupRows x k_pad bytes: 1 MiB at k = 4096) stay
// in L2 while a call's panels stream past them.
constexpr int64_t kGroupRows = 256;

struct Scratch {
  alignas(64) int32_t acc[2 * kRows * kPanel];
  std::vector<int8_t> pad;  // the short last row block, padded to 16 rows
};
thread_local Scratch t_scratch;

}  // namespace

void qs8_gemm_32x64c4_amx(const GemmArgs& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  const int64_t rows = m1 - m0;
  if (rows <= 0) return;
  if (rows < kAmxMinRows) return qs8_gemm_6x64c4_avx512vnni(g, m0, m1, p0, p1);
  Scratch& s = t_scratch;
  const int64_t groups = g.k_pad / kKGroup, steps = g.k_pad / kKBytes;
  // the short last row block (rows % 16 != 0): its rows, then copies of its last row, padded to 16
  const int64_t short_at = m0 + rows / kRows * kRows;
  if (short_at < m1) {
    if (s.pad.size() < static_cast<size_t>(kRows * g.lda)) s.pad.resize(kRows * g.lda);
    for (int64_t i = 0; i < kRows; ++i)
      std::memcpy(s.pad.data() + i * g.lda, g.a + std::min(short_at + i, m1 - 1) * g.lda, g.k_pad);
    compiler_barrier();  // the copy before the tile loads that read it
  }
  const auto rows_at = [&](int64_t m) { return m == short_at ? s.pad.data() : g.a + m * g.lda; };
  configure_tiles();
  for (int64_t mg = m0; mg < m1; mg += kGroupRows) {
    const int64_t mg1 = std::min(m1, mg + kGroupRows);
    const int64_t blocks = (mg1 - mg + 2 * kRows - 1) / (2 * kRows);
    for (int64_t p = p0; p < p1; ++p) {
      const int8_t* panel = g.w + p * groups * kPanelBytes;
      // the next panel into L2, spread over this panel's k steps
      const int64_t bytes = groups * kPanelBytes;
      const char* next = p + 1 < p1 ? reinterpret_cast<const char*>(panel + bytes) : nullptr;
      LinePrefetch pf = next ? LinePrefetch(next, next + bytes, blocks * 2 * steps) : LinePrefetch();
      for (int64_t m = mg; m < mg1; m += 2 * kRows) {
        const int8_t* a0 = rows_at(m);
        const int8_t* a1 = rows_at(std::min(m + kRows, m1 - 1));
        if (steps == 0) {
          std::memset(s.acc, 0, sizeof(s.acc));
        } else if (mg1 - m > kRows) {
          pass<true>(a0, a1, g.lda, panel, 0, steps, s.acc, pf);
          pass<true>(a0, a1, g.lda, panel, 2, steps, s.acc, pf);
        } else {
          pass<false>(a0, a0, g.lda, panel, 0, steps, s.acc, pf);
          pass<false>(a0, a0, g.lda, panel, 2, steps, s.acc, pf);
        }
        finish(g, a0, a1, m, std::min<int64_t>(2 * kRows, mg1 - m), p, panel, s.acc);
      }
    }
  }
  _tile_release();
}

}  // namespace int8_gemm
}  // namespace pyaccel
