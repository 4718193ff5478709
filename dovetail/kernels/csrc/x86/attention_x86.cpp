// The x86 builds of attention (attention.h), chosen by the registry: the same source, the same
// bits, wider vectors. AVX2: 4 keys scored together (8 accumulators of 8 lanes and the query's two
// halves fit the 16 ymm registers), 4 vectors of 8 outputs summed together. AVX-512: 16 keys
// reduced together by the transposing network, 8 vectors of 16 outputs.
#include "x86.h"

#if DOVETAIL_X86
#include "../attention.h"

namespace dovetail::x86 {

__attribute__((target("avx2"))) DOVETAIL_ATTEND_BUILD(attend_avx2, 4, v8f, 4)
__attribute__((target("avx512f"))) DOVETAIL_ATTEND_BUILD(attend_avx512, 16, v16f, 8)

}  // namespace dovetail::x86
#endif
