// CPU kernel of masked_variant_attention: one (image, variant) pair per task, all heads, A gathered rows per head.
#include "masked_variant_attention/masked_variant_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/parallel.h"

namespace vitx {

template <typename T>
void masked_variant_attention_cpu(const T* q, const T* pk, const T* pv, const int64_t* idx, const T* m,
                                  const bool* valid, const T* log_nz, const T* bk, const T* bv, T* out, int64_t B,
                                  int64_t N, int64_t H, int64_t d, int64_t T_, int64_t A, int num_threads) {
  const int64_t D = H * d;  // one token row of pk/pv
  const T neg_inf = -std::numeric_limits<T>::infinity();
  [[maybe_unused]] const int threads = clamp_threads(num_threads);  // 1 without OpenMP
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> p(static_cast<size_t>(A));  // per-thread softmax weights
#pragma omp for schedule(static)
    for (int64_t bn = 0; bn < B * N; ++bn) {
      const int64_t b = bn / N, n = bn % N;
      const int64_t* ix = idx + n * A;
      const T* mw = m + n * A;
      const bool* ok = valid + n * A;
      const T* pk_b = pk + b * T_ * D;
      const T* pv_b = pv + b * T_ * D;
      for (int64_t h = 0; h < H; ++h) {
        const T* qh = q + (bn * H + h) * d;
        const T* bkh = bk + h * d;
        const T* bvh = bv + h * d;
        T* o = out + (bn * H + h) * d;
        const T beta = dot(qh, bkh, d);
        const T s_zero = beta + log_nz[n];
        T mx = s_zero;
        for (int64_t a = 0; a < A; ++a) {
          p[a] = ok[a] ? mw[a] * dot(qh, pk_b + ix[a] * D + h * d, d) + beta : neg_inf;
          mx = std::max(mx, p[a]);
        }
        // max is -inf only when nothing is active and nothing is zeroed; the NaN then matches the reference
        T den = std::exp(s_zero - mx);
        const T e_zero = den;
        for (int64_t a = 0; a < A; ++a) {
          p[a] = ok[a] ? std::exp(p[a] - mx) : T(0);
          den += p[a];
        }
        const T inv = T(1) / den;
        const T pz = e_zero * inv;
        for (int64_t e = 0; e < d; ++e) o[e] = pz * bvh[e];
        for (int64_t a = 0; a < A; ++a) {
          if (!ok[a]) continue;
          const T pa = p[a] * inv;
          const T ma = mw[a];
          const T* vr = pv_b + ix[a] * D + h * d;
#pragma omp simd
          for (int64_t e = 0; e < d; ++e) o[e] += pa * (ma * vr[e] + bvh[e]);
        }
      }
    }
  }
}

template void masked_variant_attention_cpu<float>(const float*, const float*, const float*, const int64_t*,
                                                  const float*, const bool*, const float*, const float*,
                                                  const float*, float*, int64_t, int64_t, int64_t, int64_t, int64_t,
                                                  int64_t, int);
template void masked_variant_attention_cpu<double>(const double*, const double*, const double*, const int64_t*,
                                                   const double*, const bool*, const double*, const double*,
                                                   const double*, double*, int64_t, int64_t, int64_t, int64_t,
                                                   int64_t, int64_t, int);

}  // namespace vitx
