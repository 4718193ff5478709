// The machine's roof (benchmarks): what the kernels' figures are fractions of. The int8
// multiply-add peak of a kernel path (its spin loop, registers only) and the rate at which the
// threads stream memory (a sum over a buffer far larger than the caches).
#include <chrono>

#include "ops.h"

namespace dovetail {

// int8 multiply-adds per second of kernel path `isa` (2 AVX2, 3 AVX-512 VNNI) on torch's threads.
double roof_int8_macs(int64_t isa, int64_t iters) {
  sync_thread_count();
  const KernelSet& set = kernel_set(isa);
  TORCH_CHECK(set.spin, "the int8 roof is measured for the AVX2 and AVX-512 paths");
  const int64_t threads = at::get_num_threads();
  std::vector<int32_t> sink(threads);
  const auto t0 = std::chrono::steady_clock::now();
  at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) sink[i] = set.spin(iters);
  });
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  volatile int32_t keep = sink[0];
  (void)keep;
  return (double)threads * iters * SPIN_CHAINS * set.spin_macs / seconds;
}

// Bytes per second the threads read from `buffer` (uint8, much larger than the caches), best of
// `reps` passes.
double roof_read_bytes(const at::Tensor& buffer, int64_t reps) {
  sync_thread_count();
  TORCH_CHECK(buffer.is_contiguous() && buffer.scalar_type() == at::kByte, "a contiguous uint8 buffer");
  const int64_t words = buffer.numel() / 8;
  const uint64_t* p = (const uint64_t*)buffer.data_ptr<uint8_t>();
  double best = 0;
  for (int64_t r = 0; r < reps; ++r) {
    std::vector<uint64_t> sums(at::get_num_threads() * 8, 0);
    const auto t0 = std::chrono::steady_clock::now();
    at::parallel_for(0, words, 1 << 16, [&](int64_t b, int64_t e) {
      uint64_t s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t i = b;
      for (; i + 8 <= e; i += 8)
        for (int j = 0; j < 8; ++j) s[j] += p[i + j];
      for (; i < e; ++i) s[0] += p[i];
      for (int j = 0; j < 8; ++j) sums[at::get_thread_num() * 8 + j] += s[j];
    });
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    volatile uint64_t keep = sums[0];
    (void)keep;
    best = std::max(best, (double)words * 8 / seconds);
  }
  return best;
}
}  // namespace dovetail
