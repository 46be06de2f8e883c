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

// Oversubscription guard. When another busy process shares the cores, a team
// thread may be descheduled: the join then waits for a scheduler time slice
// (milliseconds for a call of microseconds). Every team measures how late its
// threads start; a team that starts later than kLateStartSeconds within
// kRepeatSeconds of another late team makes the helpers below run on the
// calling thread alone for kSerialSeconds, after which teams are tried again.
// One late team alone does not: on a shared or virtualised host a thread is
// now and then descheduled for a millisecond with no other process on the
// cores. On a machine with free cores a thread starts within tens of
// microseconds and nothing changes.
constexpr double kLateStartSeconds = 1e-3;
constexpr double kRepeatSeconds = 0.1;
constexpr double kSerialSeconds = 0.2;
bool serial_for_now();                 // true inside such a window
void note_thread_start(double t0);     // called by each team thread with the team's start time
int effective_threads(int nthreads);   // nthreads, or 1 inside a window
int64_t late_team_trips();             // how many late teams opened a window so far (this process)

// One team of threads runs two phases: fn1(begin, end) over [0, n1) split as
// parallel_for does (grain 1), then, after a barrier, fn2(begin, end) over
// [0, n2). One fork/join instead of two, for a phase that prepares data
// every thread of the second phase reads.
// items2 > 0: phase 2 is instead cut into `items2` contiguous items handed out
// dynamically, in order (a slow thread takes fewer of them).
template <typename Fn1, typename Fn2>
void parallel_two_phase(int64_t n1, int64_t n2, int nthreads, const Fn1& fn1, const Fn2& fn2, int64_t items2 = 0);

// The GEMM work split every op uses: a grid of (unit of output channels) x
// (chunk of rows), unit-major. Rows are chunked only when there are too few
// units to keep every thread busy; otherwise an item is a whole unit over all
// rows (its weights stay in L2 while the rows stream past). With few rows the
// grid is cut into contiguous ranges over the threads (consecutive chunks of
// one unit merge into one call fn(unit, row0, row1)); with many rows (>= 8
// row tiles) items are handed out dynamically. Row chunks are multiples of `mr`.
template <typename Fn>
void parallel_units_rows(int64_t units, int64_t m, int64_t mr, int nthreads, const Fn& fn);

// Rows [0, m) cut into nt chunks of whole `align`-row blocks (balanced), one
// a thread: each thread claims a chunk, runs prep(c, r0, r1) on it (e.g.
// quantizes those rows into shared scratch), then item(c, u, a0, a1) for the
// chunk's units [0, units) x sub-chunks of about sub_rows rows (unit-major,
// sub-chunk boundaries on whole blocks), then the leftovers of chunks other
// threads have already prepared. A thread thus reads the rows it wrote itself
// unless it steals. No barrier and no waiting; a team smaller than nt claims
// every chunk between its threads. nt: the thread count to use (>= 1).
template <typename Prep, typename Item>
void parallel_row_chunks(int64_t m, int64_t align, int64_t units, int64_t sub_rows, int nt, const Prep& prep,
                         const Item& item);

// Chunk c's first row in parallel_row_chunks' split (c = nt: m), for callers
// that size per-chunk scratch.
inline int64_t row_chunk_start(int64_t m, int64_t align, int nt, int c) {
  const int64_t blocks = (m + align - 1) / align;
  const int64_t r = align * (blocks * c / nt);
  return r < m ? r : m;
}

// Every team thread first runs prep() once -- its own copy of some small
// preparation (e.g. quantized activations in its thread-local scratch), so
// that no thread writes cache lines another one reads -- then items of
// [0, n) are handed out dynamically: fn(state, begin, end) with the state
// prep returned on that thread. No barrier: a thread starts its items as soon
// as its own preparation is done, and prepares only once it holds an item.
template <typename Prep, typename Fn>
void parallel_private_prep(int64_t n, int nthreads, int64_t items, const Prep& prep, const Fn& fn);

}  // namespace pyaccel

#include <omp.h>

#include <atomic>
#include <memory>
#include <vector>

#include <algorithm>

