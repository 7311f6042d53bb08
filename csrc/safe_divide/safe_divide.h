#pragma once
#include <cstdint>

namespace vitx {

// LRP's safe division (docs/methods/lrp.md §5): out[p, k, q] = a[p, k, q] / den[p, q] * (b[p, q] != 0), with
// den = b + 1e-9, or 1e-9 where that sum is 0. a, out: (P, K, Q), b: (P, Q); all row-major. out may be a (in place).
template <typename T>
void safe_divide_cpu(const T* a, const T* b, T* out, int64_t P, int64_t K, int64_t Q, int num_threads);

}  // namespace vitx
