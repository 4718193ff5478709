// What every kernel file shares: the packed weight layout, the formats, and the kernel registry's
// types. Plain C++ (no torch, no intrinsics), so the architecture-specific files (x86/) compile
// quickly and a non-x86 build needs nothing from them.
//
// The packed layout (dovetail/kernels/packing.py writes it; every GGUF block format the engine runs
// is repacked into it, so one kernel serves them all):
//   * tiles of 16 output rows; along K, units of 32 inputs;
//   * one unit of one tile = 8 chunks of 64 bytes, chunk c holding inputs 4c..4c+3 of the 16
//     rows as bytes [row * 4 + j] -- exactly the operand shape of a 512-bit dpbusd, or of two
//     256-bit maddubs;
//   * 4/5/6-bit values: 4 vectors of nibbles (low nibble = chunk v, high = chunk v + 4), then
//     one 64-bit mask per chunk for each bit above the fourth; 8-bit values: 8 raw chunks (int8);
//   * per group (16 or 32 inputs) a float scale S and offset M, computed from the format's own
//     compact metadata (D, Dm per super-block; integer sub-scales sc, mins mn per group), so
//     w = S * q + M reproduces the GGUF dequantisation exactly.
// Activations are quantised per row to int8 in blocks of 32 (scale dx; integer sums of the
// quantised values, per block and per half block). For the symmetric formats (w = S * (q - z),
// S = D * sc) the offset and a K-format's integer sub-scales stay in the integer sum:
//     total = sum over groups h of the unit: sc_h * (sum(q * xq) - z * sum(xq)),   (exact int32)
//     acc   = fma(float(total), D * dx, acc),
// and for the asymmetric ones (w = S * q + M) each group adds
//     acc = fma(float(sum(q * xq)), S * dx, acc);  acc = fma(M, dx * sum(xq), acc).
// Each row's result depends on that row alone: the same token gives bit-identical outputs whether
// it is verified alone, in a tree or in a batch, and every kernel path agrees exactly (tile_scalar
// in matmul.cpp is the reference each vector path follows lane by lane).
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

// enum Mode and DOVETAIL_FORMATS(X): X(value bits, group size, mode) per format, whose index in
// the list is the format's column in the kernel table. Generated into the build folder from
// dovetail/kernels/formats.py (kernels/__init__.py writes it), so Python and C++ share one list.
#include "formats.h"

#if (defined(__x86_64__) || defined(__i386__)) && !defined(DOVETAIL_NO_X86)
#define DOVETAIL_X86 1  // the x86/ kernels are built; DOVETAIL_NO_X86 builds the portable path alone
#else
#define DOVETAIL_X86 0
#endif

