// CPU kernel of safe_divide: one pass over a, each element one IEEE division and one multiplication by the 0/1 mask,
// the operations of the torch reference in its order, so the result is bit-equal to it. Tasks are blocks of the
// (P*K) x Q rows; rows are split along Q when there are fewer than about two per thread (the LRP shapes have P*K = 8).
// Memory-bound: the win over torch is reading a and b once instead of about ten elementwise passes.
#include "safe_divide/safe_divide.h"

#include <algorithm>

#include "common/parallel.h"

namespace vitx {

template <typename T>
void safe_divide_cpu(const T* a, const T* b, T* out, int64_t P, int64_t K, int64_t Q, int num_threads) {
  const int threads = clamp_threads(num_threads);
  const int64_t rows = P * K;
  // blocks of at least 4096 elements: smaller tasks cost more in scheduling than they save
  const int64_t n_blocks = token_blocks(rows, Q, threads, 4096);
  const int64_t block = (Q + n_blocks - 1) / n_blocks;
  const T eps = T(1e-9);  // the dtype's nearest value, as torch casts clamp's bound and the scalar
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t task = 0; task < rows * n_blocks; ++task) {
    const int64_t row = task / n_blocks;  // (p, k)
    const int64_t q0 = (task % n_blocks) * block;
    const int64_t nq = std::max<int64_t>(0, std::min(block, Q - q0));
    const T* ar = a + row * Q + q0;
    const T* br = b + (row / K) * Q + q0;  // one denominator row for the K classes of image p
    T* o = out + row * Q + q0;
    // no __restrict: out may be a, and each iteration reads a only at the index it writes
#pragma omp simd
    for (int64_t q = 0; q < nq; ++q) {
      const T s = br[q] + eps;             // = clamp(b, min=eps) + clamp(b, max=eps)
      const T den = s == T(0) ? eps : s;   // = s + (s == 0) * eps
      o[q] = ar[q] / den * T(br[q] != T(0));  // a multiplication, not a select: inf * 0 = nan, as in torch
    }
  }
}

template void safe_divide_cpu<float>(const float*, const float*, float*, int64_t, int64_t, int64_t, int);
template void safe_divide_cpu<double>(const double*, const double*, double*, int64_t, int64_t, int64_t, int);

}  // namespace vitx
