// The x86 kernels the registry (registry.cpp) lists; each file under x86/ compiles to nothing
// unless DOVETAIL_X86.
#pragma once

#include "../kernels.h"

#if DOVETAIL_X86
namespace dovetail::x86 {

int best_isa();  // from CPUID: ISA_AVX512 (F, BW, VL, VNNI), ISA_AVX2 (with FMA) or ISA_SCALAR

extern const TileFn AVX2_TILES[N_FORMATS];    // matmul_avx2.cpp
extern const TileFn AVX512_TILES[N_FORMATS];  // matmul_avx512.cpp
void quantize_avx2(const float* x, int8_t* q8, float* s, int64_t b, int64_t e);  // quantize_x86.cpp
void attend_avx2(DOVETAIL_ATTEND_ARGS);    // attention_avx2.cpp
int64_t find_range_avx2(const float* p, int64_t V, float lo, float hi, int32_t* at, int64_t limit);  // sampling_x86.cpp
void attend_avx512(DOVETAIL_ATTEND_ARGS);  // attention_avx512.cpp
int32_t spin_avx2(int64_t iters);                                                  // roof_x86.cpp
int32_t spin_avx512(int64_t iters);

}  // namespace dovetail::x86
#endif
