// CPU kernel of agcam_epilogue: tasks are (image, block of tokens); each streams its slice of v once over all layers
// and heads and owns its output entries (no atomics; every entry sums layers and heads in order: deterministic).
// The op is memory-bound on v (a batched GEMV), so the win over torch is not materialising the (B, L, H, T) rows.
#include "agcam_epilogue/agcam_epilogue.h"

#include <algorithm>
#include <vector>

#include "common/parallel.h"

namespace vitx {

template <typename T>
void agcam_epilogue_cpu(const T* delta, const T* v, const T* s, T* out, int64_t B, int64_t L, int64_t H, int64_t T_,
                        int64_t d, int num_threads) {
  const int threads = clamp_threads(num_threads);
  const int64_t n_blocks = token_blocks(B, T_, threads);
  const int64_t block = (T_ + n_blocks - 1) / n_blocks;
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> acc(static_cast<size_t>(block));
#pragma omp for schedule(static)
    for (int64_t task = 0; task < B * n_blocks; ++task) {
      const int64_t b = task / n_blocks;
      const int64_t t0 = (task % n_blocks) * block;
      const int64_t nt = std::max<int64_t>(0, std::min(block, T_ - t0));
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t lh = 0; lh < L * H; ++lh) {
        const int64_t row = b * L * H + lh;  // (b, l, h)
        const T* dl = delta + row * d;
        const T* vr = v + (row * T_ + t0) * d;
        const T* sr = s + row * T_ + t0;
        for (int64_t t = 0; t < nt; ++t) acc[t] += relu(dot(vr + t * d, dl, d)) * sigmoid(sr[t]);
      }
      std::copy(acc.begin(), acc.begin() + nt, out + b * T_ + t0);
    }
  }
}

template void agcam_epilogue_cpu<float>(const float*, const float*, const float*, float*, int64_t, int64_t, int64_t,
                                        int64_t, int64_t, int);
template void agcam_epilogue_cpu<double>(const double*, const double*, const double*, double*, int64_t, int64_t,
                                         int64_t, int64_t, int64_t, int);

}  // namespace vitx
