// The Python module: binds the operators of ops.h.
#include <torch/extension.h>

#include "ops.h"

namespace {

int64_t cpu_best_isa() { return dovetail::best_isa(); }
std::string kernel_path_name(int64_t isa) { return dovetail::kernel_set(isa).name; }
void set_prefetch_bytes(int64_t bytes) { dovetail::PREFETCH_BYTES = bytes; }
bool built_for_x86() { return DOVETAIL_X86; }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quantize_rows", &dovetail::quantize_rows, "int8 activations per 32-block", py::arg("x"), py::arg("isa") = 0);
  m.def("qmatmul", &dovetail::qmatmul, "y = x @ W.T for a packed quantized W");
  m.def("qmatmul_quantized", &dovetail::qmatmul_quantized, "y = x @ W.T (+ bias) from quantize_rows' output");
  m.def("rms_norm", &dovetail::rms_norm, "RMSNorm of each row");
  m.def("add_rms_norm_", &dovetail::add_rms_norm_, "h += delta in place, then RMSNorm(h)");
  m.def("rope_", &dovetail::rope_, "rotary embedding in place (HF half-rotation convention)");
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
  m.def("decode_values", &dovetail::decode_values, "integer values of GGUF blocks");
  m.def("pack_values", &dovetail::pack_values, "values -> the kernel's tile layout");
}
