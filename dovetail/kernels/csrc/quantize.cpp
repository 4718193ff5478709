// Activations to int8, per row in blocks of 32: the input of every quantized matmul.
#include <cmath>

#include "ops.h"
#include "portable.h"

namespace dovetail {
namespace {

// One block of 32 activations -> int8 values and (dx, dx*sum, sum(first 16), sum(last 16)); the two
// half sums are integers (held exactly in float32), which the symmetric formats use in int32.
// q = round-to-nearest-even(v / dx): x86/quantize_x86.cpp's cvtps rounds the same way as nearbyint, and
// max and integer sums do not depend on order, so both give the same bits.
inline void quantize_block_scalar(const float* v, int8_t* q8, float* s) {
  float amax = 0.f;
  for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(v[j]));
  const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
  int32_t lo = 0, hi = 0;
  for (int j = 0; j < 32; ++j) {
    const int32_t q = std::max(-127, std::min(127, (int32_t)std::nearbyint(v[j] * id)));
    q8[j] = (int8_t)q;
    (j < 16 ? lo : hi) += q;
  }
  s[0] = d;
  s[1] = d * (float)(lo + hi);
  s[2] = (float)lo;
  s[3] = (float)hi;
}

}  // namespace

void quantize_scalar(const float* x, int8_t* q8, float* s, int64_t b, int64_t e) {
  for (int64_t i = b; i < e; ++i) quantize_block_scalar(x + i * 32, q8 + i * 32, s + i * 4);
}

// x: [M, K] float32 -> (xq int8 [M, K], xs float32 [M, K/32, 4] = dx, dx*sum, sum(first 16), sum(last 16))
std::vector<at::Tensor> quantize_rows(const at::Tensor& x_in, int64_t isa) {
  sync_thread_count();
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) % 32 == 0, "activations must be [M, K] with K a multiple of 32");
  const at::Tensor x = as_contiguous(x_in);
  const int64_t M = x.size(0), K = x.size(1), U = K / 32;
  auto xq = at::empty({M, K}, at::kChar);
  auto xs = at::empty({M, U, 4}, at::kFloat);
  const float* px = x.data_ptr<float>();
  int8_t* pq = xq.data_ptr<int8_t>();
  float* ps = xs.data_ptr<float>();
  const QuantizeFn quantize = kernel_set(isa).quantize;
  const auto run = [&](int64_t b, int64_t e) { quantize(px, pq, ps, b, e); };
  if (M * U <= 512) run(0, M * U);  // a few blocks: a parallel region costs more than it saves
  else at::parallel_for(0, M * U, 256, run);
  return {xq, xs};
}

}  // namespace dovetail
