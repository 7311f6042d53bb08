#pragma once
#include <cstdint>

namespace vitx {

// AGCAM epilogue (docs/methods/agcam.md §5): out[b, t] = sum_{l,h} ReLU(<delta[b,l,h], v[b,l,h,t]>) * sigmoid(s[b,l,h,t]).
// delta: (B, L, H, d), v: (B, L, H, T, d), s: (B, L, H, T), out: (B, T); all row-major.
template <typename T>
void agcam_epilogue_cpu(const T* delta, const T* v, const T* s, T* out, int64_t B, int64_t L, int64_t H, int64_t T_,
                        int64_t d, int num_threads);

}  // namespace vitx
