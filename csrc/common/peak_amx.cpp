// AMX-INT8 throughput probe (built with the AMX flags; see peak.h): tdpbusd
// into 4 independent accumulator tiles from 2 A and 2 B tiles held in tile
// registers, as the int8 GEMM's AMX kernel issues them, with no memory traffic.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "common/peak.h"

namespace pyaccel {
namespace peak {

int64_t int8_amx(int64_t iters) {
  struct alignas(64) {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
  } cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  alignas(64) int8_t src[16 * 64];
  std::memset(src, 3, sizeof(src));
  __asm__ volatile("" ::: "memory");  // the intrinsics tell GCC of neither read (cfg, src)
  _tile_loadconfig(&cfg);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, src, 64);
  _tile_loadd(5, src, 64);
  _tile_loadd(6, src, 64);
  _tile_loadd(7, src, 64);
  for (int64_t i = 0; i < iters; ++i) {
    _tile_dpbusd(0, 4, 6);
    _tile_dpbusd(1, 4, 7);
    _tile_dpbusd(2, 5, 6);
    _tile_dpbusd(3, 5, 7);
  }
  alignas(64) int32_t sink[16 * 16];
  _tile_stored(0, sink, 64);
  __asm__ volatile("" ::: "memory");
  _tile_release();
  return iters * 4 * (16 * 16 * 64) * 2;
}

}  // namespace peak
}  // namespace pyaccel
