// The one dispatch pattern every op uses: walk a ladder of kernels from best
// to worst ISA and take the first the selected ISA allows (isa_allows: an
// AVX-VNNI entry is skipped at the avx512 level and where the CPU lacks
// VNNI); remember the choice until the ISA cap or the tuning changes
// (PYACCEL_CPU_ISA / set_isa_cap, PYACCEL_CPU_TUNING / set_cpu_tuning).
#pragma once
#include <atomic>
#include <cstddef>
#include <mutex>

#include "common/cpu_features.h"

namespace pyaccel {

template <typename Entry>
class LadderChoice {
 public:
  // isa_of(entry) -> Isa the entry needs. The last entry must be portable.
  template <size_t N, typename IsaOf>
  const Entry& get(const Entry (&ladder)[N], IsaOf isa_of) {
    return get(ladder, isa_of, [](const Entry&) { return true; });
  }
  // ... and fits(entry): false skips an entry the ISA allows (e.g. a variant
  // for another core family, see cpu_tuning()); re-asked when the ISA cap or
  // the tuning changes.
  template <size_t N, typename IsaOf, typename Fits>
  const Entry& get(const Entry (&ladder)[N], IsaOf isa_of, Fits fits) {
    const int gen = isa_generation();
    // generation first: seeing the stored generation makes the entry stored
    // before it visible, so a current generation never pairs with an older entry
    if (generation_.load(std::memory_order_acquire) == gen) {
      if (const Entry* e = entry_.load(std::memory_order_acquire)) return *e;
    }
    std::lock_guard<std::mutex> lock(mutex_);
    const Isa isa = selected_isa();
    const Entry* chosen = &ladder[N - 1];
    for (const Entry& c : ladder) {
      if (isa_allows(isa, isa_of(c)) && fits(c)) {
        chosen = &c;
        break;
      }
    }
    entry_.store(chosen, std::memory_order_release);
    generation_.store(gen, std::memory_order_release);
    return *chosen;
  }

 private:
  std::atomic<const Entry*> entry_{nullptr};
  std::atomic<int> generation_{-1};
  std::mutex mutex_;
};

}  // namespace pyaccel