namespace pyaccel {

template <typename Fn>
void parallel_for(int64_t n, int64_t grain, int nthreads, const Fn& fn) {
  if (n <= 0) return;
  if (grain < 1) grain = 1;
  const int64_t units = (n + grain - 1) / grain;
  int64_t nt = effective_threads(nthreads);
  if (nt > units) nt = units;
  if (nt <= 1) { fn(int64_t(0), n); return; }
  const double t0 = omp_get_wtime();
#pragma omp parallel num_threads(static_cast<int>(nt))
  {
    note_thread_start(t0);
    // split by the team OpenMP actually gave (fewer threads when nested or
    // capped), never by the request: a missing thread's share must not vanish
    const int64_t t = omp_get_thread_num(), team = omp_get_num_threads();
    const int64_t u0 = units * t / team, u1 = units * (t + 1) / team;
    const int64_t b = u0 * grain, e = u1 * grain < n ? u1 * grain : n;
    if (b < e) fn(b, e);
  }
}

template <typename Prep, typename Fn>
void parallel_private_prep(int64_t n, int nthreads, int64_t items, const Prep& prep, const Fn& fn) {
  if (n <= 0) return;
  if (items < 1) items = 1;
  int64_t nt = effective_threads(nthreads);
  if (nt > items) nt = items;
  if (nt <= 1) {
    auto state = prep();
    fn(state, int64_t(0), n);
    return;
  }
  const double t0 = omp_get_wtime();
  std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(static_cast<int>(nt))
  {
    note_thread_start(t0);
    // a thread prepares only once it holds an item: one that starts after the
    // others took every item leaves at once instead of preparing for nothing
    int64_t i = next.fetch_add(1, std::memory_order_relaxed);
    if (i < items) {
      auto state = prep();
      for (; i < items; i = next.fetch_add(1, std::memory_order_relaxed)) {
        const int64_t b0 = n * i / items, b1 = n * (i + 1) / items;
        if (b0 < b1) fn(state, b0, b1);
      }
    }
  }
}

template <typename Fn1, typename Fn2>
void parallel_two_phase(int64_t n1, int64_t n2, int nthreads, const Fn1& fn1, const Fn2& fn2, int64_t items2) {
  int64_t nt = effective_threads(nthreads);
  if (nt > n2) nt = n2;
  if (nt <= 1) {
    if (n1 > 0) fn1(int64_t(0), n1);
    if (n2 > 0) fn2(int64_t(0), n2);
    return;
  }
  const double t0 = omp_get_wtime();
#pragma omp parallel num_threads(static_cast<int>(nt))
  {
    note_thread_start(t0);
    const int64_t t = omp_get_thread_num(), team = omp_get_num_threads();  // see parallel_for
    const int64_t a0 = n1 * t / team, a1 = n1 * (t + 1) / team;
    if (a0 < a1) fn1(a0, a1);
#pragma omp barrier
    if (items2 > 0) {
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = 0; i < items2; ++i) {
        const int64_t b0 = n2 * i / items2, b1 = n2 * (i + 1) / items2;
        if (b0 < b1) fn2(b0, b1);
      }
    } else {
      const int64_t b0 = n2 * t / team, b1 = n2 * (t + 1) / team;
      if (b0 < b1) fn2(b0, b1);
    }
  }
}

