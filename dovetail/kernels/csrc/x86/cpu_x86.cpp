// Which x86 kernel path this CPU runs, from CPUID (read once, by the registry).
#include "x86.h"

#if DOVETAIL_X86
namespace dovetail::x86 {

int best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
    return ISA_AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return ISA_AVX2;
  return ISA_SCALAR;
}

}  // namespace dovetail::x86
#endif
