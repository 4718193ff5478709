// The small per-row operators of a decoder layer. Each is a loop per row in a fixed order
// (row-independent, like every kernel), and one call instead of the handful of tensor operators
// a module would run: in a 1-token forward of a small model those calls, not the arithmetic, are
// what costs.
#include <cmath>

#include "ops.h"

namespace dovetail {
namespace {

// sum of squares of one row, in 8 interleaved lanes (vectorisable without reordering)
inline float sum_squares(const float* a, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int t = 0; t < 8; ++t) acc[t] = acc[t] + a[j + t] * a[j + t];
  for (; j < n; ++j) acc[j % 8] = acc[j % 8] + a[j] * a[j];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

void rms_norm_rows(const float* x, const float* w, float* out, int64_t M, int64_t H, float eps) {
  for (int64_t m = 0; m < M; ++m) {
    const float* r = x + m * H;
    const float inv = 1.f / std::sqrt(sum_squares(r, H) / (float)H + eps);
    for (int64_t j = 0; j < H; ++j) out[m * H + j] = w[j] * (r[j] * inv);
  }
}

}  // namespace

// RMSNorm: w * x / sqrt(mean(x^2) + eps), rows of x [M, H].
at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& w_in, double eps) {
  const at::Tensor x = as_contiguous(x_in), w = as_contiguous(w_in);
  const int64_t H = x.size(-1), M = x.numel() / H;
  TORCH_CHECK(w.numel() == H, "norm weight has the wrong size");
  auto out = at::empty_like(x);
  rms_norm_rows(x.data_ptr<float>(), w.data_ptr<float>(), out.data_ptr<float>(), M, H, (float)eps);
  return out;
}

// The residual step of a decoder layer: h += delta (in place), then RMSNorm(h).
at::Tensor add_rms_norm_(at::Tensor& h, const at::Tensor& delta_in, const at::Tensor& w_in, double eps) {
  TORCH_CHECK(h.is_contiguous() && h.scalar_type() == at::kFloat, "h must be contiguous float32");
  const at::Tensor delta = as_contiguous(delta_in), w = as_contiguous(w_in);
  TORCH_CHECK(delta.numel() == h.numel(), "residual shapes differ");
  const int64_t H = h.size(-1), M = h.numel() / H;
  float* ph = h.data_ptr<float>();
  const float* pd = delta.data_ptr<float>();
  for (int64_t i = 0; i < M * H; ++i) ph[i] = ph[i] + pd[i];
  auto out = at::empty_like(h);
  rms_norm_rows(ph, w.data_ptr<float>(), out.data_ptr<float>(), M, H, (float)eps);
  return out;
}

// Rotary embedding in place on x [L, heads * d] with cos/sin [L, d] (the HF convention: the two
// halves of each head rotate together): x * cos + rotate_half(x) * sin.
void rope_(at::Tensor& x, const at::Tensor& cos_in, const at::Tensor& sin_in) {
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == at::kFloat && x.dim() == 2, "x must be [L, heads*d] float32");
  const at::Tensor c = as_contiguous(cos_in), s = as_contiguous(sin_in);
  const int64_t L = x.size(0), d = c.size(-1), half = d / 2, heads = x.size(1) / d;
  TORCH_CHECK(c.numel() == L * d && s.numel() == L * d && heads * d == x.size(1), "rotary shapes differ");
  float* px = x.data_ptr<float>();
  const float *pc = c.data_ptr<float>(), *ps = s.data_ptr<float>();
  for (int64_t l = 0; l < L; ++l)
    for (int64_t h = 0; h < heads; ++h) {
      float* r = px + (l * heads + h) * d;
      const float *cl = pc + l * d, *sl = ps + l * d;
      for (int64_t j = 0; j < half; ++j) {
        const float a = r[j], b = r[j + half];
        r[j] = a * cl[j] + (-b) * sl[j];
        r[j + half] = b * cl[j + half] + a * sl[j + half];
      }
    }
}

}  // namespace dovetail