template <typename Fn>
void parallel_units_rows(int64_t units, int64_t m, int64_t mr, int nthreads, const Fn& fn) {
  if (units <= 0 || m <= 0) return;
  nthreads = effective_threads(nthreads);
  int64_t chunks = 1;
  if (nthreads > 1 && units < 4 * nthreads)
    chunks = std::min<int64_t>((m + mr - 1) / mr, (4 * nthreads + units - 1) / units);
  const int64_t row_tiles = (m + mr - 1) / mr;
  // Many rows: hand the items out dynamically, in order. On a shared machine
  // (or cores of unequal speed) a static split waits for the slowest thread;
  // with a busy process on one of 2 cores the int8 GEMM measured 340 - 480
  // GOP/s static vs 540 - 680 dynamic (equal when the machine is quiet).
  // Rows are few at M = 1: keep the contiguous static split there, whose
  // per-thread sequential weight streams the prefetchers follow.
  if (nthreads > 1 && row_tiles >= 8 && units * chunks >= 2 * nthreads) {
    const int64_t items = units * chunks;
    const double t0 = omp_get_wtime();
#pragma omp parallel num_threads(nthreads)
    {
      note_thread_start(t0);
#pragma omp for schedule(dynamic, 1)
      for (int64_t t = 0; t < items; ++t) {
        const int64_t u = t / chunks, c0 = t % chunks;
        const int64_t r0 = std::min<int64_t>(m, row_tiles * c0 / chunks * mr);
        const int64_t r1 = c0 + 1 == chunks ? m : std::min<int64_t>(m, row_tiles * (c0 + 1) / chunks * mr);
        if (r0 < r1) fn(u, r0, r1);
      }
    }
    return;
  }
  parallel_for(units * chunks, 1, nthreads, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1;) {
      const int64_t u = t / chunks, c0 = t % chunks;
      const int64_t c1 = std::min<int64_t>(chunks, c0 + (t1 - t));
      const int64_t r0 = std::min<int64_t>(m, row_tiles * c0 / chunks * mr);
      const int64_t r1 = c1 == chunks ? m : std::min<int64_t>(m, row_tiles * c1 / chunks * mr);
      if (r0 < r1) fn(u, r0, r1);
      t += c1 - c0;
    }
  });
}

template <typename Prep, typename Item>
void parallel_row_chunks(int64_t m, int64_t align, int64_t units, int64_t sub_rows, int nt, const Prep& prep,
                         const Item& item) {
  if (m <= 0 || units <= 0) return;
  if (nt < 1) nt = 1;
  std::vector<int64_t> row0(nt + 1), subs(nt);
  for (int c = 0; c <= nt; ++c) row0[c] = row_chunk_start(m, align, nt, c);
  for (int c = 0; c < nt; ++c) subs[c] = std::max<int64_t>(1, (row0[c + 1] - row0[c] + sub_rows / 2) / sub_rows);
  std::unique_ptr<std::atomic<int64_t>[]> next(new std::atomic<int64_t>[nt]);
  std::unique_ptr<std::atomic<int>[]> ready(new std::atomic<int>[nt]);
  for (int c = 0; c < nt; ++c) next[c].store(0), ready[c].store(0);
  std::atomic<int> claim{0};
  // chunk c's items from its counter, until none is left
  auto run_items = [&](int c) {
    const int64_t n_sub = subs[c], crows = row0[c + 1] - row0[c], cblocks = (crows + align - 1) / align;
    for (int64_t i = next[c].fetch_add(1); i < units * n_sub; i = next[c].fetch_add(1)) {
      const int64_t u = i / n_sub, sb = i % n_sub;
      const int64_t a0 = row0[c] + align * (cblocks * sb / n_sub);
      const int64_t a1 = sb + 1 == n_sub ? row0[c + 1] : row0[c] + align * (cblocks * (sb + 1) / n_sub);
      if (a0 < a1) item(c, u, a0, a1);
    }
  };
  auto body = [&] {
    int own = -1;
    for (int c = claim.fetch_add(1); c < nt; c = claim.fetch_add(1)) {
      if (row0[c] < row0[c + 1]) prep(c, row0[c], row0[c + 1]);
      ready[c].store(1, std::memory_order_release);
      run_items(c);
      own = c;
    }
    // the other chunks' leftovers, next chunk first; one not yet prepared is
    // left to its owner, which runs all its items once it is
    for (int j = 1; j <= nt; ++j) {
      const int c = (std::max(own, 0) + j) % nt;
      if (next[c].load(std::memory_order_relaxed) < units * subs[c] && ready[c].load(std::memory_order_acquire))
        run_items(c);
    }
  };
  if (nt == 1) return body();
  const double t0 = omp_get_wtime();
#pragma omp parallel num_threads(nt)
  {
    note_thread_start(t0);
    body();
  }
}

}  // namespace pyaccel
