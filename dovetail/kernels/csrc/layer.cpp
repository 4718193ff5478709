// One decoder layer in one call (models/fast_forward.py): the operators of ops.h, called in the
// order and on the data the per-operator Python path gives them, so every output bit is the same;
// what goes is the Python between them (a call, a view, a module wrapper each, some fifteen a
// layer). The activation runs as ATen's own operators (at::silu_ / at::gelu, then mul_), the ones
// torch.nn.functional calls, so it gives their bits too.
#include <chrono>
#include <map>
#include <string>
#include <unordered_map>

#include "ops.h"

namespace dovetail {
namespace {

// Per-operator timing for the profile benchmark (bench/profile.py): off unless asked for.
enum Op { QUANTIZE, NORM, RESIDUAL, ROPE, ATTENTION, N_OPS };
const char* const OP_NAMES[N_OPS] = {"quantize_rows", "rms_norm", "add_rms_norm_", "rope_", "row_attention"};
bool TIMING = false;
double OP_SECONDS[N_OPS] = {};
std::unordered_map<const void*, double> LINEAR_SECONDS;  // by the packed values' address

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

template <typename F>
auto timed(Op op, F&& f) {
  if (!TIMING) return f();
  const double t0 = now();
  auto out = f();
  OP_SECONDS[op] += now() - t0;
  return out;
}

}  // namespace

at::Tensor QLinear::operator()(const at::Tensor& xq, const at::Tensor& xs) const {
  if (!TIMING) return qmatmul_quantized(xq, xs, q, D, Dm, sc, mn, N, bits, gs, sb, mode, z, isa, bias);
  const double t0 = now();
  auto y = qmatmul_quantized(xq, xs, q, D, Dm, sc, mn, N, bits, gs, sb, mode, z, isa, bias);
  LINEAR_SECONDS[q.data_ptr()] += now() - t0;
  return y;
}

// QuantLinear.forward: its own quantization of the input rows [M, in], then the matmul.
at::Tensor QLinear::forward(const at::Tensor& x) const {
  const auto xq = timed(QUANTIZE, [&] { return quantize_rows(x, isa); });
  return (*this)(xq[0], xq[1]);
}

static at::Tensor norm_rows(const at::Tensor& x, const Norm& norm, int64_t rows) {
  return timed(NORM, [&] { return rms_norm(x.view({rows, -1}), norm.w, norm.eps); });
}

// One layer: the per-operator path of fast_forward (FastForward._layer_ops), step for step.
static at::Tensor layer(const DecoderLayer& p, at::Tensor& h, const at::Tensor& x, const at::Tensor& cos,
                        const at::Tensor& sin, const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t n,
                        const at::Tensor& visible, const Norm& next) {
  const int64_t L = x.size(0), d = p.head_dim, Hkv = p.kv_heads, H = p.heads;
  TORCH_CHECK(k_cache.scalar_type() == at::kFloat && v_cache.scalar_type() == at::kFloat && k_cache.is_contiguous() &&
              v_cache.is_contiguous() && k_cache.sizes() == v_cache.sizes() && k_cache.size(-1) == d &&
              k_cache.numel() % (Hkv * d) == 0, "the KV buffers must be contiguous float32 [.., kv_heads, rows, head_dim]");
  const int64_t capacity = k_cache.numel() / (Hkv * d);
  TORCH_CHECK(n >= 0 && n + L <= capacity, "no room in the KV buffers for ", L, " rows after ", n);
  // attention: norm (fused into the previous residual step) -> q, k, v from one quantization
  auto xq = timed(QUANTIZE, [&] { return quantize_rows(x, p.isa); });
  at::Tensor q, k, v;
  if (p.qkv.size() == 3) {
    q = p.qkv[0](xq[0], xq[1]), k = p.qkv[1](xq[0], xq[1]), v = p.qkv[2](xq[0], xq[1]);
  } else {  // fused rows q | k | v
    const at::Tensor y = p.qkv[0](xq[0], xq[1]);
    q = y.narrow(1, 0, H * d).contiguous(), k = y.narrow(1, H * d, Hkv * d).contiguous();
    v = y.narrow(1, (H + Hkv) * d, Hkv * d);
  }
  if (p.q_norm.w.defined()) {  // per head, before the rotary embedding
    q = norm_rows(q, p.q_norm, L * H).view({L, -1});
    k = norm_rows(k, p.k_norm, L * Hkv).view({L, -1});
  }
  timed(ROPE, [&] { rope_(q, cos, sin); return 0; });
  timed(ROPE, [&] { rope_(k, cos, sin); return 0; });
  // the new rows into the cache's buffers, at rows n .. n + L of each KV head (what cache.update writes)
  {
    TORCH_CHECK(v.stride(1) == 1, "v rows must be contiguous");
    float *pk = k_cache.data_ptr<float>(), *pv = v_cache.data_ptr<float>();
    const float *sk = k.data_ptr<float>(), *sv = v.data_ptr<float>();
    const int64_t vs = v.stride(0);
    for (int64_t g = 0; g < Hkv; ++g)
      for (int64_t l = 0; l < L; ++l) {
        std::memcpy(pk + (g * capacity + n + l) * d, sk + (l * Hkv + g) * d, d * sizeof(float));
        std::memcpy(pv + (g * capacity + n + l) * d, sv + l * vs + g * d, d * sizeof(float));
      }
  }
  const at::Tensor keys = k_cache.view({Hkv, capacity, d}).narrow(1, 0, n + L);
  const at::Tensor values = v_cache.view({Hkv, capacity, d}).narrow(1, 0, n + L);
  at::Tensor a = timed(ATTENTION, [&] {
    return row_attention(q.view({L, H, d}).transpose(0, 1), keys, values, visible, p.scale, p.isa);
  });
  a = p.o.forward(a.view({L, -1}));
  if (p.post_attn.w.defined()) a = norm_rows(a, p.post_attn, L);
  // MLP
  at::Tensor xm = timed(RESIDUAL, [&] { return add_rms_norm_(h, a, p.pre_mlp.w, p.pre_mlp.eps); });
  xq = timed(QUANTIZE, [&] { return quantize_rows(xm, p.isa); });
  at::Tensor gate, up;
  if (p.gate_up.size() == 2) {
    gate = p.gate_up[0](xq[0], xq[1]), up = p.gate_up[1](xq[0], xq[1]);
  } else {  // fused rows gate | up
    const at::Tensor y = p.gate_up[0](xq[0], xq[1]);
    const int64_t half = y.size(1) / 2;
    gate = y.narrow(1, 0, half), up = y.narrow(1, half, half);
  }
  at::Tensor act = p.gelu ? at::gelu(gate, "tanh") : at::silu_(gate);
  act.mul_(up);
  at::Tensor m = p.down.forward(act);
  if (p.post_mlp.w.defined()) m = norm_rows(m, p.post_mlp, L);
  return timed(RESIDUAL, [&] { return add_rms_norm_(h, m, next.w, next.eps); });
}

at::Tensor decoder_layers(const Decoder& decoder, int64_t first, int64_t last, at::Tensor& h, const at::Tensor& x,
                          const std::vector<at::Tensor>& cos, const std::vector<at::Tensor>& sin,
                          const std::vector<at::Tensor>& k_caches, const std::vector<at::Tensor>& v_caches,
                          const std::vector<int64_t>& n, const std::vector<at::Tensor>& visible) {
  const int64_t count = last - first, size = (int64_t)decoder.layers.size();
  TORCH_CHECK(0 <= first && first <= last && last <= size, "layers ", first, "..", last, " of ", size);
  for (const size_t entries : {cos.size(), sin.size(), k_caches.size(), v_caches.size(), n.size(), visible.size()})
    TORCH_CHECK((int64_t)entries == count, "one entry a layer expected");
  TORCH_CHECK(h.is_contiguous() && h.scalar_type() == at::kFloat, "h must be contiguous float32");
  at::Tensor out = x;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t l = first + i;
    const Norm& next = l + 1 < size ? decoder.layers[l + 1].ln1 : decoder.final;
    out = layer(decoder.layers[l], h, out, cos[i], sin[i], k_caches[i], v_caches[i], n[i], visible[i], next);
  }
  return out;
}

void set_layer_timing(bool on) {
  TIMING = on;
  take_layer_timings();
}

std::map<std::string, double> take_layer_timings() {
  std::map<std::string, double> out;
  for (int op = 0; op < N_OPS; ++op) {
    if (OP_SECONDS[op] > 0) out[OP_NAMES[op]] = OP_SECONDS[op];
    OP_SECONDS[op] = 0;
  }
  for (const auto& [ptr, seconds] : LINEAR_SECONDS)
    out["linear@" + std::to_string(reinterpret_cast<uintptr_t>(ptr))] = seconds;
  LINEAR_SECONDS.clear();
  return out;
}

}  // namespace dovetail
