// Binary implicit-GEMM tile, portable C++ (any x86-64): one pixel at a time
// against a 32-channel block; popcount in plain C++ (no POPCNT assumed).
#include "binary/binary.h"

namespace pyaccel {
namespace binary {
namespace {

inline int popcount64(uint64_t v) {
  v = v - ((v >> 1) & 0x5555555555555555ull);
  v = (v & 0x3333333333333333ull) + ((v >> 2) & 0x3333333333333333ull);
  v = (v + (v >> 4)) & 0x0F0F0F0F0F0F0F0Full;
  return static_cast<int>((v * 0x0101010101010101ull) >> 56);
}

}  // namespace

void tile_scalar(const TileArgs& a, int mr, const uint64_t* const* x, const uint64_t* w, const int32_t* const* corr,
                 float* const* y, int nvalid, int64_t oc0) {
  for (int p = 0; p < mr; ++p) {
    int32_t pop[kNR] = {0};
    for (int t = 0; t < a.ntaps; ++t) {
      const uint64_t* xp = x[p] + a.tap_off[t];
      const uint64_t* wt = w + t * a.cw * kNR;
      for (int64_t i = 0; i < a.cw; ++i)
        for (int j = 0; j < nvalid; ++j) pop[j] += popcount64(xp[i] ^ wt[i * kNR + j]);
    }
    for (int j = 0; j < nvalid; ++j) {
      int32_t dot = a.ktot - 2 * pop[j];
      if (corr && corr[p]) dot -= corr[p][j];
      y[p][j] = epilogue_one(a, static_cast<float>(dot), oc0 + j);
    }
  }
}

void pack_row_scalar(const float* x, int64_t c, int64_t w, int64_t sc, int64_t sw, int64_t groups, int64_t cg,
                     int64_t cw, uint64_t* out) {
  (void)c;
  const int64_t wpix = groups * cw;
  for (int64_t q = 0; q < w * wpix; ++q) out[q] = 0;
  // channel-outer: consecutive reads along the row for NCHW inputs
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t k = 0; k < cg; ++k) {
      const float* xc = x + (g * cg + k) * sc;
      uint64_t* o = out + g * cw + k / 64;
      const int bit = static_cast<int>(k % 64);
      for (int64_t q = 0; q < w; ++q) o[q * wpix] |= uint64_t(xc[q * sw] < 0.f) << bit;
    }
}

}  // namespace binary
}  // namespace pyaccel
