#include <cstring>

#include "common/packed_header.h"
#include "sparse24/sparse24.h"

namespace pyaccel {
namespace sparse24 {
namespace {
// i0 | i1 << 2 (what the vpermilps kernels use: the low 2 bits, then byte >> 2)
// | i1 << 4 | i0 << 6 (the column kernel's line offsets: byte & 0xC0 = 64 * i0,
// byte & 0x30 = 16 * i1)
uint8_t encode_pos(uint8_t p) {
  const unsigned i0 = p & 3u, i1 = (p >> 2) & 3u;
  return static_cast<uint8_t>(i0 | i1 << 2 | i1 << 4 | i0 << 6);
}
}  // namespace

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
      float* v0 = reinterpret_cast<float*>(blk + v0_at(j)) + lane;
      float* v1 = reinterpret_cast<float*>(blk + v1_at(j)) + lane;
      uint8_t* ps = blk + pos_at(j) + lane;
      *v0 = values[c * ldv + 2 * g];
      *v1 = values[c * ldv + 2 * g + 1];
      *ps = encode_pos(pos[c * ldp + g]);
    }
  }
}

const char* check_packed(const uint8_t* buf, int64_t nbytes, int64_t n, int64_t k) {
  if (const char* err = check_packed_header<PackedHeader>(buf, nbytes, n, k, kMagic, kLayoutF32P16B4,
                                                          packed_nbytes(n, k)))
    return err;
  PackedHeader h;
  std::memcpy(&h, buf, sizeof(h));
  // the fields the kernels index with, as pack() writes them
  if (h.n_pad != round_up(n, kPanel) || h.groups_pad != round_up((k + 3) / 4, kBlockGroups) ||
      h.data_offset != static_cast<int64_t>(sizeof(PackedHeader)))
    return "packed weight header is inconsistent (padded sizes or offsets)";
  return nullptr;
}

}  // namespace sparse24
}  // namespace pyaccel
