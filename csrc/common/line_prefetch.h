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

}  // namespace pyaccel
