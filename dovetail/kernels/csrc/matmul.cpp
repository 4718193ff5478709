// Quantized y = x @ W.T for blocks of rows, on the packed layout (kernels.h): the operator, the
// portable tile kernel every other path follows, and the exact dequantisation of rows.
// The weight unit is unpacked once and applied to every row of the block: the cost of a block of
// rows grows far slower than the number of rows, which is what speculative verification needs.
#include <algorithm>
#include <cmath>

#include "ops.h"
#include "portable.h"

namespace dovetail {

// ---- one tile, rows [0, M): portable scalar path ---------------------------------------------
// The arithmetic every path follows, lane by lane: per row and unit, isum_h = sum(q * xq) over
// group h (exact int32). Symmetric: total = sum_h sc_h * (isum_h - z * sum_h(xq)) in int32, then
// acc = fma(float(total), D * dx, acc). Asymmetric: acc = fma(float(isum_h), S_h * dx, acc), then
// acc = fma(M_h, dx * sum_h(xq), acc) per group.
void tile_scalar(const Packed& w, int64_t t, const int8_t* xq, const float* xs, int64_t M, float* acc) {
  alignas(64) uint8_t vals[512];
  UnitFactors uf;
  const int halves = 32 / w.gs, chunks = w.gs / 4;
  const bool sym = w.mode == SYM_BLOCK || w.mode == SYM_K;
  for (int64_t u = 0; u < w.U; ++u) {
    unpack_unit(w, t, u, vals);
    unit_factors(w, t, u, uf);
    for (int64_t m = 0; m < M; ++m) {
      const int8_t* x = xq + unit_row(M, u, m) * 32;
      const float* s = xs + unit_row(M, u, m) * 4;
      for (int o = 0; o < 16; ++o) {
        float f = acc[m * 16 + o];
        int32_t total = 0;
        for (int h = 0; h < halves; ++h) {
          int32_t isum = 0;
          for (int c = h * chunks; c < (h + 1) * chunks; ++c)
            for (int j = 0; j < 4; ++j) {
              const int32_t q = w.bits == 8 ? (int32_t)(int8_t)vals[c * 64 + o * 4 + j] : (int32_t)vals[c * 64 + o * 4 + j];
              isum += q * (int32_t)x[c * 4 + j];
            }
          if (sym) {
            const int32_t xsum = halves == 1 ? (int32_t)s[2] + (int32_t)s[3] : (int32_t)s[2 + h];
            total += uf.sc[h][o] * (isum - w.zi * xsum);
          } else {
            f = std::fma((float)isum, uf.S[h][o] * s[0], f);
            f = std::fma(uf.M[h][o], halves == 1 ? s[1] : s[0] * s[2 + h], f);
          }
        }
        if (sym) f = std::fma((float)total, uf.D[o] * s[0], f);
        acc[m * 16 + o] = f;
      }
    }
  }
}


namespace {

const float* opt_f(const at::Tensor& t) { return t.numel() ? t.data_ptr<float>() : nullptr; }
const int8_t* opt_i8(const at::Tensor& t) { return t.numel() ? t.data_ptr<int8_t>() : nullptr; }

}  // namespace

Packed make_packed(const at::Tensor& q, const at::Tensor& D, const at::Tensor& Dm, const at::Tensor& sc,
                   const at::Tensor& mn, int64_t N, int64_t K, int64_t bits, int64_t gs, int64_t sb, int64_t mode,
                   double z) {
  TORCH_CHECK(K % 32 == 0 && sb % 32 == 0 && (gs == 16 || gs == 32), "bad packed shape");
  TORCH_CHECK(q.is_contiguous() && D.is_contiguous() && Dm.is_contiguous() && sc.is_contiguous() && mn.is_contiguous(),
              "packed tensors must be contiguous");
  Packed w;
  w.N = N; w.K = K; w.T = (N + 15) / 16; w.U = K / 32; w.nsb = K / sb; w.ngroups = K / gs;
  w.bits = (int)bits; w.gs = (int)gs; w.sb = (int)sb; w.mode = (int)mode; w.z = (float)z; w.zi = (int32_t)z;
  w.format = format_index(w.bits, w.gs, w.mode);
  TORCH_CHECK(w.format >= 0, "no kernel for bits=", bits, " group=", gs, " mode=", mode);
  w.qbytes = bits == 8 ? 512 : 256 + (bits - 4) * 64;
  TORCH_CHECK(q.numel() == w.T * w.U * w.qbytes, "packed values have the wrong size");
  TORCH_CHECK(D.numel() == w.T * w.nsb * 16, "packed scales have the wrong size");
  w.q = q.data_ptr<uint8_t>(); w.D = D.data_ptr<float>(); w.Dm = opt_f(Dm); w.sc = opt_i8(sc); w.mn = opt_i8(mn);
  return w;
}


// The rows of xq [M, K] / xs [M, U, 4] (quantize_rows) in blocks of `rows`, each block unit-major
// (unit_row, kernels.h): a tile then reads one contiguous run per unit instead of one cache line
// per row, and addresses its rows by constant offsets.
static void pack_rows(const int8_t* xq, const float* xs, int64_t M, int64_t U, int64_t rows, int8_t* xp, float* sp) {
  at::parallel_for(0, (M + rows - 1) / rows, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      const int64_t m0 = c * rows, n = std::min(rows, M - m0);
      for (int64_t m = 0; m < n; ++m)
        for (int64_t u = 0; u < U; ++u) {
          std::memcpy(xp + (m0 * U + unit_row(n, u, m)) * 32, xq + ((m0 + m) * U + u) * 32, 32);
          std::memcpy(sp + (m0 * U + unit_row(n, u, m)) * 4, xs + ((m0 + m) * U + u) * 4, 4 * sizeof(float));
        }
    }
  });
}

