// The kernel registry: one table maps {kernel path} x {format} to kernels, and every operator
// (matmul.cpp, quantize.cpp, attention.cpp, roof.cpp, sampling.cpp) picks its kernel through kernel_set(). The
// CPU's features are read once. Paths: the portable scalar one (every CPU, and the reference the
// others follow bit for bit), then AVX2 + FMA and AVX-512 VNNI on x86.
#include <c10/util/Exception.h>

#include "kernels.h"
#include "portable.h"
#include "x86/x86.h"

namespace dovetail {

int64_t PREFETCH_BYTES = 2048;

namespace {

#define DOVETAIL_SCALAR_TILE(B, G, MODE) &tile_scalar,
const TileFn SCALAR_TILES[N_FORMATS] = {DOVETAIL_FORMATS(DOVETAIL_SCALAR_TILE)};
#undef DOVETAIL_SCALAR_TILE

const KernelSet SETS[] = {
    {ISA_SCALAR, "scalar", SCALAR_TILES, &quantize_scalar, &attend_scalar, nullptr, 0, &find_range_scalar},
#if DOVETAIL_X86
    // AVX-512 VNNI shares the AVX2 activation quantizer and range finder: they are not where the time goes.
    {ISA_AVX2, "avx2", x86::AVX2_TILES, &x86::quantize_avx2, &x86::attend_avx2, &x86::spin_avx2, 32, &x86::find_range_avx2},
    {ISA_AVX512, "avx512-vnni", x86::AVX512_TILES, &x86::quantize_avx2, &x86::attend_avx512, &x86::spin_avx512, 64, &x86::find_range_avx2},
#endif
};

}  // namespace

int best_isa() {
#if DOVETAIL_X86
  static const int best = x86::best_isa();
#else
  static const int best = ISA_SCALAR;
#endif
  return best;
}

const KernelSet& kernel_set(int64_t isa) {
  const int best = best_isa();
  const int64_t path = isa == ISA_AUTO ? best : isa;
  TORCH_CHECK(path >= ISA_SCALAR && path <= best, "kernel path ", isa, " is not supported by this CPU (best: ", best, ")");
  for (const KernelSet& set : SETS)
    if (set.isa == path) return set;
  TORCH_CHECK(false, "no kernels for path ", path);
}

}  // namespace dovetail
