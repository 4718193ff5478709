// The Python module: binds the operators of ops.h.
#include <torch/extension.h>

#include "ops.h"

namespace {

int64_t cpu_best_isa() { return dovetail::best_isa(); }
std::string kernel_path_name(int64_t isa) { return dovetail::kernel_set(isa).name; }
void set_prefetch_bytes(int64_t bytes) { dovetail::PREFETCH_BYTES = bytes; }
bool built_for_x86() { return DOVETAIL_X86; }

using OptionalNorm = std::optional<std::pair<at::Tensor, double>>;
dovetail::Norm norm(const OptionalNorm& n) { return n ? dovetail::Norm{n->first, n->second} : dovetail::Norm{}; }

dovetail::QLinear make_linear(at::Tensor q, at::Tensor D, at::Tensor Dm, at::Tensor sc, at::Tensor mn, int64_t N,
                              int64_t bits, int64_t gs, int64_t sb, int64_t mode, double z, int64_t isa,
                              c10::optional<at::Tensor> bias) {
  return dovetail::QLinear{q, D, Dm, sc, mn, N, bits, gs, sb, mode, z, isa, bias};
}

dovetail::DecoderLayer make_layer(std::vector<dovetail::QLinear> qkv, dovetail::QLinear o,
                                  std::vector<dovetail::QLinear> gate_up, dovetail::QLinear down, const OptionalNorm& ln1,
                                  const OptionalNorm& q_norm, const OptionalNorm& k_norm, const OptionalNorm& post_attn,
                                  const OptionalNorm& pre_mlp, const OptionalNorm& post_mlp, int64_t heads,
                                  int64_t kv_heads, int64_t head_dim, double scale, bool gelu, int64_t isa) {
  TORCH_CHECK((qkv.size() == 1 || qkv.size() == 3) && (gate_up.size() == 1 || gate_up.size() == 2) && ln1 && pre_mlp &&
              bool(q_norm) == bool(k_norm), "bad decoder layer");
  return dovetail::DecoderLayer{qkv, gate_up, o, down, norm(ln1), norm(q_norm), norm(k_norm), norm(post_attn),
                                norm(pre_mlp), norm(post_mlp), heads, kv_heads, head_dim, isa, scale, gelu};
}

dovetail::Decoder make_decoder(std::vector<dovetail::DecoderLayer> layers, const OptionalNorm& final) {
  TORCH_CHECK(final, "the decoder needs its final norm");
  return dovetail::Decoder{std::move(layers), norm(final)};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quantize_rows", &dovetail::quantize_rows, "int8 activations per 32-block", py::arg("x"), py::arg("isa") = 0);
  m.def("qmatmul", &dovetail::qmatmul, "y = x @ W.T for a packed quantized W");
  m.def("qmatmul_quantized", &dovetail::qmatmul_quantized, "y = x @ W.T (+ bias) from quantize_rows' output");
  m.def("rms_norm", &dovetail::rms_norm, "RMSNorm of each row");
  m.def("add_rms_norm_", &dovetail::add_rms_norm_, "h += delta in place, then RMSNorm(h)");
  m.def("rope_", &dovetail::rope_, "rotary embedding in place (HF half-rotation convention)");
  m.def("filter_probs_", &dovetail::filter_probs_, "top-k, then top-p, on rows of probabilities in place, renormalised",
        py::arg("probs"), py::arg("top_k"), py::arg("top_p"), py::arg("isa") = 0);
  m.def("draw_token", &dovetail::draw_token, "the inverse CDF of a row of probabilities at u x its sum");
  m.def("dequantize_rows", &dovetail::dequantize_rows, "rows of a packed weight as float32");
  m.def("best_isa", &cpu_best_isa, "1 scalar, 2 AVX2+FMA, 3 AVX-512 VNNI");
  m.def("row_attention", &dovetail::row_attention, "attention, each query row on its own (block-independent)", py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("visible"), py::arg("scale"), py::arg("isa") = 0);
  m.def("kernel_path_name", &kernel_path_name, "the name of a kernel path (0: the best this CPU runs)",
        py::arg("isa") = 0);
  m.def("built_for_x86", &built_for_x86, "whether the x86 kernel paths were compiled in");
  m.def("set_prefetch_bytes", &set_prefetch_bytes, "software prefetch distance (benchmarks)");
  m.def("roof_int8_macs", &dovetail::roof_int8_macs, "int8 multiply-adds per second of a kernel path (benchmarks)");
  m.def("roof_read_bytes", &dovetail::roof_read_bytes, "bytes per second the threads stream from a buffer (benchmarks)");
  // module_local: a second build in the same process (tests load the portable one beside it) has its own
  py::class_<dovetail::QLinear>(m, "QLinear", py::module_local(), "a QuantLinear's kernel arguments (its _weight_args)")
      .def(py::init(&make_linear));
  py::class_<dovetail::DecoderLayer>(m, "DecoderLayer", py::module_local(), "a decoder layer's weights, norms and shape")
      .def(py::init(&make_layer), py::arg("qkv"), py::arg("o"), py::arg("gate_up"), py::arg("down"), py::arg("ln1"),
           py::arg("q_norm"), py::arg("k_norm"), py::arg("post_attn"), py::arg("pre_mlp"), py::arg("post_mlp"),
           py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("scale"), py::arg("gelu"), py::arg("isa"));
  py::class_<dovetail::Decoder>(m, "Decoder", py::module_local(), "a decoder's layers and its final norm")
      .def(py::init(&make_decoder), py::arg("layers"), py::arg("final"));
  m.def("decoder_layers", &dovetail::decoder_layers,
        "layers [first, last) of a decoder (h updated in place, their KV rows written), one call");
  m.def("set_layer_timing", &dovetail::set_layer_timing, "time decoder_layer's operators (benchmarks)");
  m.def("take_layer_timings", &dovetail::take_layer_timings, "decoder_layer's seconds by operator since the last take");
  m.def("decode_values", &dovetail::decode_values, "integer values of GGUF blocks");
  m.def("pack_values", &dovetail::pack_values, "values -> the kernel's tile layout");
}