// y = x @ W.T (+ bias) from activations already quantised by quantize_rows: several weights that
// read the same input (q/k/v, gate/up) share one quantisation.
at::Tensor qmatmul_quantized(const at::Tensor& xq_in, const at::Tensor& xs_in, const at::Tensor& q,
                                const at::Tensor& D, const at::Tensor& Dm, const at::Tensor& sc,
                                const at::Tensor& mn, int64_t N, int64_t bits, int64_t gs, int64_t sb, int64_t mode,
                                double z, int64_t isa, const c10::optional<at::Tensor>& bias_in) {
  sync_thread_count();
  TORCH_CHECK(xq_in.dim() == 2 && xq_in.scalar_type() == at::kChar, "xq must be int8 [M, K]");
  const at::Tensor xq_t = xq_in.contiguous(), xs_t = xs_in.contiguous();
  const int64_t M = xq_t.size(0), K = xq_t.size(1);
  TORCH_CHECK(xs_t.numel() == M * (K / 32) * 4, "xs does not match xq");
  const Packed w = make_packed(q, D, Dm, sc, mn, N, K, bits, gs, sb, mode, z);
  const TileFn tile = kernel_set(isa).tiles[w.format];
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    bias = as_contiguous(*bias_in);
    TORCH_CHECK(bias.numel() == N, "bias has the wrong size");
  }
  const float* pb = bias.defined() ? bias.data_ptr<float>() : nullptr;
  auto y = at::empty({M, N}, at::kFloat);
  float* py = y.data_ptr<float>();
  // Rows go in passes whose int8 activations stay in a core's L2 (PASS_BYTES) while every tile of
  // the weight streams past them; within a pass, ROWS rows at a time keep their accumulators in L1.
  // One pass covers decoding and verification; a long prompt's rows would otherwise be re-read from
  // memory for every tile (the down projection, 8960 inputs a row, would run at half its rate at 512 rows).
  constexpr int64_t ROWS = 64, PASS_BYTES = 512 * 1024;
  // One row (decoding) is unit-major as it stands: only blocks of rows are packed.
  at::Tensor xp_t = M > 1 ? at::empty_like(xq_t) : xq_t, sp_t = M > 1 ? at::empty_like(xs_t) : xs_t;
  int8_t* xq = xp_t.data_ptr<int8_t>();
  float* xs = sp_t.data_ptr<float>();
  if (M > 1) pack_rows(xq_t.data_ptr<int8_t>(), xs_t.data_ptr<float>(), M, w.U, ROWS, xq, xs);
  const int64_t pass = std::max<int64_t>(ROWS, PASS_BYTES / K / ROWS * ROWS);
  for (int64_t p0 = 0; p0 < M; p0 += pass) {
    const int64_t p1 = std::min(M, p0 + pass);
    at::parallel_for(0, w.T, 1, [&](int64_t b, int64_t e) {
      alignas(64) float acc[ROWS * 16];
      for (int64_t t = b; t < e; ++t)
        for (int64_t m0 = p0; m0 < p1; m0 += ROWS) {
          const int64_t rows = std::min(ROWS, p1 - m0);
          std::memset(acc, 0, sizeof(float) * rows * 16);
          tile(w, t, xq + m0 * K, xs + m0 * w.U * 4, rows, acc);
          const int64_t n0 = t * 16, width = std::min<int64_t>(16, N - n0);
          for (int64_t m = 0; m < rows; ++m) {
            float* out = py + (m0 + m) * N + n0;
            if (pb) for (int64_t o = 0; o < width; ++o) out[o] = acc[m * 16 + o] + pb[n0 + o];
            else std::memcpy(out, acc + m * 16, sizeof(float) * width);
          }
        }
    });
  }
  return y;
}

