// The AVX-512 build of attention (attention.h), chosen by the registry: the same source and bits
// as every build. 16 keys reduced together by the transposing network, 8 vectors of 16 outputs
// summed together; fused multiply-adds are AVX-512's.
#include "x86.h"

#if DOVETAIL_X86
// The library headers come before the target pragma, so that their code stays portable.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#pragma GCC push_options
#pragma GCC target("avx512f")
#include "../attention.h"

namespace dovetail::x86 {
namespace {

struct Avx512Fma {
  __attribute__((always_inline)) static inline v8f fma(v8f a, v8f b, v8f c) {
    return (v8f)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
  }
  __attribute__((always_inline)) static inline v16f fma(v16f a, v16f b, v16f c) {
    return (v16f)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
  }
};

}  // namespace

DOVETAIL_ATTEND_BUILD(attend_avx512, 16, v16f, 8, Avx512Fma)

}  // namespace dovetail::x86
#pragma GCC pop_options
#endif
