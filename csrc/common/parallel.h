// Splitting work over threads. pyaccel uses OpenMP, and the extension links the
// same libgomp.so.1 soname that torch loads first, so both share one pool: a
// pyaccel call and a torch op never run two competing sets of spinning threads.
#pragma once
#include <cstdint>

namespace pyaccel {

// Calls fn(begin, end) on `nthreads` threads over [0, n) split in contiguous,
// nearly equal chunks (chunk sizes differ by at most one `grain`).
// nthreads <= 1 or n <= grain runs inline on the calling thread.
template <typename Fn>
void parallel_for(int64_t n, int64_t grain, int nthreads, const Fn& fn);

int max_threads();

}  // namespace pyaccel

#include <omp.h>

namespace pyaccel {

template <typename Fn>
void parallel_for(int64_t n, int64_t grain, int nthreads, const Fn& fn) {
  if (n <= 0) return;
  if (grain < 1) grain = 1;
  const int64_t units = (n + grain - 1) / grain;
  int64_t nt = nthreads < 1 ? 1 : nthreads;
  if (nt > units) nt = units;
  if (nt <= 1) { fn(int64_t(0), n); return; }
#pragma omp parallel num_threads(static_cast<int>(nt))
  {
    const int64_t t = omp_get_thread_num();
    const int64_t u0 = units * t / nt, u1 = units * (t + 1) / nt;
    const int64_t b = u0 * grain, e = u1 * grain < n ? u1 * grain : n;
    if (b < e) fn(b, e);
  }
}

}  // namespace pyaccel
