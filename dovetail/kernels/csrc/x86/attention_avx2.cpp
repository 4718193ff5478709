// The AVX2 build of attention (attention.h), chosen by the registry: the same source and bits as
// every build. 4 keys scored together (8 accumulators of 8 lanes and the query's two halves fit
// the 16 ymm registers), 4 vectors of 8 outputs summed together; fused multiply-adds are FMA3's.
#include "x86.h"

#if DOVETAIL_X86
// The library headers come before the target pragma, so that their code stays portable.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#include "../attention.h"

namespace dovetail::x86 {
namespace {

struct Avx2Fma {
  __attribute__((always_inline)) static inline v8f fma(v8f a, v8f b, v8f c) {
    return (v8f)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
  }
  __attribute__((always_inline)) static inline v16f fma(v16f a, v16f b, v16f c) {  // two halves
    v8f a2[2], b2[2], c2[2];
    std::memcpy(a2, &a, sizeof(a)), std::memcpy(b2, &b, sizeof(b)), std::memcpy(c2, &c, sizeof(c));
    for (int i = 0; i < 2; ++i) c2[i] = fma(a2[i], b2[i], c2[i]);
    std::memcpy(&c, c2, sizeof(c));
    return c;
  }
};

}  // namespace

DOVETAIL_ATTEND_BUILD(attend_avx2, 4, v8f, 4, Avx2Fma)

}  // namespace dovetail::x86
#pragma GCC pop_options
#endif
