#include "common/parallel.h"

#include <atomic>
#include <cstdlib>

namespace pyaccel {
int max_threads() { return omp_get_max_threads(); }

namespace {
// omp_get_wtime() until which teams are not formed (0: none); the guard can be
// turned off with PYACCEL_LATE_TEAM_GUARD=0 (for measurements of the teams themselves)
std::atomic<double> g_serial_until{0.0};
std::atomic<int64_t> g_trips{0};
std::atomic<double> g_last_late{0.0};  // omp_get_wtime() of the last late team (0: none yet)
std::atomic<double> g_late_team{-1.0};  // the start time of the last team that reported lateness
const bool g_guard = [] {
  const char* v = std::getenv("PYACCEL_LATE_TEAM_GUARD");
  return !(v && v[0] == '0');
}();
}  // namespace

bool serial_for_now() {
  const double until = g_serial_until.load(std::memory_order_relaxed);
  return until > 0.0 && omp_get_wtime() < until;
}

void note_thread_start(double t0) {
  if (!g_guard || omp_get_thread_num() == 0) return;
  const double now = omp_get_wtime();
  if (now - t0 <= kLateStartSeconds) return;
  // one report a team: its first late thread (t0, the team's start, tells teams apart)
  if (g_late_team.exchange(t0, std::memory_order_relaxed) == t0) return;
  const double last = g_last_late.exchange(now, std::memory_order_relaxed);
  if (last > 0.0 && now - last <= kRepeatSeconds) {
    g_serial_until.store(now + kSerialSeconds, std::memory_order_relaxed);
    g_trips.fetch_add(1, std::memory_order_relaxed);
  }
}

int64_t late_team_trips() { return g_trips.load(std::memory_order_relaxed); }

int effective_threads(int nthreads) {
  if (nthreads <= 1) return nthreads < 1 ? 1 : nthreads;
  return serial_for_now() ? 1 : nthreads;
}
}  // namespace pyaccel