namespace dovetail {

// Kernel paths, in the order of preference (0 asks for the best this CPU runs).
enum Isa { ISA_AUTO = 0, ISA_SCALAR = 1, ISA_AVX2 = 2, ISA_AVX512 = 3 };

#define DOVETAIL_COUNT(B, G, MODE) +1
constexpr int N_FORMATS = 0 DOVETAIL_FORMATS(DOVETAIL_COUNT);
#undef DOVETAIL_COUNT

// The format's column, or -1.
inline int format_index(int bits, int gs, int mode) {
  int i = 0;
#define DOVETAIL_MATCH(B, G, MODE) \
  if (bits == B && gs == G && mode == MODE) return i; \
  ++i;
  DOVETAIL_FORMATS(DOVETAIL_MATCH)
#undef DOVETAIL_MATCH
  return -1;
}

// Software prefetch distance along a tile's weight stream (set_prefetch_bytes changes it for
// benchmarks): 2 KB ahead measured best for 1 and 4 rows (0, 1, 2, 4 KB tried). Past a tile's end
// it touches the next tile, which the same thread reads next; past the tensor's end a prefetch
// cannot fault.
extern int64_t PREFETCH_BYTES;

struct Packed {
  const uint8_t* q;
  const float* D;
  const float* Dm;
  const int8_t* sc;
  const int8_t* mn;
  int64_t N, K, T, U, nsb, ngroups, qbytes;
  int bits, gs, sb, mode, format;
  float z;
  int32_t zi;  // z as an integer (every symmetric format's zero point is one)
};

// The factors of unit u of tile t, for the 16 rows. Symmetric formats (w = S * (q - z)): the
// block's float scale D and, for K-formats, the integer sub-scale sc of each group, applied to
// the exact integer sum; asymmetric formats: w = S * q + M per group (h = 0 .. 32/gs - 1).
struct UnitFactors {
  float D[16];
  int32_t sc[2][16];
  float S[2][16], M[2][16];
};

inline void unit_factors(const Packed& w, int64_t t, int64_t u, UnitFactors& f) {
  const int halves = 32 / w.gs;
  const int64_t s = u * 32 / w.sb;  // a unit lies in one super-block
  const float* D = w.D + (t * w.nsb + s) * 16;
  for (int o = 0; o < 16; ++o) f.D[o] = D[o];
  for (int h = 0; h < halves; ++h) {
    const int64_t g = u * halves + h;
    for (int o = 0; o < 16; ++o) {
      const int32_t sc = w.sc ? (int32_t)w.sc[(t * w.ngroups + g) * 16 + o] : 1;
      f.sc[h][o] = sc;
      if (w.mode == ASYM_K) {
        f.S[h][o] = D[o] * (float)sc;
        f.M[h][o] = -(w.Dm[(t * w.nsb + s) * 16 + o] * (float)w.mn[(t * w.ngroups + g) * 16 + o]);
      } else if (w.mode == ASYM_BLOCK) {
        f.S[h][o] = D[o];
        f.M[h][o] = w.Dm[(t * w.nsb + s) * 16 + o];
      } else {  // the dequantized weight of a symmetric format (what dequantize_rows returns)
        f.S[h][o] = w.sc ? D[o] * (float)sc : D[o];
        f.M[h][o] = -w.z * f.S[h][o];
      }
    }
  }
}

// The 512 values of one unit, chunk-major (byte c * 64 + row * 4 + j); int8 for 8-bit formats.
inline void unpack_unit(const Packed& w, int64_t t, int64_t u, uint8_t* out) {
  const uint8_t* p = w.q + (t * w.U + u) * w.qbytes;
  if (w.bits == 8) { std::memcpy(out, p, 512); return; }
  for (int v = 0; v < 4; ++v)
    for (int i = 0; i < 64; ++i) {
      out[v * 64 + i] = p[v * 64 + i] & 15;
      out[(v + 4) * 64 + i] = p[v * 64 + i] >> 4;
    }
  for (int pl = 0; pl < w.bits - 4; ++pl)
    for (int c = 0; c < 8; ++c) {
      uint64_t mask;
      std::memcpy(&mask, p + 256 + pl * 64 + c * 8, 8);
      for (int i = 0; i < 64; ++i)
        if ((mask >> i) & 1) out[c * 64 + i] |= (uint8_t)(16 << pl);
    }
}

// ---- the kernel registry -------------------------------------------------------------------------
// One tile of 16 output rows for activation rows [0, M): acc[m * 16 + o] += row m . weight row o.
// The rows come unit-major (pack_rows in matmul.cpp): row m's 32 int8 values of unit u start at
// xq + unit_row(M, u, m) * 32 and its 4 block floats at xs + unit_row(M, u, m) * 4, so one unit of
// every row is one contiguous run and a kernel addresses its rows by constant offsets.
inline int64_t unit_row(int64_t M, int64_t u, int64_t m) { return u * M + m; }
using TileFn = void (*)(const Packed&, int64_t t, const int8_t* xq, const float* xs, int64_t M, float* acc);
// Blocks [b, e) of 32 activations -> int8 values q8 and per block (dx, dx*sum, sum(first 16),
// sum(last 16)); the half sums are integers held exactly in float32.
using QuantizeFn = void (*)(const float* x, int8_t* q8, float* s, int64_t b, int64_t e);
// One attention item (attention.h): KV head g, query rows [i0, i1), the group's heads [h0, h1).
#define DOVETAIL_ATTEND_ARGS                                                                               \
  int64_t g, int64_t i0, int64_t i1, int64_t h0, int64_t h1, const float *pq, const float *pk, const float *pv, \
      int64_t k_stride, int64_t v_stride, const uint8_t *vis, float *po, int64_t H, int64_t Hkv, int64_t Lq,   \
      int64_t Lk, int64_t d, float scale, std::vector<float>&score, std::vector<int64_t>&count
using AttendFn = void (*)(DOVETAIL_ATTEND_ARGS);
// The roof probe: `iters` rounds of SPIN_CHAINS independent int8 multiply-add instructions.
using SpinFn = int32_t (*)(int64_t iters);
constexpr int SPIN_CHAINS = 16;
// Sampling (sampling.cpp): the indices i, ascending, with lo <= p[i] < hi written to `at`, stopping
// once more than `limit` are found (`at` holds limit + 16: a block's finds are written whole);
// returns how many were written. A row's few candidates are found without testing every token.
using FindFn = int64_t (*)(const float* p, int64_t V, float lo, float hi, int32_t* at, int64_t limit);

// Every kernel of one path. A path's kernels give the same bits as every other path's.
struct KernelSet {
  int isa;
  const char* name;
  const TileFn* tiles;  // [N_FORMATS], by format_index
  QuantizeFn quantize;
  AttendFn attend;
  SpinFn spin;           // null where the path has no int8 instruction to probe
  int64_t spin_macs;     // int8 multiply-adds of one spin instruction
  FindFn find_range;
};

int best_isa();                          // the best path this CPU runs (detected once)
const KernelSet& kernel_set(int64_t isa);  // 0: the best; raises if this CPU cannot run `isa`

}  // namespace dovetail
