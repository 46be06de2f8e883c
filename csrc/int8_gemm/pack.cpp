// The NR64K4 packed layout (machine independent; every ISA reads it):
//
//   [PackedHeader: 64 B][comp: int32 x n_pad][panels: int8 x n_pad x k_pad]
//
// Panel p holds output channels [64p, 64p+64). Inside a panel, the k dimension
// is cut in groups of 4; group g is 256 contiguous bytes: channel c's 4 weights
// w[64p+c, 4g .. 4g+3] at bytes [4c, 4c+4). One 512-bit load thus gives 16
// channels x 4 k values, exactly the operand of vpdpbusd; a 256-bit load gives
// 8 channels for the AVX2 kernel. Padding (n -> n_pad, k -> k_pad) is zero.
#include <cstring>

#include "common/packed_header.h"
#include "int8_gemm/int8_gemm.h"

namespace pyaccel {
namespace int8_gemm {

int64_t packed_nbytes(int64_t n, int64_t k) {
  const int64_t n_pad = round_up(n, kPanel), k_pad = round_up(k, kKGroup);
  return static_cast<int64_t>(sizeof(PackedHeader)) + n_pad * 4 + n_pad * k_pad;
}

void pack_weights(const int8_t* w, int64_t ldw, int64_t n, int64_t k, uint8_t* out) {
  PackedHeader h = new_packed_header<PackedHeader>(kMagic, kLayoutNR64K4, n, k, kPanel);
  h.k_pad = round_up(k, kKGroup);
  h.comp_offset = sizeof(PackedHeader);
  h.data_offset = h.comp_offset + h.n_pad * 4;
  std::memcpy(out, &h, sizeof(h));
  int32_t* comp = reinterpret_cast<int32_t*>(out + h.comp_offset);
  int8_t* data = reinterpret_cast<int8_t*>(out + h.data_offset);
  std::memset(data, 0, static_cast<size_t>(h.n_pad * h.k_pad));
  const int64_t groups = h.k_pad / kKGroup;
  for (int64_t c = 0; c < h.n_pad; ++c) {
    int64_t sum = 0;
    if (c < n) {
      const int8_t* row = w + c * ldw;
      int8_t* panel = data + (c / kPanel) * groups * kPanel * kKGroup;
      const int64_t lane = (c % kPanel) * kKGroup;
      for (int64_t kk = 0; kk < k; ++kk) {
        panel[(kk / kKGroup) * kPanel * kKGroup + lane + kk % kKGroup] = row[kk];
        sum += row[kk];
      }
    }
    // wraps modulo 2^32 like the kernel's int32 accumulators, so acc - comp
    // is exact whenever the true dot product fits in int32
    comp[c] = static_cast<int32_t>(static_cast<uint32_t>(128 * sum));
  }
}

const char* check_packed(const uint8_t* buf, int64_t nbytes, int64_t n, int64_t k) {
  return check_packed_header<PackedHeader>(buf, nbytes, n, k, kMagic, kLayoutNR64K4, packed_nbytes(n, k));
}

}  // namespace int8_gemm
}  // namespace pyaccel
