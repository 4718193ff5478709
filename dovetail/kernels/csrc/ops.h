// The operators Python calls (module.cpp binds them), one file per concern:
//   matmul.cpp    quantized y = x @ W.T and the exact dequantisation of rows
//   quantize.cpp  activations to int8 blocks
//   rowops.cpp    RMSNorm, the residual step, rotary embedding
//   attention.cpp attention, each query row on its own
//   repack.cpp    GGUF blocks -> the packed layout (load time)
//   roof.cpp      the machine's int8 peak and read bandwidth (benchmarks)
// Each picks its kernel through the registry (registry.cpp); `isa` 0 is the best path this CPU runs.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

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
double roof_int8_macs(int64_t isa, int64_t iters);
double roof_read_bytes(const at::Tensor& buffer, int64_t reps);

}  // namespace dovetail
