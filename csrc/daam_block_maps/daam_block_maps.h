#pragma once
#include <cstdint>

namespace vitx {

// DAAM per-block maps (docs/methods/daam.md §5): out[b, l, t] = ReLU(sum_h a[b,l,h,t] * <v[b,l,h,t], g[b,l,h]>).
// a: (B, L, H, T), v: (B, L, H, T, d), g: (B, L, H, d), out: (B, L, T); all row-major.
template <typename T>
void daam_block_maps_cpu(const T* a, const T* v, const T* g, T* out, int64_t B, int64_t L, int64_t H, int64_t T_,
                         int64_t d, int num_threads);

}  // namespace vitx