at::Tensor qmatmul(const at::Tensor& x, const at::Tensor& q, const at::Tensor& D, const at::Tensor& Dm,
                      const at::Tensor& sc, const at::Tensor& mn, int64_t N, int64_t bits, int64_t gs, int64_t sb,
                      int64_t mode, double z, int64_t isa) {
  TORCH_CHECK(x.dim() == 2, "x must be [M, K]");
  auto quantized = quantize_rows(x, isa);
  return qmatmul_quantized(quantized[0], quantized[1], q, D, Dm, sc, mn, N, bits, gs, sb, mode, z, isa, c10::nullopt);
}

// Rows `rows` of the packed weight as float32 [len(rows), K] (w = S * q + M; exact): embeddings, checks.
at::Tensor dequantize_rows(const at::Tensor& q, const at::Tensor& D, const at::Tensor& Dm,
                              const at::Tensor& sc, const at::Tensor& mn, int64_t N, int64_t K, int64_t bits,
                              int64_t gs, int64_t sb, int64_t mode, double z, const at::Tensor& rows_in) {
  sync_thread_count();
  const Packed w = make_packed(q, D, Dm, sc, mn, N, K, bits, gs, sb, mode, z);
  const at::Tensor rows = rows_in.to(at::kLong).contiguous();
  const int64_t R = rows.numel();
  const int64_t* pr = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < R; ++i) TORCH_CHECK(pr[i] >= 0 && pr[i] < N, "row ", pr[i], " out of range [0, ", N, ")");
  auto out = at::empty({R, K}, at::kFloat);
  float* po = out.data_ptr<float>();
  at::parallel_for(0, R, 16, [&](int64_t b, int64_t e) {
    alignas(64) uint8_t vals[512];
    UnitFactors uf;
    for (int64_t i = b; i < e; ++i) {
      const int64_t t = pr[i] / 16, o = pr[i] % 16;
      for (int64_t u = 0; u < w.U; ++u) {
        unpack_unit(w, t, u, vals);
        unit_factors(w, t, u, uf);
        for (int c = 0; c < 8; ++c)
          for (int j = 0; j < 4; ++j) {
            const int h = (c * 4) / w.gs;
            const uint8_t raw = vals[c * 64 + o * 4 + j];
            const float qv = w.bits == 8 ? (float)(int8_t)raw : (float)raw;
            const float prod = uf.S[h][o] * qv;  // exact: small integer times a short mantissa
            po[i * K + u * 32 + c * 4 + j] = prod + uf.M[h][o];
          }
      }
    }
  });
  return out;
}

}  // namespace dovetail
