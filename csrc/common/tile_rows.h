// Row pointers of an up-to-6-row micro-kernel tile, for kernels whose per-row
// code is a macro over r = 0..5 guarded by `if constexpr (MR > r)`.
#pragma once

// Declares T* p0 .. p5: p0 = base, p<r> = base + r * ld for r < MR; rows past
// MR alias row 0 (their code is compiled out).
#define PYACCEL_TILE_ROWS6(T, p, base, ld)           \
  T* p##0 = (base);                                  \
  T* p##1 = MR > 1 ? p##0 + (ld) : p##0;             \
  T* p##2 = MR > 2 ? p##0 + 2 * (ld) : p##0;         \
  T* p##3 = MR > 3 ? p##0 + 3 * (ld) : p##0;         \
  T* p##4 = MR > 4 ? p##0 + 4 * (ld) : p##0;         \
  T* p##5 = MR > 5 ? p##0 + 5 * (ld) : p##0
