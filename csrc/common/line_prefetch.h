// Cache lines [p, end) prefetched into L2 (prefetcht1) in `steps` steps of
// equal size: a kernel calls step() once per unit of its own work, so a
// buffer it needs next (the fused conv's next input rows, the int8 AMX
// kernel's next weight panel) arrives while the current one computes.
#pragma once
#include <cstdint>

namespace pyaccel {

struct LinePrefetch {
  const char* p;
  const char* end;
  int64_t per_step;  // lines a step issues
  LinePrefetch() : p(nullptr), end(nullptr), per_step(0) {}
  LinePrefetch(const char* begin, const char* stop, int64_t steps)
      : p(begin), end(stop), per_step(begin && steps > 0 ? ((stop - begin) / 64 + steps - 1) / steps : 0) {}
  void step() {
    for (int64_t i = 0; i < per_step && p < end; ++i, p += 64) __builtin_prefetch(p, 0, 2);
  }
};

// Consecutive chunks of chunk_bytes of the panel_bytes at `next` (the panel
// a kernel's thread most likely runs next), wrapping to its start: each tile
// of the current panel takes one and prefetches it as it goes, so the first
// tiles cover the next panel and later ones re-touch the same lines.
class PanelChunks {
 public:
  PanelChunks(const void* next, int64_t panel_bytes, int64_t chunk_bytes)
      : next_(static_cast<const char*>(next)), panel_bytes_(panel_bytes), chunk_bytes_(chunk_bytes) {}
  const char* take() {
    if (off_ + chunk_bytes_ > panel_bytes_) off_ = 0;
    const char* r = next_ + off_;
    off_ += chunk_bytes_;
    return r;
  }

 private:
  const char* next_;
  int64_t panel_bytes_, chunk_bytes_;
  int64_t off_ = 0;
};

}  // namespace pyaccel
