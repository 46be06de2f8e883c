#include <cstring>

#include "common/packed_header.h"
#include "sparse24/sparse24.h"

namespace pyaccel {
namespace sparse24 {
int64_t packed_nbytes(int64_t n, int64_t k) {
  const int64_t n_pad = round_up(n, kPanel), gp = round_up((k + 3) / 4, kBlockGroups);
  return static_cast<int64_t>(sizeof(PackedHeader)) + (n_pad / kPanel) * (gp / kBlockGroups) * kBlockBytes;
}

void pack(const float* values, int64_t ldv, const uint8_t* pos, int64_t ldp, int64_t n, int64_t k,
          uint8_t* out) {
  PackedHeader h = new_packed_header<PackedHeader>(kMagic, kLayoutF32P16B4, n, k, kPanel);
  const int64_t groups = (k + 3) / 4;
  h.groups_pad = round_up(groups, kBlockGroups);
  h.data_offset = sizeof(PackedHeader);
  std::memcpy(out, &h, sizeof(h));
  uint8_t* data = out + h.data_offset;
  const int64_t blocks = h.groups_pad / kBlockGroups;
  std::memset(data, 0, static_cast<size_t>((h.n_pad / kPanel) * blocks * kBlockBytes));
  for (int64_t c = 0; c < n; ++c) {
    const int64_t p = c / kPanel, lane = c % kPanel;
    for (int64_t g = 0; g < groups; ++g) {
      uint8_t* blk = data + (p * blocks + g / kBlockGroups) * kBlockBytes;
      const int64_t j = g % kBlockGroups;
      float* v0 = reinterpret_cast<float*>(blk) + j * kPanel + lane;
      float* v1 = reinterpret_cast<float*>(blk) + (kBlockGroups + j) * kPanel + lane;
      uint8_t* ps = blk + 2 * kBlockGroups * kPanel * 4 + j * kPanel + lane;
      *v0 = values[c * ldv + 2 * g];
      *v1 = values[c * ldv + 2 * g + 1];
      *ps = pos[c * ldp + g] & 0xF;
    }
  }
}

const char* check_packed(const uint8_t* buf, int64_t nbytes, int64_t n, int64_t k) {
  return check_packed_header<PackedHeader>(buf, nbytes, n, k, kMagic, kLayoutF32P16B4, packed_nbytes(n, k));
}

}  // namespace sparse24
}  // namespace pyaccel
