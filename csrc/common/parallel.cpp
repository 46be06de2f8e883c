#include "common/parallel.h"

namespace pyaccel {
int max_threads() { return omp_get_max_threads(); }
}  // namespace pyaccel
