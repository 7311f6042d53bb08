#pragma once
// Small helpers shared by the CPU kernels: an OpenMP-optional thread count, a work split, a vectorisable dot product.
#include <algorithm>
#include <cmath>
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace vitx {

// The caller passes torch.get_num_threads(), so the native kernels use the threads torch was told to use.
inline int clamp_threads(int requested) {
#ifdef _OPENMP
  return requested > 0 ? requested : omp_get_max_threads();
#else
  (void)requested;
  return 1;
#endif
}

// Token blocks per row so that `rows` x blocks tasks keep `threads` busy (about two tasks per thread), with blocks of
// at least `min_block` tokens. Whole rows stream v best; the split only matters for small batches. The summation order
// of every output entry does not depend on it, so results do not depend on the thread count.
inline int64_t token_blocks(int64_t rows, int64_t tokens, int threads, int64_t min_block = 16) {
  const int64_t want = (2 * static_cast<int64_t>(threads) + rows - 1) / std::max<int64_t>(rows, 1);
  const int64_t most = std::max<int64_t>(1, (tokens + min_block - 1) / min_block);
  return std::clamp<int64_t>(want, 1, most);
}

// The simd reduction lets the compiler reorder the sum (vectorised, and the same order on every run).
template <typename T>
inline T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  T acc = T(0);
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// ReLU that keeps NaN, as torch.relu does.
template <typename T>
inline T relu(T x) {
  return x > T(0) ? x : (x != x ? x : T(0));
}

template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

}  // namespace vitx
