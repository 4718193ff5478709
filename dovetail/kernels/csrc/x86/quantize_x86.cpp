// Activations to int8 on AVX2 (the AVX-512 path uses it too): the same bits as quantize_scalar.
#include "x86.h"

#if DOVETAIL_X86
#include <immintrin.h>

namespace dovetail::x86 {

__attribute__((target("avx2,fma")))
void quantize_avx2(const float* x, int8_t* q8, float* s, int64_t b, int64_t e) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256i lim = _mm256_set1_epi32(127), nlim = _mm256_set1_epi32(-127);
  for (int64_t i = b; i < e; ++i) {
    const float* v = x + i * 32;
    __m256 r[4], m = _mm256_setzero_ps();
    for (int k = 0; k < 4; ++k) {
      r[k] = _mm256_loadu_ps(v + 8 * k);
      m = _mm256_max_ps(m, _mm256_andnot_ps(sign, r[k]));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
    const float amax = _mm_cvtss_f32(m4);
    const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
    const __m256 vid = _mm256_set1_ps(id);
    __m256i qi[4];
    for (int k = 0; k < 4; ++k)
      qi[k] = _mm256_max_epi32(nlim, _mm256_min_epi32(lim, _mm256_cvtps_epi32(_mm256_mul_ps(r[k], vid))));
    int32_t lanes[32];
    for (int k = 0; k < 4; ++k) _mm256_storeu_si256((__m256i*)(lanes + 8 * k), qi[k]);
    int32_t lo = 0, hi = 0;
    for (int j = 0; j < 32; ++j) {
      q8[i * 32 + j] = (int8_t)lanes[j];
      (j < 16 ? lo : hi) += lanes[j];
    }
    float* si = s + i * 4;
    si[0] = d;
    si[1] = d * (float)(lo + hi);
    si[2] = (float)lo;
    si[3] = (float)hi;
  }
}


}  // namespace dovetail::x86
#endif
