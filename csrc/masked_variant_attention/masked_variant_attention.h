#pragma once
#include <cstdint>

namespace vitx {

// ReciproCAM's collapsed attention of one pooled query row per variant (docs/methods/reciprocam.md §5.1):
//   s_a = m_a <q, pk[idx_a]> + <q, bk>  (valid a),   s_z = <q, bk> + log_nz,   p = softmax(s_1..s_A, s_z)
//   ctx = sum_a p_a (m_a pv[idx_a] + bv) + p_z bv
// q: (B, N, H, d), pk/pv: (B, T, H, d), idx/m/valid: (N, A), log_nz: (N,), bk/bv: (H, d), out: (B, N, H, d);
// all row-major. Padded slots (valid = false) are never read from pk/pv.
template <typename T>
void masked_variant_attention_cpu(const T* q, const T* pk, const T* pv, const int64_t* idx, const T* m,
                                  const bool* valid, const T* log_nz, const T* bk, const T* bv, T* out, int64_t B,
                                  int64_t N, int64_t H, int64_t d, int64_t T_, int64_t A, int num_threads);

}  // namespace vitx
