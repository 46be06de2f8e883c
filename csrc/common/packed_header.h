// The check every packed-weight format runs before a kernel touches it: the
// 64-byte header's magic, layout tag and logical shape must match what the
// caller says, and the buffer must have the size the format implies.
#pragma once
#include <cstdint>
#include <cstring>

namespace pyaccel {

inline int64_t round_up(int64_t v, int64_t multiple) { return (v + multiple - 1) / multiple * multiple; }

// Header: any struct starting with {uint32 magic; int32 layout; int64 n, k,
// n_pad; ...}. A fresh header with those fields set (n padded to `panel`); the
// packer fills in the rest.
template <typename Header>
Header new_packed_header(uint32_t magic, int32_t layout, int64_t n, int64_t k, int64_t panel) {
  Header h{};
  h.magic = magic;
  h.layout = layout;
  h.n = n;
  h.k = k;
  h.n_pad = round_up(n, panel);
  return h;
}

// Returns nullptr when valid, else a message (static storage).
template <typename Header>
const char* check_packed_header(const uint8_t* buf, int64_t nbytes, int64_t n, int64_t k, uint32_t magic,
                                int32_t layout, int64_t expected_nbytes) {
  if (buf == nullptr || nbytes < static_cast<int64_t>(sizeof(Header)))
    return "packed weight is empty or shorter than its header";
  Header h;
  std::memcpy(&h, buf, sizeof(h));
  if (h.magic != magic) return "packed weight was not packed for this op (bad magic)";
  if (h.layout != layout) return "packed weight has a layout this build does not know";
  if (h.n != n || h.k != k) return "packed weight shape does not match the weight";
  if (nbytes != expected_nbytes) return "packed weight has the wrong size";
  return nullptr;
}

}  // namespace pyaccel
