// Large batches in passes of rows, so that per-call scratch (quantized or
// transposed activations) stays bounded for any M: the weights are re-read
// once per pass, which costs < 2 % at the pass sizes used here.
#pragma once
#include <cstdint>

namespace pyaccel {

// Scratch per row pass (quantized activations, bf16/odd-K copies, transposed x).
constexpr int64_t kRowPassBytes = int64_t(8) << 20;

// Calls fn(r0, r1) over [0, m) in balanced passes of at most ~budget_bytes of
// scratch (row_bytes per row), each a multiple of `multiple` rows except the
// last, and at least `multiple` rows.
// The rows of each pass but the last that for_each_row_pass makes (m > 0).
inline int64_t row_pass_rows(int64_t m, int64_t row_bytes, int64_t budget_bytes, int64_t multiple) {
  int64_t cap = budget_bytes / (row_bytes > 0 ? row_bytes : 1) / multiple * multiple;
  if (cap < multiple) cap = multiple;
  const int64_t passes = (m + cap - 1) / cap;
  const int64_t rows = (m + passes - 1) / passes;
  return (rows + multiple - 1) / multiple * multiple;
}

template <typename Fn>
void for_each_row_pass(int64_t m, int64_t row_bytes, int64_t budget_bytes, int64_t multiple, const Fn& fn) {
  if (m <= 0) return;
  const int64_t rows = row_pass_rows(m, row_bytes, budget_bytes, multiple);
  for (int64_t r0 = 0; r0 < m; r0 += rows) fn(r0, r0 + rows < m ? r0 + rows : m);
}

}  // namespace pyaccel
