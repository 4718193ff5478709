// The portable kernels: plain C++ that every CPU runs, and the reference every other path follows
// bit for bit.
#pragma once

#include "kernels.h"

namespace dovetail {

void tile_scalar(const Packed& w, int64_t t, const int8_t* xq, const float* xs, int64_t M, float* acc);  // matmul.cpp
void quantize_scalar(const float* x, int8_t* q8, float* s, int64_t b, int64_t e);                       // quantize.cpp
void attend_scalar(DOVETAIL_ATTEND_ARGS);                                                                // attention.cpp
int64_t find_range_scalar(const float* p, int64_t V, float lo, float hi, int32_t* at, int64_t limit);   // sampling.cpp

}  // namespace dovetail
