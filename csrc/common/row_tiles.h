// Rows of a call in micro-tiles of nearly equal height, the height a
// compile-time constant for the tile template.
#pragma once
#include <cstdint>
#include <type_traits>

namespace pyaccel {

namespace detail {
template <int H, typename Fn>
inline void call_with_height(int h, int64_t m, const Fn& fn) {
  if constexpr (H >= 1) {
    if (h == H) {
      fn(m, std::integral_constant<int, H>{});
      return;
    }
    call_with_height<H - 1>(h, m, fn);
  }
}
}  // namespace detail

// Splits rows [m0, m1) into ceil(rows / MR) tiles of nearly equal height (so
// 32 rows with MR = 6 run as 6,6,5,5,5,5, not 6,6,6,6,6,2) and calls
// fn(m, height) for each, the height as a std::integral_constant so that the
// callee can instantiate its tile template: [&](int64_t m, auto h) { tile<h()>(...); }.
template <int MR, typename Fn>
inline void for_each_row_tile(int64_t m0, int64_t m1, const Fn& fn) {
  const int64_t rows = m1 - m0;
  if (rows <= 0) return;
  const int64_t tiles = (rows + MR - 1) / MR;
  const int64_t base = rows / tiles, extra = rows % tiles;
  int64_t m = m0;
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t h = base + (t < extra ? 1 : 0);
    detail::call_with_height<MR>(static_cast<int>(h), m, fn);
    m += h;
  }
}

}  // namespace pyaccel
