// The int8 spin loops of the roof probe (roof.cpp): chains of dpbusd, or of maddubs + madd, on
// registers only.
#include "x86.h"

#if DOVETAIL_X86
#include <immintrin.h>

namespace dovetail::x86 {

#define DOVETAIL_16(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12) X(13) X(14) X(15)
static_assert(SPIN_CHAINS == 16, "the AVX-512 loop names its 16 accumulators");

// Sixteen named accumulators (an array lets the compiler shuffle registers between iterations).
__attribute__((target("avx512f,avx512bw,avx512vnni")))
int32_t spin_avx512(int64_t iters) {
#define DOVETAIL_DECL(i) __m512i acc##i = _mm512_set1_epi32(i);
#define DOVETAIL_STEP(i) acc##i = _mm512_dpbusd_epi32(acc##i, a, b);
#define DOVETAIL_SUM(i) total = _mm512_add_epi32(total, acc##i);
  DOVETAIL_16(DOVETAIL_DECL)
  __m512i a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(5);
  for (int64_t it = 0; it < iters; ++it) {
    __asm__ volatile("" : "+v"(a), "+v"(b));  // no instruction: only keeps the products in the loop
    DOVETAIL_16(DOVETAIL_STEP)
  }
  __m512i total = _mm512_setzero_si512();
  DOVETAIL_16(DOVETAIL_SUM)
#undef DOVETAIL_DECL
#undef DOVETAIL_STEP
#undef DOVETAIL_SUM
  return _mm512_reduce_add_epi32(total);
}

__attribute__((target("avx2,fma")))
int32_t spin_avx2(int64_t iters) {
  __m256i acc[SPIN_CHAINS];
  for (int i = 0; i < SPIN_CHAINS; ++i) acc[i] = _mm256_set1_epi32(i);
  __m256i a = _mm256_set1_epi8(3), b = _mm256_set1_epi8(5);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 16
    for (int i = 0; i < SPIN_CHAINS; ++i) {
      __asm__ volatile("" : "+x"(a), "+x"(b));  // no instruction: each chain computes its own products
      acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), ones));
    }
  }
  __m256i total = acc[0];
  for (int i = 1; i < SPIN_CHAINS; ++i) total = _mm256_add_epi32(total, acc[i]);
  int32_t lanes[8];
  _mm256_storeu_si256((__m256i*)lanes, total);
  return lanes[0];
}


}  // namespace dovetail::x86
#endif
