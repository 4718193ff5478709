// Sampling's range finder on AVX2 (the AVX-512 path uses it too): 16 tokens tested per step, and
// only the blocks holding a candidate looked at token by token. The same indices as the scalar one.
#include "x86.h"

#if DOVETAIL_X86
#include <immintrin.h>

namespace dovetail::x86 {

namespace {

// bit j set where lo <= q[j] < hi, for 8 values
__attribute__((target("avx2"))) inline uint32_t in_range(const float* q, __m256 lo, __m256 hi) {
  const __m256 v = _mm256_loadu_ps(q);
  return (uint32_t)_mm256_movemask_ps(_mm256_and_ps(_mm256_cmp_ps(v, lo, _CMP_GE_OQ), _mm256_cmp_ps(v, hi, _CMP_LT_OQ)));
}

}  // namespace

__attribute__((target("avx2")))
int64_t find_range_avx2(const float* p, int64_t V, float lo, float hi, int32_t* at, int64_t limit) {
  const __m256 vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi);
  int64_t n = 0, i = 0;
  for (; i + 16 <= V; i += 16) {
    uint32_t mask = in_range(p + i, vlo, vhi) | in_range(p + i + 8, vlo, vhi) << 8;
    if (!mask) continue;
    for (; mask; mask &= mask - 1) at[n++] = (int32_t)(i + __builtin_ctz(mask));
    if (n > limit) return n;
  }
  for (; i < V && n <= limit; ++i)
    if (p[i] >= lo && p[i] < hi) at[n++] = (int32_t)i;
  return n;
}

}  // namespace dovetail::x86
#endif
