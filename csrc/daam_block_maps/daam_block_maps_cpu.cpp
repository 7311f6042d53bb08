// CPU kernel of daam_block_maps: tasks are (image, block, block of tokens); each sums its heads in order and owns its
// output entries (deterministic). Memory-bound on v (a batched GEMV): the win over torch is not materialising the
// (B, L, H, T) per-head products.
#include "daam_block_maps/daam_block_maps.h"

#include <algorithm>
#include <vector>

#include "common/parallel.h"

namespace vitx {

template <typename T>
void daam_block_maps_cpu(const T* a, const T* v, const T* g, T* out, int64_t B, int64_t L, int64_t H, int64_t T_,
                         int64_t d, int num_threads) {
  const int threads = clamp_threads(num_threads);
  const int64_t n_blocks = token_blocks(B * L, T_, threads);
  const int64_t block = (T_ + n_blocks - 1) / n_blocks;
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> acc(static_cast<size_t>(block));
#pragma omp for schedule(static)
    for (int64_t task = 0; task < B * L * n_blocks; ++task) {
      const int64_t bl = task / n_blocks;  // (b, l)
      const int64_t t0 = (task % n_blocks) * block;
      const int64_t nt = std::max<int64_t>(0, std::min(block, T_ - t0));
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t h = 0; h < H; ++h) {
        const int64_t row = bl * H + h;  // (b, l, h)
        const T* gr = g + row * d;
        const T* vr = v + (row * T_ + t0) * d;
        const T* ar = a + row * T_ + t0;
        for (int64_t t = 0; t < nt; ++t) acc[t] += ar[t] * dot(vr + t * d, gr, d);
      }
      T* o = out + bl * T_ + t0;
      for (int64_t t = 0; t < nt; ++t) o[t] = relu(acc[t]);
    }
  }
}

template void daam_block_maps_cpu<float>(const float*, const float*, const float*, float*, int64_t, int64_t, int64_t,
                                         int64_t, int64_t, int);
template void daam_block_maps_cpu<double>(const double*, const double*, const double*, double*, int64_t, int64_t,
                                          int64_t, int64_t, int64_t, int);

}  // namespace vitx
