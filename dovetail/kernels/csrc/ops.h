// The operators Python calls (module.cpp binds them), one file per concern:
//   matmul.cpp    quantized y = x @ W.T and the exact dequantisation of rows
//   quantize.cpp  activations to int8 blocks
//   rowops.cpp    RMSNorm, the residual step, rotary embedding
//   attention.cpp attention, each query row on its own
//   layer.cpp     a whole decoder layer in one call, from the operators above
//   sampling.cpp  top-k / top-p on a row of probabilities, the inverse-CDF draw
//   repack.cpp    GGUF blocks -> the packed layout (load time)
//   roof.cpp      the machine's int8 peak and read bandwidth (benchmarks)
// Each picks its kernel through the registry (registry.cpp); `isa` 0 is the best path this CPU runs.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <map>
#include <string>

#include "kernels.h"

namespace dovetail {

// OpenMP's team size is a per-thread setting, and a new thread starts from OMP_NUM_THREADS (Ray
// sets 1 for its workers, whose message loops run in their own threads). torch's own operators
// re-apply torch.set_num_threads in each new thread; these operators must do the same.
inline void sync_thread_count() {
  thread_local bool done = false;
  if (!done) {
    at::init_num_threads();
    done = true;
  }
}

// `t` as a contiguous tensor of `type`: itself when it is one already. `to` and `contiguous` would
// return it too, but through the dispatcher, a microsecond or so a call (some twenty a layer).
inline at::Tensor as_contiguous(const at::Tensor& t, at::ScalarType type = at::kFloat) {
  return t.scalar_type() == type && t.is_contiguous() ? t : t.to(type).contiguous();
}

Packed make_packed(const at::Tensor& q, const at::Tensor& D, const at::Tensor& Dm, const at::Tensor& sc,
                   const at::Tensor& mn, int64_t N, int64_t K, int64_t bits, int64_t gs, int64_t sb, int64_t mode,
                   double z);

std::vector<at::Tensor> quantize_rows(const at::Tensor& x, int64_t isa);
at::Tensor qmatmul_quantized(const at::Tensor& xq, const at::Tensor& xs, const at::Tensor& q,
                                const at::Tensor& D, const at::Tensor& Dm, const at::Tensor& sc,
                                const at::Tensor& mn, int64_t N, int64_t bits, int64_t gs, int64_t sb, int64_t mode,
                                double z, int64_t isa, const c10::optional<at::Tensor>& bias);
at::Tensor qmatmul(const at::Tensor& x, const at::Tensor& q, const at::Tensor& D, const at::Tensor& Dm,
                      const at::Tensor& sc, const at::Tensor& mn, int64_t N, int64_t bits, int64_t gs, int64_t sb,
                      int64_t mode, double z, int64_t isa);
at::Tensor dequantize_rows(const at::Tensor& q, const at::Tensor& D, const at::Tensor& Dm,
                              const at::Tensor& sc, const at::Tensor& mn, int64_t N, int64_t K, int64_t bits,
                              int64_t gs, int64_t sb, int64_t mode, double z, const at::Tensor& rows);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps);
at::Tensor add_rms_norm_(at::Tensor& h, const at::Tensor& delta, const at::Tensor& w, double eps);
void rope_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
at::Tensor row_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& visible, double scale, int64_t isa);
at::Tensor decode_values(const at::Tensor& raw, int64_t type, int64_t N, int64_t K);
at::Tensor pack_values(const at::Tensor& q, int64_t bits);
void filter_probs_(at::Tensor& probs, int64_t top_k, double top_p, int64_t isa);
int64_t draw_token(const at::Tensor& probs, double u);

double roof_int8_macs(int64_t isa, int64_t iters);
double roof_read_bytes(const at::Tensor& buffer, int64_t reps);


// A QuantLinear's kernel arguments (its _weight_args, in that order), held by a DecoderLayer.
struct QLinear {
  at::Tensor q, D, Dm, sc, mn;
  int64_t N, bits, gs, sb, mode;
  double z;
  int64_t isa;
  c10::optional<at::Tensor> bias;
  at::Tensor operator()(const at::Tensor& xq, const at::Tensor& xs) const;  // forward_quantized
  at::Tensor forward(const at::Tensor& x) const;                            // QuantLinear.forward
};
struct Norm {  // an RMSNorm's weight (as the kernel multiplies by it) and eps; no weight: absent
  at::Tensor w;
  double eps = 0;
};
// What a decoder layer computes with (models/fast_forward.py builds it once per layer).
struct DecoderLayer {
  std::vector<QLinear> qkv, gate_up;  // q, k, v or one fused qkv; gate, up or one fused gate_up
  QLinear o, down;
  Norm ln1, q_norm, k_norm, post_attn, pre_mlp, post_mlp;  // ln1, pre_mlp always; the others by family
  int64_t heads, kv_heads, head_dim, isa;
  double scale;
  bool gelu;  // the MLP's activation: gelu (tanh approximation), else silu
};
struct Decoder {  // the layers, then the final norm
  std::vector<DecoderLayer> layers;
  Norm final;
};
// Layers [first, last) of the decoder on rows x (the first one's input norm applied): each adds its
// attention and its MLP to h in place and writes its new keys/values into rows n .. n + L of its
// KV buffers (the i-th entries of the lists are layer first + i's); returns the normed input of the
// next layer (after the last layer: the final norm's output).
at::Tensor decoder_layers(const Decoder& decoder, int64_t first, int64_t last, at::Tensor& h, const at::Tensor& x,
                          const std::vector<at::Tensor>& cos, const std::vector<at::Tensor>& sin,
                          const std::vector<at::Tensor>& k_caches, const std::vector<at::Tensor>& v_caches,
                          const std::vector<int64_t>& n, const std::vector<at::Tensor>& visible);
void set_layer_timing(bool on);                     // per-operator times inside decoder_layer (benchmarks)
std::map<std::string, double> take_layer_timings();  // seconds by operator since the last take

}  // namespace dovetail
