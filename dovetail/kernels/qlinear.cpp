// Quantized linear kernels for small blocks of rows (the verification lever on quantized weights).
//
// Every GGUF block format the engine runs is repacked (dovetail/kernels/packing.py) into one
// layout, so one kernel serves them all:
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
// it is verified alone, in a tree or in a batch, and the scalar, AVX2 and AVX-512 paths agree
// exactly (tile_scalar is the reference each vector path follows lane by lane).
// The weight unit is unpacked once and applied to every row of the block: the cost of a block of
// rows grows far slower than the number of rows, which is what speculative verification needs.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <chrono>
#include <cstring>
#include <vector>

namespace {

enum Mode { SYM_BLOCK = 0, SYM_K = 1, ASYM_K = 2, ASYM_BLOCK = 3 };

// Software prefetch distance along a tile's weight stream: with the hardware prefetcher alone a
// 1-row forward streamed ~16 GB/s of a ~20 GB/s roof on the development machine; 2 KB ahead
// measured best for 1 and 4 rows (0, 1, 2, 4 KB tried). Past a tile's end it touches the next
// tile, which the same thread reads next; past the tensor's end a prefetch cannot fault.
int64_t PREFETCH_BYTES = 2048;

struct Packed {
  const uint8_t* q;
  const float* D;
  const float* Dm;
  const int8_t* sc;
  const int8_t* mn;
  int64_t N, K, T, U, nsb, ngroups, qbytes;
  int bits, gs, sb, mode;
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

// ---- one tile, rows [0, M): portable scalar path ---------------------------------------------
// The arithmetic every path follows, lane by lane: per row and unit, isum_h = sum(q * xq) over
// group h (exact int32). Symmetric: total = sum_h sc_h * (isum_h - z * sum_h(xq)) in int32, then
// acc = fma(float(total), D * dx, acc). Asymmetric: acc = fma(float(isum_h), S_h * dx, acc), then
// acc = fma(M_h, dx * sum_h(xq), acc) per group.
void tile_scalar(const Packed& w, int64_t t, const int8_t* xq, const float* xs, int64_t M, float* acc) {
  alignas(64) uint8_t vals[512];
  UnitFactors uf;
  const int halves = 32 / w.gs, chunks = w.gs / 4;
  const bool sym = w.mode == SYM_BLOCK || w.mode == SYM_K;
  for (int64_t u = 0; u < w.U; ++u) {
    unpack_unit(w, t, u, vals);
    unit_factors(w, t, u, uf);
    for (int64_t m = 0; m < M; ++m) {
      const int8_t* x = xq + m * w.K + u * 32;
      const float* s = xs + (m * w.U + u) * 4;
      for (int o = 0; o < 16; ++o) {
        float f = acc[m * 16 + o];
        int32_t total = 0;
        for (int h = 0; h < halves; ++h) {
          int32_t isum = 0;
          for (int c = h * chunks; c < (h + 1) * chunks; ++c)
            for (int j = 0; j < 4; ++j) {
              const int32_t q = w.bits == 8 ? (int32_t)(int8_t)vals[c * 64 + o * 4 + j] : (int32_t)vals[c * 64 + o * 4 + j];
              isum += q * (int32_t)x[c * 4 + j];
            }
          if (sym) {
            const int32_t xsum = halves == 1 ? (int32_t)s[2] + (int32_t)s[3] : (int32_t)s[2 + h];
            total += uf.sc[h][o] * (isum - w.zi * xsum);
          } else {
            f = std::fma((float)isum, uf.S[h][o] * s[0], f);
            f = std::fma(uf.M[h][o], halves == 1 ? s[1] : s[0] * s[2 + h], f);
          }
        }
        if (sym) f = std::fma((float)total, uf.D[o] * s[0], f);
        acc[m * 16 + o] = f;
      }
    }
  }
}

// unit_factors on 256-bit halves: lanes k = 0, 1 hold rows 8k .. 8k+7 of the tile.
template <int MODE, int HALVES>
struct Unit256 {
  __m256 D[2];
  __m256i sc[HALVES][2];
  __m256 S[HALVES][2], M[HALVES][2];
};

template <int MODE, int HALVES>
__attribute__((target("avx2,fma")))
inline void unit_factors_256(const Packed& w, int64_t t, int64_t u, Unit256<MODE, HALVES>& uf) {
  const int64_t s = u * 32 / w.sb;
  for (int k = 0; k < 2; ++k) {
    const __m256 D = _mm256_loadu_ps(w.D + (t * w.nsb + s) * 16 + k * 8);
    uf.D[k] = D;
    for (int h = 0; h < HALVES; ++h) {
      const int64_t g = u * HALVES + h;
      if (MODE == SYM_K || MODE == ASYM_K) {
        const __m256i sc = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(w.sc + (t * w.ngroups + g) * 16 + k * 8)));
        if (MODE == SYM_K) uf.sc[h][k] = sc;
        else uf.S[h][k] = _mm256_mul_ps(D, _mm256_cvtepi32_ps(sc));
      }
      if (MODE == ASYM_K) {
        const __m256 mn = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
            _mm_loadl_epi64((const __m128i*)(w.mn + (t * w.ngroups + g) * 16 + k * 8))));
        uf.M[h][k] = _mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(_mm256_loadu_ps(w.Dm + (t * w.nsb + s) * 16 + k * 8), mn));
      } else if (MODE == ASYM_BLOCK) {
        uf.S[h][k] = D;
        uf.M[h][k] = _mm256_loadu_ps(w.Dm + (t * w.nsb + s) * 16 + k * 8);
      }
    }
  }
}

// ---- AVX2 + FMA: each 64-byte chunk is two 256-bit halves (rows 0-7, rows 8-15) ---------------
template <int BITS, int GS, int MODE>
__attribute__((target("avx2,fma")))
void tile_avx2(const Packed& w, int64_t t, const int8_t* xq, const float* xs, int64_t M, float* acc) {
  __m256i wv[8][2], wabs[8][2];
  const __m256i low4 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
  const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                          2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i bitsel = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
  constexpr int HALVES = 32 / GS, CHUNKS = GS / 4;
  constexpr bool SYM = MODE == SYM_BLOCK || MODE == SYM_K;
  Unit256<MODE, HALVES> uf;
  for (int64_t u = 0; u < w.U; ++u) {
    const uint8_t* p = w.q + (t * w.U + u) * w.qbytes;
    for (int64_t b = 0; b < w.qbytes; b += 64) _mm_prefetch((const char*)(p + PREFETCH_BYTES + b), _MM_HINT_T0);
    if (BITS == 8) {
      for (int c = 0; c < 8; ++c)
        for (int k = 0; k < 2; ++k) {
          wv[c][k] = _mm256_loadu_si256((const __m256i*)(p + c * 64 + k * 32));
          wabs[c][k] = _mm256_abs_epi8(wv[c][k]);
        }
    } else {
      for (int v = 0; v < 4; ++v)
        for (int k = 0; k < 2; ++k) {
          const __m256i raw = _mm256_loadu_si256((const __m256i*)(p + v * 64 + k * 32));
          wv[v][k] = _mm256_and_si256(raw, low4);
          wv[v + 4][k] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
        }
      for (int pl = 0; pl < BITS - 4; ++pl) {
        const __m256i add = _mm256_set1_epi8((char)(16 << pl));
        for (int c = 0; c < 8; ++c)
          for (int k = 0; k < 2; ++k) {
            uint32_t bits32;
            std::memcpy(&bits32, p + 256 + pl * 64 + c * 8 + k * 4, 4);
            __m256i m = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits32), spread);
            m = _mm256_cmpeq_epi8(_mm256_and_si256(m, bitsel), bitsel);
            wv[c][k] = _mm256_or_si256(wv[c][k], _mm256_and_si256(m, add));
          }
      }
    }
    unit_factors_256<MODE, HALVES>(w, t, u, uf);
    for (int64_t m = 0; m < M; ++m) {
      const int8_t* x = xq + m * w.K + u * 32;
      const float* s = xs + (m * w.U + u) * 4;
      const __m256 dx = _mm256_set1_ps(s[0]);
      __m256i total[2];
      for (int h = 0; h < HALVES; ++h) {
        const int32_t xsum = HALVES == 1 ? (int32_t)s[2] + (int32_t)s[3] : (int32_t)s[2 + h];
        const __m256 sx = _mm256_set1_ps(HALVES == 1 ? s[1] : s[0] * s[2 + h]);
        for (int k = 0; k < 2; ++k) {
          // A chunk's maddubs pair sums are at most 2 x 127 x (largest weight), so PER16 chunks
          // add up exactly in int16 (< 32768) before one widening madd: 8 for 4-bit weights, 4 for
          // 5-bit, 2 for 6-bit, 1 for 8-bit. Integer sums: exact in any grouping.
          constexpr int PER16 = 32767 / (2 * 127 * (BITS == 8 ? 128 : (1 << BITS) - 1));
          __m256i isum = _mm256_setzero_si256(), s16 = _mm256_setzero_si256();
          for (int c = h * CHUNKS; c < (h + 1) * CHUNKS; ++c) {
            int32_t x4;
            std::memcpy(&x4, x + c * 4, 4);
            const __m256i xb = _mm256_set1_epi32(x4);
            s16 = _mm256_add_epi16(s16, BITS == 8 ? _mm256_maddubs_epi16(wabs[c][k], _mm256_sign_epi8(xb, wv[c][k]))
                                                  : _mm256_maddubs_epi16(wv[c][k], xb));
            if ((c - h * CHUNKS) % PER16 == PER16 - 1 || c == (h + 1) * CHUNKS - 1) {
              isum = _mm256_add_epi32(isum, _mm256_madd_epi16(s16, ones));
              s16 = _mm256_setzero_si256();
            }
          }
          if (SYM) {
            isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(w.zi * xsum));
            if (MODE == SYM_K) isum = _mm256_mullo_epi32(isum, uf.sc[h][k]);
            total[k] = h == 0 ? isum : _mm256_add_epi32(total[k], isum);
          } else {
            float* a = acc + m * 16 + k * 8;
            __m256 f = _mm256_loadu_ps(a);
            f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(uf.S[h][k], dx), f);
            f = _mm256_fmadd_ps(uf.M[h][k], sx, f);
            _mm256_storeu_ps(a, f);
          }
        }
      }
      if (SYM)
        for (int k = 0; k < 2; ++k) {
          float* a = acc + m * 16 + k * 8;
          _mm256_storeu_ps(a, _mm256_fmadd_ps(_mm256_cvtepi32_ps(total[k]), _mm256_mul_ps(uf.D[k], dx), _mm256_loadu_ps(a)));
        }
    }
  }
}

// ---- AVX-512 VNNI: one dpbusd per chunk and row ------------------------------------------------
// The per-unit weight factors the rows share: for the symmetric formats (w = S * (q - z)) the
// offset is folded into the integer sum and a K-format's integer sub-scales multiply it in int32,
// so each row pays one float multiply-add per unit; the asymmetric formats keep S and M per group.
template <int MODE, int HALVES>
struct Unit512 {
  __m512 D;               // symmetric: the block's (or super-block's) float scale
  __m512i sc[HALVES];     // SYM_K: the groups' integer sub-scales
  __m512 S[HALVES], M[HALVES];  // asymmetric: w = S * q + M per group
};

// R rows of one unit. Every loop is unrolled (the pragmas) so partial sums stay in registers: left
// to itself GCC kept the group loop of 16-input formats rolled and spilled them to the stack, which
// made Q6_K about half as fast per multiply-add as Q4_K.
template <int BITS, int GS, int MODE, int R>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
inline void rows_avx512(const Packed& w, int64_t u, const int8_t* xq, const float* xs, int64_t m0, float* acc,
                        const __m512i* wv, const __mmask64* neg, const Unit512<MODE, 32 / GS>& uf) {
  constexpr int HALVES = 32 / GS, CHUNKS = GS / 4;
  constexpr bool SYM = MODE == SYM_BLOCK || MODE == SYM_K;
  const __m512i zero = _mm512_setzero_si512();
  __m512 f[R];
  __m512i total[R];
  #pragma GCC unroll 16
  for (int r = 0; r < R; ++r) f[r] = _mm512_loadu_ps(acc + (m0 + r) * 16);
  // P independent dpbusd chains per row (chunks round-robin), summed at the end: the integer sum
  // is exact in any order, and enough chains in flight hide the instruction's latency.
  constexpr int WANT = R >= 8 ? 1 : R >= 2 ? 2 : 4, P = WANT < CHUNKS ? WANT : CHUNKS;
  #pragma GCC unroll 16
  for (int h = 0; h < HALVES; ++h) {
    __m512i part[R][P];
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
      #pragma GCC unroll 16
      for (int j = 0; j < P; ++j) part[r][j] = zero;
    #pragma GCC unroll 16
    for (int c = h * CHUNKS; c < (h + 1) * CHUNKS; ++c)
      #pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        int32_t x4;
        std::memcpy(&x4, xq + (m0 + r) * w.K + u * 32 + c * 4, 4);
        __m512i xb = _mm512_set1_epi32(x4);
        if (BITS == 8) xb = _mm512_mask_sub_epi8(xb, neg[c], zero, xb);  // sign(x, w): |w| is unsigned
        part[r][c % P] = _mm512_dpbusd_epi32(part[r][c % P], wv[c], xb);
      }
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      __m512i isum = part[r][0];
      #pragma GCC unroll 16
      for (int j = 1; j < P; ++j) isum = _mm512_add_epi32(isum, part[r][j]);
      const float* s = xs + ((m0 + r) * w.U + u) * 4;
      if (SYM) {
        const int32_t xsum = HALVES == 1 ? (int32_t)s[2] + (int32_t)s[3] : (int32_t)s[2 + h];
        isum = _mm512_sub_epi32(isum, _mm512_set1_epi32(w.zi * xsum));
        if (MODE == SYM_K) isum = _mm512_mullo_epi32(isum, uf.sc[h]);
        total[r] = h == 0 ? isum : _mm512_add_epi32(total[r], isum);
      } else {
        f[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(uf.S[h], _mm512_set1_ps(s[0])), f[r]);
        f[r] = _mm512_fmadd_ps(uf.M[h], _mm512_set1_ps(HALVES == 1 ? s[1] : s[0] * s[2 + h]), f[r]);
      }
    }
  }
  if (SYM)
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const float* s = xs + ((m0 + r) * w.U + u) * 4;
      f[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total[r]), _mm512_mul_ps(uf.D, _mm512_set1_ps(s[0])), f[r]);
    }
  #pragma GCC unroll 16
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(acc + (m0 + r) * 16, f[r]);
}

template <int MODE, int HALVES>
__attribute__((target("avx512f,avx512bw,avx512vl")))
inline void unit_factors_512(const Packed& w, int64_t t, int64_t u, Unit512<MODE, HALVES>& uf) {
  const int64_t s = u * 32 / w.sb;  // a unit lies in one super-block
  const __m512 D = _mm512_loadu_ps(w.D + (t * w.nsb + s) * 16);
  uf.D = D;
  for (int h = 0; h < HALVES; ++h) {
    const int64_t g = u * HALVES + h;
    const __m512i sc = MODE == SYM_K || MODE == ASYM_K
                           ? _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w.sc + (t * w.ngroups + g) * 16)))
                           : _mm512_setzero_si512();
    if (MODE == SYM_K) uf.sc[h] = sc;
    if (MODE == ASYM_K) {
      uf.S[h] = _mm512_mul_ps(D, _mm512_cvtepi32_ps(sc));
      const __m512 mn = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w.mn + (t * w.ngroups + g) * 16))));
      uf.M[h] = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(_mm512_loadu_ps(w.Dm + (t * w.nsb + s) * 16), mn));
    } else if (MODE == ASYM_BLOCK) {
      uf.S[h] = D;
      uf.M[h] = _mm512_loadu_ps(w.Dm + (t * w.nsb + s) * 16);
    }
  }
}

// (tile loop) ------------------------------------------------
template <int BITS, int GS, int MODE>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
void tile_avx512(const Packed& w, int64_t t, const int8_t* xq, const float* xs, int64_t M, float* acc) {
  __m512i wv[8];
  __mmask64 neg[8];
  const __m512i low4 = _mm512_set1_epi8(15), zero = _mm512_setzero_si512();
  constexpr int HALVES = 32 / GS;
  Unit512<MODE, HALVES> uf;
  for (int64_t u = 0; u < w.U; ++u) {
    const uint8_t* p = w.q + (t * w.U + u) * w.qbytes;
    for (int64_t b = 0; b < w.qbytes; b += 64) _mm_prefetch((const char*)(p + PREFETCH_BYTES + b), _MM_HINT_T0);
    if (BITS == 8) {
      for (int c = 0; c < 8; ++c) {
        const __m512i raw = _mm512_loadu_si512((const void*)(p + c * 64));
        neg[c] = _mm512_movepi8_mask(raw);
        wv[c] = _mm512_abs_epi8(raw);
      }
    } else {
      for (int v = 0; v < 4; ++v) {
        const __m512i raw = _mm512_loadu_si512((const void*)(p + v * 64));
        wv[v] = _mm512_and_si512(raw, low4);
        wv[v + 4] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
      }
      for (int pl = 0; pl < BITS - 4; ++pl) {
        const __m512i add = _mm512_set1_epi8((char)(16 << pl));
        for (int c = 0; c < 8; ++c) {
          uint64_t bits64;
          std::memcpy(&bits64, p + 256 + pl * 64 + c * 8, 8);
          wv[c] = _mm512_or_si512(wv[c], _mm512_maskz_mov_epi8((__mmask64)bits64, add));
        }
      }
    }
    unit_factors_512<MODE, HALVES>(w, t, u, uf);
    // Eight, four, two rows at a time: independent dpbusd chains hide the instruction's latency.
    int64_t m = 0;
    for (; m + 8 <= M; m += 8) rows_avx512<BITS, GS, MODE, 8>(w, u, xq, xs, m, acc, wv, neg, uf);
    for (; m + 4 <= M; m += 4) rows_avx512<BITS, GS, MODE, 4>(w, u, xq, xs, m, acc, wv, neg, uf);
    for (; m + 2 <= M; m += 2) rows_avx512<BITS, GS, MODE, 2>(w, u, xq, xs, m, acc, wv, neg, uf);
    for (; m < M; ++m) rows_avx512<BITS, GS, MODE, 1>(w, u, xq, xs, m, acc, wv, neg, uf);
  }
}

using TileFn = void (*)(const Packed&, int64_t, const int8_t*, const float*, int64_t, float*);

#define DOVETAIL_FORMATS(X)            \
  X(4, 32, SYM_BLOCK)  /* Q4_0 */      \
  X(4, 32, ASYM_BLOCK) /* Q4_1 */      \
  X(5, 32, SYM_BLOCK)  /* Q5_0 */      \
  X(5, 32, ASYM_BLOCK) /* Q5_1 */      \
  X(8, 32, SYM_BLOCK)  /* Q8_0 */      \
  X(4, 32, ASYM_K)     /* Q4_K */      \
  X(6, 16, SYM_K)      /* Q6_K */

TileFn pick_tile(const Packed& w, int isa);

enum Isa { ISA_AUTO = 0, ISA_SCALAR = 1, ISA_AVX2 = 2, ISA_AVX512 = 3 };

int best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
    return ISA_AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return ISA_AVX2;
  return ISA_SCALAR;
}

int resolve_isa(int64_t isa) {
  const int best = best_isa();
  if (isa == ISA_AUTO) return best;
  TORCH_CHECK(isa >= ISA_SCALAR && isa <= best, "kernel path ", isa, " is not supported by this CPU (best: ", best, ")");
  return (int)isa;
}

TileFn pick_tile(const Packed& w, int isa) {
#define DOVETAIL_CASE(B, G, MODE) \
  if (w.bits == B && w.gs == G && w.mode == MODE) return isa == ISA_AVX512 ? &tile_avx512<B, G, MODE> : &tile_avx2<B, G, MODE>;
  DOVETAIL_FORMATS(DOVETAIL_CASE)
#undef DOVETAIL_CASE
  TORCH_CHECK(false, "no kernel for bits=", w.bits, " group=", w.gs, " mode=", w.mode);
}

// OpenMP's team size is a per-thread setting, and a new thread starts from OMP_NUM_THREADS (Ray
// sets 1 for its workers, whose message loops run in their own threads). torch's own operators
// re-apply torch.set_num_threads in each new thread; these kernels must do the same.
void sync_thread_count() {
  thread_local bool done = false;
  if (!done) {
    at::init_num_threads();
    done = true;
  }
}

const float* opt_f(const torch::Tensor& t) { return t.numel() ? t.data_ptr<float>() : nullptr; }
const int8_t* opt_i8(const torch::Tensor& t) { return t.numel() ? t.data_ptr<int8_t>() : nullptr; }

Packed make_packed(const torch::Tensor& q, const torch::Tensor& D, const torch::Tensor& Dm, const torch::Tensor& sc,
                   const torch::Tensor& mn, int64_t N, int64_t K, int64_t bits, int64_t gs, int64_t sb, int64_t mode,
                   double z) {
  TORCH_CHECK(K % 32 == 0 && sb % 32 == 0 && (gs == 16 || gs == 32), "bad packed shape");
  TORCH_CHECK(q.is_contiguous() && D.is_contiguous() && Dm.is_contiguous() && sc.is_contiguous() && mn.is_contiguous(),
              "packed tensors must be contiguous");
  Packed w;
  w.N = N; w.K = K; w.T = (N + 15) / 16; w.U = K / 32; w.nsb = K / sb; w.ngroups = K / gs;
  w.bits = (int)bits; w.gs = (int)gs; w.sb = (int)sb; w.mode = (int)mode; w.z = (float)z; w.zi = (int32_t)z;
  w.qbytes = bits == 8 ? 512 : 256 + (bits - 4) * 64;
  TORCH_CHECK(q.numel() == w.T * w.U * w.qbytes, "packed values have the wrong size");
  TORCH_CHECK(D.numel() == w.T * w.nsb * 16, "packed scales have the wrong size");
  w.q = q.data_ptr<uint8_t>(); w.D = D.data_ptr<float>(); w.Dm = opt_f(Dm); w.sc = opt_i8(sc); w.mn = opt_i8(mn);
  return w;
}

}  // namespace

// One block of 32 activations -> int8 values and (dx, dx*sum, sum(first 16), sum(last 16)); the two
// half sums are integers (held exactly in float32), which the symmetric formats use in int32.
// q = round-to-nearest-even(v / dx): the AVX2 clone's cvtps rounds the same way as nearbyint, and
// max and integer sums do not depend on order, so both clones give the same bits.
inline void quantize_block_scalar(const float* v, int8_t* q8, float* s) {
  float amax = 0.f;
  for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(v[j]));
  const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
  int32_t lo = 0, hi = 0;
  for (int j = 0; j < 32; ++j) {
    const int32_t q = std::max(-127, std::min(127, (int32_t)std::nearbyint(v[j] * id)));
    q8[j] = (int8_t)q;
    (j < 16 ? lo : hi) += q;
  }
  s[0] = d;
  s[1] = d * (float)(lo + hi);
  s[2] = (float)lo;
  s[3] = (float)hi;
}

__attribute__((target("avx2,fma")))
void quantize_blocks_avx2(const float* x, int8_t* q8, float* s, int64_t b, int64_t e) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256i lim = _mm256_set1_epi32(127), nlim = _mm256_set1_epi32(-127);
  for (int64_t i = b; i < e; ++i) {
    const float* v = x + i * 32;
    __m256 r[4], m = _mm256_setzero_ps();
    for (int k = 0; k < 4; ++k) {
      r[k] = _mm256_loadu_ps(v + 8 * k);
      m = _mm256_max_ps(m, _mm256_andnot_ps(sign, r[k]));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
    const float amax = _mm_cvtss_f32(m4);
    const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
    const __m256 vid = _mm256_set1_ps(id);
    __m256i qi[4];
    for (int k = 0; k < 4; ++k)
      qi[k] = _mm256_max_epi32(nlim, _mm256_min_epi32(lim, _mm256_cvtps_epi32(_mm256_mul_ps(r[k], vid))));
    int32_t lanes[32];
    for (int k = 0; k < 4; ++k) _mm256_storeu_si256((__m256i*)(lanes + 8 * k), qi[k]);
    int32_t lo = 0, hi = 0;
    for (int j = 0; j < 32; ++j) {
      q8[i * 32 + j] = (int8_t)lanes[j];
      (j < 16 ? lo : hi) += lanes[j];
    }
    float* si = s + i * 4;
    si[0] = d;
    si[1] = d * (float)(lo + hi);
    si[2] = (float)lo;
    si[3] = (float)hi;
  }
}

// x: [M, K] float32 -> (xq int8 [M, K], xs float32 [M, K/32, 4] = dx, dx*sum, sum(first 16), sum(last 16))
std::vector<torch::Tensor> quantize_rows(const torch::Tensor& x_in, int64_t isa) {
  sync_thread_count();
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) % 32 == 0, "activations must be [M, K] with K a multiple of 32");
  const torch::Tensor x = x_in.to(torch::kFloat32).contiguous();
  const int64_t M = x.size(0), K = x.size(1), U = K / 32;
  auto xq = torch::empty({M, K}, torch::kInt8);
  auto xs = torch::empty({M, U, 4}, torch::kFloat32);
  const float* px = x.data_ptr<float>();
  int8_t* pq = xq.data_ptr<int8_t>();
  float* ps = xs.data_ptr<float>();
  const bool avx2 = resolve_isa(isa) >= ISA_AVX2;
  const auto run = [&](int64_t b, int64_t e) {
    if (avx2) quantize_blocks_avx2(px, pq, ps, b, e);
    else for (int64_t i = b; i < e; ++i) quantize_block_scalar(px + i * 32, pq + i * 32, ps + i * 4);
  };
  if (M * U <= 512) run(0, M * U);  // a few blocks: a parallel region costs more than it saves
  else at::parallel_for(0, M * U, 256, run);
  return {xq, xs};
}

// y = x @ W.T (+ bias) from activations already quantised by quantize_rows: several weights that
// read the same input (q/k/v, gate/up) share one quantisation.
torch::Tensor qmatmul_quantized(const torch::Tensor& xq_in, const torch::Tensor& xs_in, const torch::Tensor& q,
                                const torch::Tensor& D, const torch::Tensor& Dm, const torch::Tensor& sc,
                                const torch::Tensor& mn, int64_t N, int64_t bits, int64_t gs, int64_t sb, int64_t mode,
                                double z, int64_t isa, const c10::optional<torch::Tensor>& bias_in) {
  sync_thread_count();
  TORCH_CHECK(xq_in.dim() == 2 && xq_in.scalar_type() == torch::kInt8, "xq must be int8 [M, K]");
  const torch::Tensor xq_t = xq_in.contiguous(), xs_t = xs_in.contiguous();
  const int64_t M = xq_t.size(0), K = xq_t.size(1);
  TORCH_CHECK(xs_t.numel() == M * (K / 32) * 4, "xs does not match xq");
  const Packed w = make_packed(q, D, Dm, sc, mn, N, K, bits, gs, sb, mode, z);
  const int path = resolve_isa(isa);
  const TileFn tile = path == ISA_SCALAR ? nullptr : pick_tile(w, path);
  torch::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    bias = bias_in->to(torch::kFloat32).contiguous();
    TORCH_CHECK(bias.numel() == N, "bias has the wrong size");
  }
  const float* pb = bias.defined() ? bias.data_ptr<float>() : nullptr;
  const int8_t* xq = xq_t.data_ptr<int8_t>();
  const float* xs = xs_t.data_ptr<float>();
  auto y = torch::empty({M, N}, torch::kFloat32);
  float* py = y.data_ptr<float>();
  constexpr int64_t ROWS = 64;  // rows per pass: their accumulators stay in L1
  at::parallel_for(0, w.T, 1, [&](int64_t b, int64_t e) {
    alignas(64) float acc[ROWS * 16];
    for (int64_t t = b; t < e; ++t)
      for (int64_t m0 = 0; m0 < M; m0 += ROWS) {
        const int64_t rows = std::min(ROWS, M - m0);
        std::memset(acc, 0, sizeof(float) * rows * 16);
        const int8_t* xr = xq + m0 * K;
        const float* sr = xs + m0 * w.U * 4;
        if (tile) tile(w, t, xr, sr, rows, acc);
        else tile_scalar(w, t, xr, sr, rows, acc);
        const int64_t n0 = t * 16, width = std::min<int64_t>(16, N - n0);
        for (int64_t m = 0; m < rows; ++m) {
          float* out = py + (m0 + m) * N + n0;
          if (pb) for (int64_t o = 0; o < width; ++o) out[o] = acc[m * 16 + o] + pb[n0 + o];
          else std::memcpy(out, acc + m * 16, sizeof(float) * width);
        }
      }
  });
  return y;
}

torch::Tensor qmatmul(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& D, const torch::Tensor& Dm,
                      const torch::Tensor& sc, const torch::Tensor& mn, int64_t N, int64_t bits, int64_t gs, int64_t sb,
                      int64_t mode, double z, int64_t isa) {
  TORCH_CHECK(x.dim() == 2, "x must be [M, K]");
  auto quantized = quantize_rows(x, isa);
  return qmatmul_quantized(quantized[0], quantized[1], q, D, Dm, sc, mn, N, bits, gs, sb, mode, z, isa, c10::nullopt);
}

// ---- the small per-row operators of a decoder layer ------------------------------------------
// Each is a loop per row in a fixed order (row-independent, like everything above), and one
// call instead of the handful of tensor operators a module would run: in a 1-token forward of a
// small model those calls, not the arithmetic, are what costs.
namespace {

// sum of squares of one row, in 8 interleaved lanes (vectorisable without reordering)
inline float sum_squares(const float* a, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int t = 0; t < 8; ++t) acc[t] = acc[t] + a[j + t] * a[j + t];
  for (; j < n; ++j) acc[j % 8] = acc[j % 8] + a[j] * a[j];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

void rms_norm_rows(const float* x, const float* w, float* out, int64_t M, int64_t H, float eps) {
  for (int64_t m = 0; m < M; ++m) {
    const float* r = x + m * H;
    const float inv = 1.f / std::sqrt(sum_squares(r, H) / (float)H + eps);
    for (int64_t j = 0; j < H; ++j) out[m * H + j] = w[j] * (r[j] * inv);
  }
}

}  // namespace

// RMSNorm: w * x / sqrt(mean(x^2) + eps), rows of x [M, H].
torch::Tensor rms_norm(const torch::Tensor& x_in, const torch::Tensor& w_in, double eps) {
  const torch::Tensor x = x_in.to(torch::kFloat32).contiguous(), w = w_in.to(torch::kFloat32).contiguous();
  const int64_t H = x.size(-1), M = x.numel() / H;
  TORCH_CHECK(w.numel() == H, "norm weight has the wrong size");
  auto out = torch::empty_like(x);
  rms_norm_rows(x.data_ptr<float>(), w.data_ptr<float>(), out.data_ptr<float>(), M, H, (float)eps);
  return out;
}

// The residual step of a decoder layer: h += delta (in place), then RMSNorm(h).
torch::Tensor add_rms_norm_(torch::Tensor& h, const torch::Tensor& delta_in, const torch::Tensor& w_in, double eps) {
  TORCH_CHECK(h.is_contiguous() && h.scalar_type() == torch::kFloat32, "h must be contiguous float32");
  const torch::Tensor delta = delta_in.to(torch::kFloat32).contiguous(), w = w_in.to(torch::kFloat32).contiguous();
  TORCH_CHECK(delta.numel() == h.numel(), "residual shapes differ");
  const int64_t H = h.size(-1), M = h.numel() / H;
  float* ph = h.data_ptr<float>();
  const float* pd = delta.data_ptr<float>();
  for (int64_t i = 0; i < M * H; ++i) ph[i] = ph[i] + pd[i];
  auto out = torch::empty_like(h);
  rms_norm_rows(ph, w.data_ptr<float>(), out.data_ptr<float>(), M, H, (float)eps);
  return out;
}

// Rotary embedding in place on x [L, heads * d] with cos/sin [L, d] (the HF convention: the two
// halves of each head rotate together): x * cos + rotate_half(x) * sin.
void rope_(torch::Tensor& x, const torch::Tensor& cos_in, const torch::Tensor& sin_in) {
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == torch::kFloat32 && x.dim() == 2, "x must be [L, heads*d] float32");
  const torch::Tensor c = cos_in.to(torch::kFloat32).contiguous(), s = sin_in.to(torch::kFloat32).contiguous();
  const int64_t L = x.size(0), d = c.size(-1), half = d / 2, heads = x.size(1) / d;
  TORCH_CHECK(c.numel() == L * d && s.numel() == L * d && heads * d == x.size(1), "rotary shapes differ");
  float* px = x.data_ptr<float>();
  const float *pc = c.data_ptr<float>(), *ps = s.data_ptr<float>();
  for (int64_t l = 0; l < L; ++l)
    for (int64_t h = 0; h < heads; ++h) {
      float* r = px + (l * heads + h) * d;
      const float *cl = pc + l * d, *sl = ps + l * d;
      for (int64_t j = 0; j < half; ++j) {
        const float a = r[j], b = r[j + half];
        r[j] = a * cl[j] + (-b) * sl[j];
        r[j + half] = b * cl[j + half] + a * sl[j + half];
      }
    }
}

// Rows `rows` of the packed weight as float32 [len(rows), K] (w = S * q + M; exact): embeddings, checks.
torch::Tensor dequantize_rows(const torch::Tensor& q, const torch::Tensor& D, const torch::Tensor& Dm,
                              const torch::Tensor& sc, const torch::Tensor& mn, int64_t N, int64_t K, int64_t bits,
                              int64_t gs, int64_t sb, int64_t mode, double z, const torch::Tensor& rows_in) {
  sync_thread_count();
  const Packed w = make_packed(q, D, Dm, sc, mn, N, K, bits, gs, sb, mode, z);
  const torch::Tensor rows = rows_in.to(torch::kInt64).contiguous();
  const int64_t R = rows.numel();
  const int64_t* pr = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < R; ++i) TORCH_CHECK(pr[i] >= 0 && pr[i] < N, "row ", pr[i], " out of range [0, ", N, ")");
  auto out = torch::empty({R, K}, torch::kFloat32);
  float* po = out.data_ptr<float>();
  at::parallel_for(0, R, 16, [&](int64_t b, int64_t e) {
    alignas(64) uint8_t vals[512];
    UnitFactors uf;
    for (int64_t i = b; i < e; ++i) {
      const int64_t t = pr[i] / 16, o = pr[i] % 16;
      for (int64_t u = 0; u < w.U; ++u) {
        unpack_unit(w, t, u, vals);
        unit_factors(w, t, u, uf);
        for (int c = 0; c < 8; ++c)
          for (int j = 0; j < 4; ++j) {
            const int h = (c * 4) / w.gs;
            const uint8_t raw = vals[c * 64 + o * 4 + j];
            const float qv = w.bits == 8 ? (float)(int8_t)raw : (float)raw;
            const float prod = uf.S[h][o] * qv;  // exact: small integer times a short mantissa
            po[i * K + u * 32 + c * 4 + j] = prod + uf.M[h][o];
          }
      }
    }
  });
  return out;
}

// ---- load-time repacking ------------------------------------------------------------------------
// GGML type ids of the formats whose values decode_values extracts.
enum GgmlType { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q6_K = 14 };

// The integer values of GGUF blocks [N, bytes per row] -> uint8 [N, K] (int8 bits for Q8_0), in
// the order of the weights; the scales are read by packing.py. Mirrors ggml's block layouts.
torch::Tensor decode_values(const torch::Tensor& raw_in, int64_t type, int64_t N, int64_t K) {
  sync_thread_count();
  const torch::Tensor raw = raw_in.contiguous();
  TORCH_CHECK(raw.scalar_type() == torch::kUInt8 && raw.numel() % N == 0, "raw blocks must be uint8 [N, bytes]");
  const int64_t row_bytes = raw.numel() / N;
  int64_t per = 32, size = 0;
  switch (type) {
    case Q4_0: size = 18; break;
    case Q4_1: size = 20; break;
    case Q5_0: size = 22; break;
    case Q5_1: size = 24; break;
    case Q8_0: size = 34; break;
    case Q4_K: per = 256; size = 144; break;
    case Q6_K: per = 256; size = 210; break;
    default: TORCH_CHECK(false, "decode_values: unsupported GGML type ", type);
  }
  TORCH_CHECK(K % per == 0 && row_bytes == K / per * size, "raw blocks do not match the shape");
  auto out = torch::empty({N, K}, torch::kUInt8);
  const uint8_t* src = raw.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  const int64_t blocks = N * (K / per);
  at::parallel_for(0, blocks, 1024, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* x = src + b * size;
      uint8_t* y = dst + b * per;
      switch (type) {
        case Q4_0: case Q4_1: {
          const uint8_t* qs = x + (type == Q4_0 ? 2 : 4);
          for (int j = 0; j < 16; ++j) { y[j] = qs[j] & 15; y[j + 16] = qs[j] >> 4; }
          break;
        }
        case Q5_0: case Q5_1: {
          const uint8_t* h = x + (type == Q5_0 ? 2 : 4);
          uint32_t qh;
          std::memcpy(&qh, h, 4);
          const uint8_t* qs = h + 4;
          for (int j = 0; j < 16; ++j) {
            y[j] = (qs[j] & 15) | (((qh >> j) & 1) << 4);
            y[j + 16] = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
          }
          break;
        }
        case Q8_0: std::memcpy(y, x + 2, 32); break;
        case Q4_K: {
          const uint8_t* qs = x + 16;
          for (int j = 0; j < 4; ++j)
            for (int i = 0; i < 32; ++i) { y[64 * j + i] = qs[32 * j + i] & 15; y[64 * j + 32 + i] = qs[32 * j + i] >> 4; }
          break;
        }
        case Q6_K: {
          const uint8_t* ql = x;
          const uint8_t* qh = x + 128;
          for (int a = 0; a < 2; ++a)  // two halves of 128 weights
            for (int r = 0; r < 128; ++r) {
              const uint8_t lo = (ql[a * 64 + (r % 64)] >> (4 * (r / 64))) & 15;
              const uint8_t hi = (qh[a * 32 + (r % 32)] >> (2 * (r / 32))) & 3;
              y[a * 128 + r] = lo | (hi << 4);
            }
          break;
        }
      }
    }
  });
  return out;
}

// Values uint8 [N, K] -> the tile layout of the header comment: [ceil(N/16), K/32, qbytes].
torch::Tensor pack_values(const torch::Tensor& q_in, int64_t bits) {
  sync_thread_count();
  const torch::Tensor q = q_in.contiguous();
  TORCH_CHECK(q.dim() == 2 && q.size(1) % 32 == 0, "values must be [N, K] with K a multiple of 32");
  const int64_t N = q.size(0), K = q.size(1), T = (N + 15) / 16, U = K / 32;
  const int64_t qbytes = bits == 8 ? 512 : 256 + (bits - 4) * 64;
  auto out = torch::zeros({T, U, qbytes}, torch::kUInt8);
  const uint8_t* src = q.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    alignas(64) uint8_t chunk[512];
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t u = 0; u < U; ++u) {
        for (int c = 0; c < 8; ++c)
          for (int o = 0; o < 16; ++o)
            for (int j = 0; j < 4; ++j) {
              const int64_t n = t * 16 + o;
              chunk[c * 64 + o * 4 + j] = n < N ? src[n * K + u * 32 + c * 4 + j] : 0;
            }
        uint8_t* p = dst + (t * U + u) * qbytes;
        if (bits == 8) { std::memcpy(p, chunk, 512); continue; }
        for (int v = 0; v < 4; ++v)
          for (int i = 0; i < 64; ++i) p[v * 64 + i] = (chunk[v * 64 + i] & 15) | ((chunk[(v + 4) * 64 + i] & 15) << 4);
        for (int pl = 0; pl < bits - 4; ++pl)
          for (int c = 0; c < 8; ++c) {
            uint64_t mask = 0;
            for (int i = 0; i < 64; ++i) mask |= (uint64_t)((chunk[c * 64 + i] >> (4 + pl)) & 1) << i;
            std::memcpy(p + 256 + pl * 64 + c * 8, &mask, 8);
          }
      }
  });
  return out;
}

// ---- attention, row by row ----------------------------------------------------------------------
// Each query row attends to its visible keys in cache order with a fixed order of operations, so
// a token's attention output is bit-identical whether it is decoded alone or verified inside a
// tree or a batch (a library attention kernel picks its blocking by shape, and with quantized
// activations a last-bit difference can flip an int8 rounding). The arithmetic of one (row, head):
//   score_t = dot(q, k_t) * scale, the dot product in 16 lanes reduced in a fixed tree (dots16);
//   p_t     = exp(score_t - max) / sum, the sum in 16 lanes (key t in lane t % 16), reduced in a
//             fixed tree; exp is a fixed polynomial;
//   out     = sum over t of p_t * v_t, each output lane summing the keys in cache order.
// Only vector widths change between the AVX-512 and baseline builds, never the order of
// operations (no -ffast-math, no contraction), so every clone gives the same bits.
//
// The loops are arranged so that the keys and values of a KV head are read once for all the query
// rows and heads that share them (decoding one token, verifying a block, or a block of prompt
// rows): at long context a block's attention costs about what one row's does in memory traffic.
namespace {

typedef float v8f __attribute__((vector_size(32)));   // one ymm or two xmm
typedef float v16f __attribute__((vector_size(64)));  // one zmm, two ymm or four xmm

template <typename V>
__attribute__((always_inline)) inline V loadv(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename V>
__attribute__((always_inline)) inline void storev(float* p, V v) { std::memcpy(p, &v, sizeof(v)); }

__attribute__((always_inline)) inline float tree8(const float* l) { return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7])); }

// q . k_i for 16 keys at once (d a multiple of 16), lane i of the result holding key i: lane l of
// key i's accumulator sums q[c + l] * k_i[c + l] over c = 0, 16, 32, ... in order, then each key's
// 16 lanes are added in a fixed tree, (l, l + 8), then (l, l + 4), (l, l + 2), (l, l + 1), by a
// transposing network that reduces all 16 keys together. A key's score depends on that key alone,
// never on which keys share its group.
__attribute__((always_inline)) inline v16f dots16(const float* q, const float* const* k, int64_t d) {
  v16f acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = v16f{};
  for (int64_t c = 0; c < d; c += 16) {
    const v16f qc = loadv<v16f>(q + c);
    for (int i = 0; i < 16; ++i) acc[i] = acc[i] + qc * loadv<v16f>(k[i] + c);
  }
  v16f b[8], c4[4], e[2];
  for (int m = 0; m < 8; ++m)  // keys 2m, 2m+1: 8 partial sums each (lanes l + l+8)
    b[m] = __builtin_shufflevector(acc[2 * m], acc[2 * m + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(acc[2 * m], acc[2 * m + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int n = 0; n < 4; ++n)  // keys 4n .. 4n+3: 4 partial sums each
    c4[n] = __builtin_shufflevector(b[2 * n], b[2 * n + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
            __builtin_shufflevector(b[2 * n], b[2 * n + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  for (int h = 0; h < 2; ++h)  // keys 8h .. 8h+7: 2 partial sums each
    e[h] = __builtin_shufflevector(c4[2 * h], c4[2 * h + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(c4[2 * h], c4[2 * h + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(e[0], e[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(e[0], e[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// The same sums for fewer keys at a time (KG of them), each key's 16 lanes reduced by the same
// tree: (l, l + 8), (l, l + 4), (l, l + 2), (l, l + 1). Paths with 16 vector registers (AVX2,
// baseline) use 4 keys, which keeps the accumulators in registers; the bits are those of dots16.
template <int KG>
__attribute__((always_inline)) inline void dots_group(const float* q, const float* const* k, int64_t d, float* out) {
  if constexpr (KG == 16) {
    storev(out, dots16(q, k, d));
  } else {
    v8f lo[KG], hi[KG];  // lanes 0-7 and 8-15 of each key's accumulator, in native 256-bit vectors
    for (int i = 0; i < KG; ++i) lo[i] = hi[i] = v8f{};
    for (int64_t c = 0; c < d; c += 16) {
      const v8f qlo = loadv<v8f>(q + c), qhi = loadv<v8f>(q + c + 8);
      for (int i = 0; i < KG; ++i) {
        lo[i] = lo[i] + qlo * loadv<v8f>(k[i] + c);
        hi[i] = hi[i] + qhi * loadv<v8f>(k[i] + c + 8);
      }
    }
    for (int i = 0; i < KG; ++i) {
      float x8[8], x4[4], x2[2];
      storev(x8, lo[i] + hi[i]);
      for (int j = 0; j < 4; ++j) x4[j] = x8[j] + x8[j + 4];
      for (int j = 0; j < 2; ++j) x2[j] = x4[j] + x4[j + 2];
      out[i] = x2[0] + x2[1];
    }
  }
}

// exp(x) for x <= 0 (scores minus their max), 16 at a time: 2^n * p(f), deterministic, ~1 ulp.
__attribute__((always_inline)) inline v16f exp_neg16(v16f x) {
  typedef int32_t v16i __attribute__((vector_size(64)));
  const v16i big = x < -87.f;  // all ones where e^x underflows (and for -inf): the result is 0
  x = big ? v16f{} : x;        // keeps the arithmetic below finite in those lanes
  const v16f t = x * 1.44269504088896341f;
  v16i n = __builtin_convertvector(t, v16i);  // toward zero; t <= 0, so floor is one less where inexact
  n = n - (__builtin_convertvector(n, v16f) > t ? 1 : 0);
  const v16f f = (t - __builtin_convertvector(n, v16f)) * 0.69314718055994531f;  // f in [0, ln 2)
  v16f p = f * (1.f / 5040.f) + 1.f / 720.f;
  p = p * f + 1.f / 120.f;
  p = p * f + 1.f / 24.f;
  p = p * f + 1.f / 6.f;
  p = p * f + 0.5f;
  p = p * f + 1.f;
  p = p * f + 1.f;
  const v16i bits = ((n + 127) << 23) & ~big;  // 2^n, or 0
  v16f scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// In place over s[0:n): s = exp(s - max) / sum, the sum in 16 lanes (key t in lane t % 16).
__attribute__((always_inline)) inline void softmax16(float* s, int64_t n) {
  float top = -INFINITY;
  for (int64_t t = 0; t < n; ++t) top = std::max(top, s[t]);
  v16f acc = {};
  int64_t t = 0;
  for (; t + 16 <= n; t += 16) {
    const v16f e = exp_neg16(loadv<v16f>(s + t) - top);
    storev(s + t, e);
    acc = acc + e;
  }
  if (t < n) {  // the tail: padded lanes hold e^-inf = 0 and are never stored
    float tail[16];
    for (int i = 0; i < 16; ++i) tail[i] = t + i < n ? s[t + i] - top : -INFINITY;
    v16f e = exp_neg16(loadv<v16f>(tail));
    storev(tail, e);
    for (int64_t i = 0; t + i < n; ++i) s[t + i] = tail[i];
    acc = acc + e;
  }
  float lane[16];
  storev(lane, acc);
  for (int i = 0; i < 8; ++i) lane[i] = lane[i] + lane[i + 8];
  const float inv = 1.f / tree8(lane);
  for (t = 0; t < n; ++t) s[t] = s[t] * inv;
}

// The keys of [j0, j1) that a row sees (its visibility row `vr`), in cache order; returns how many.
__attribute__((always_inline)) inline int64_t visible_in_block(const uint8_t* vr, int64_t j0, int64_t j1, int64_t* keys) {
  int64_t n = 0;
  for (int64_t j = j0; j < j1; ++j)
    if (vr[j]) keys[n++] = j;
  return n;
}

// One item of an attention: KV head g, query rows [i0, i1), the group's heads [h0, h1). Keys and
// values are each read once for all of them; scores live in `score` ([row][head][key], the
// row's visible keys only), the outputs accumulate across blocks of keys in `po` directly.
template <int KG, typename VT, int OC>
__attribute__((always_inline)) inline void attend_item(int64_t g, int64_t i0, int64_t i1, int64_t h0, int64_t h1, const float* pq, const float* pk,
                 const float* pv, int64_t k_stride, int64_t v_stride, const uint8_t* vis, float* po, int64_t H, int64_t Hkv, int64_t Lq,
                 int64_t Lk, int64_t d, float sc, std::vector<float>& score, std::vector<int64_t>& count) {
  const int64_t G = H / Hkv, R = i1 - i0, NH = h1 - h0;
  const float* K = pk + g * k_stride;
  const float* V = pv + g * v_stride;
  score.resize(R * NH * Lk);
  count.assign(R, 0);
  // scores, in blocks of keys that stay in cache while every row and head takes its share
  constexpr int64_t KB = 64;
  for (int64_t j0 = 0; j0 < Lk; j0 += KB) {
    const int64_t j1 = std::min(Lk, j0 + KB);
    for (int64_t r = 0; r < R; ++r) {
      int64_t keys[KB];
      const int64_t nk = visible_in_block(vis + (i0 + r) * Lk, j0, j1, keys);
      if (!nk) continue;
      const int64_t t0 = count[r];
      count[r] += nk;
      for (int64_t hh = 0; hh < NH; ++hh) {
        const float* qv = pq + ((g * G + h0 + hh) * Lq + i0 + r) * d;
        float* out = score.data() + (r * NH + hh) * Lk + t0;
        for (int64_t s0 = 0; s0 < nk; s0 += KG) {
          const float* group[KG];
          for (int i = 0; i < KG; ++i) group[i] = K + keys[std::min(s0 + i, nk - 1)] * d;  // a short group repeats its last key
          float lanes[KG];
          dots_group<KG>(qv, group, d, lanes);
          for (int64_t i = 0; i < std::min<int64_t>(KG, nk - s0); ++i) out[s0 + i] = lanes[i] * sc;
        }
      }
    }
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t hh = 0; hh < NH; ++hh) {
      float* o = po + ((i0 + r) * H + g * G + h0 + hh) * d;
      std::memset(o, 0, sizeof(float) * d);
      if (count[r]) softmax16(score.data() + (r * NH + hh) * Lk, count[r]);
    }
  // values, by the same blocks of keys; each output lane still adds its keys in cache order
  // (the accumulators go through memory between blocks, exactly)
  std::vector<int64_t> seen(R, 0);
  for (int64_t j0 = 0; j0 < Lk; j0 += KB) {
    const int64_t j1 = std::min(Lk, j0 + KB);
    for (int64_t r = 0; r < R; ++r) {
      int64_t keys[KB];
      const int64_t nk = visible_in_block(vis + (i0 + r) * Lk, j0, j1, keys);
      if (!nk) continue;
      const int64_t t0 = seen[r];
      seen[r] += nk;
      for (int64_t hh = 0; hh < NH; ++hh) {
        const float* w = score.data() + (r * NH + hh) * Lk + t0;
        float* o = po + ((i0 + r) * H + g * G + h0 + hh) * d;
        // OC vectors of outputs at a time (of the path's native width: every lane is on its own):
        // independent accumulators hide the adds' latency
        constexpr int64_t VL = sizeof(VT) / sizeof(float);
        int64_t c = 0;
        for (; c + VL * OC <= d; c += VL * OC) {
          VT a[OC];
          for (int i = 0; i < OC; ++i) a[i] = loadv<VT>(o + c + VL * i);
          for (int64_t t = 0; t < nk; ++t) {
            const float* vj = V + keys[t] * d + c;
            for (int i = 0; i < OC; ++i) a[i] = a[i] + w[t] * loadv<VT>(vj + VL * i);
          }
          for (int i = 0; i < OC; ++i) storev(o + c + VL * i, a[i]);
        }
        for (; c < d; c += 16) {
          v16f a = loadv<v16f>(o + c);
          for (int64_t t = 0; t < nk; ++t) a = a + w[t] * loadv<v16f>(V + keys[t] * d + c);
          storev(o + c, a);
        }
      }
    }
  }
}

using AttendFn = void (*)(int64_t, int64_t, int64_t, int64_t, int64_t, const float*, const float*, const float*,
                         int64_t, int64_t, const uint8_t*, float*, int64_t, int64_t, int64_t, int64_t, int64_t, float, std::vector<float>&,
                         std::vector<int64_t>&);

// The same source compiled for AVX-512 and for baseline x86-64: the vector width, the keys scored
// together (KG) and the outputs summed together (OC vectors of VT) differ, never a result's bits.
#define DOVETAIL_ATTEND(NAME, TARGET, KG, VT, OC)                                                                          \
  TARGET void NAME(int64_t g, int64_t i0, int64_t i1, int64_t h0, int64_t h1, const float* pq, const float* pk, \
                   const float* pv, int64_t ks, int64_t vs, const uint8_t* vis, float* po, int64_t H,          \
                   int64_t Hkv, int64_t Lq, int64_t Lk, int64_t d, float sc, std::vector<float>& score,         \
                   std::vector<int64_t>& count) {                                                               \
    attend_item<KG, VT, OC>(g, i0, i1, h0, h1, pq, pk, pv, ks, vs, vis, po, H, Hkv, Lq, Lk, d, sc, score, count);           \
  }
DOVETAIL_ATTEND(attend_scalar, , 4, v8f, 4)
DOVETAIL_ATTEND(attend_avx512, __attribute__((target("avx512f"))), 16, v16f, 8)
#undef DOVETAIL_ATTEND

}  // namespace

// q [H, Lq, d], k/v [Hkv, Lk, d] float32, visible uint8 [Lq, Lk] -> out [Lq, H, d].
torch::Tensor row_attention(const torch::Tensor& q_in, const torch::Tensor& k_in, const torch::Tensor& v_in,
                            const torch::Tensor& visible_in, double scale, int64_t isa) {
  sync_thread_count();
  // The cache's keys and values are views into buffers with room to spare (models/kv_cache.py):
  // rows must be contiguous, heads may lie any distance apart, so the cache is never copied here.
  const auto rows_contiguous = [](const torch::Tensor& t) {
    torch::Tensor f = t.to(torch::kFloat32);
    return f.stride(2) == 1 && (f.size(1) <= 1 || f.stride(1) == f.size(2)) ? f : f.contiguous();
  };
  const torch::Tensor q = q_in.to(torch::kFloat32).contiguous(), visible = visible_in.to(torch::kUInt8).contiguous();
  torch::Tensor k = rows_contiguous(k_in), v = rows_contiguous(v_in);
  const int64_t H = q.size(0), Lq = q.size(1), d = q.size(2), Hkv = k.size(0), Lk = k.size(1);
  TORCH_CHECK(H % Hkv == 0 && visible.size(0) == Lq && visible.size(1) == Lk && k.size(2) == d &&
              v.sizes() == k.sizes(), "bad attention shapes");
  TORCH_CHECK(d % 16 == 0, "attention head size ", d, " is not a multiple of 16");
  auto out = torch::empty({Lq, H, d}, torch::kFloat32);
  const float *pq = q.data_ptr<float>(), *pk = k.data_ptr<float>(), *pv = v.data_ptr<float>();
  const uint8_t* vis = visible.data_ptr<uint8_t>();
  float* po = out.data_ptr<float>();
  // Items: (KV head, block of up to 16 query rows, share of the group's heads). Heads are split
  // only as far as it takes to give every thread an item: each split reads the keys once more.
  const int64_t G = H / Hkv, RB = 16, blocks = (Lq + RB - 1) / RB;
  const int64_t threads = at::get_num_threads();
  const int64_t splits = std::min<int64_t>(G, std::max<int64_t>(1, (threads + Hkv * blocks - 1) / (Hkv * blocks)));
  const int64_t per = (G + splits - 1) / splits;
  const int path = resolve_isa(isa);
  // The AVX2 path runs the baseline build: GCC's AVX2 code for this source was no faster, and the
  // bits are the same. Both take ~1.7 ms for one row over 4,096 keys (AVX-512: ~0.2 ms).
  // TODO(next): an AVX2 build that keeps its accumulators in registers.
  const AttendFn attend = path == ISA_AVX512 ? &attend_avx512 : &attend_scalar;
  at::parallel_for(0, Hkv * blocks * splits, 1, [&](int64_t b, int64_t e) {
    std::vector<float> score;
    std::vector<int64_t> count;
    for (int64_t item = b; item < e; ++item) {
      const int64_t g = item / (blocks * splits), blk = (item / splits) % blocks, part = item % splits;
      const int64_t h0 = part * per, h1 = std::min(G, h0 + per);
      if (h0 >= h1) continue;
      attend(g, blk * RB, std::min(Lq, blk * RB + RB), h0, h1, pq, pk, pv, k.stride(0), v.stride(0), vis, po, H, Hkv, Lq, Lk, d,
                  (float)scale, score, count);
    }
  });
  return out;
}

// ---- the machine's roof (benchmarks) -------------------------------------------------------------
// What the kernels' figures are fractions of: the int8 multiply-add peak of a kernel path (chains
// of dpbusd, or maddubs + madd, on registers only) and the rate at which the threads can stream
// memory (a sum over a buffer far larger than the caches).
namespace {

constexpr int CHAINS = 16;  // independent accumulators: enough to hide the instructions' latency

#define DOVETAIL_16(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12) X(13) X(14) X(15)

// Sixteen named accumulators (an array let the compiler shuffle registers between iterations).
__attribute__((target("avx512f,avx512bw,avx512vnni")))
int32_t spin_avx512(int64_t iters) {
#define DOVETAIL_DECL(i) __m512i acc##i = _mm512_set1_epi32(i);
#define DOVETAIL_STEP(i) acc##i = _mm512_dpbusd_epi32(acc##i, a, b);
#define DOVETAIL_SUM(i) total = _mm512_add_epi32(total, acc##i);
  DOVETAIL_16(DOVETAIL_DECL)
  __m512i a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(5);
  for (int64_t it = 0; it < iters; ++it) {
    __asm__ volatile("" : "+v"(a), "+v"(b));  // no instruction: only keeps the products in the loop
    DOVETAIL_16(DOVETAIL_STEP)
  }
  __m512i total = _mm512_setzero_si512();
  DOVETAIL_16(DOVETAIL_SUM)
#undef DOVETAIL_DECL
#undef DOVETAIL_STEP
#undef DOVETAIL_SUM
  return _mm512_reduce_add_epi32(total);
}

__attribute__((target("avx2,fma")))
int32_t spin_avx2(int64_t iters) {
  __m256i acc[CHAINS];
  for (int i = 0; i < CHAINS; ++i) acc[i] = _mm256_set1_epi32(i);
  __m256i a = _mm256_set1_epi8(3), b = _mm256_set1_epi8(5);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 16
    for (int i = 0; i < CHAINS; ++i) {
      __asm__ volatile("" : "+x"(a), "+x"(b));  // no instruction: each chain computes its own products
      acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), ones));
    }
  }
  __m256i total = acc[0];
  for (int i = 1; i < CHAINS; ++i) total = _mm256_add_epi32(total, acc[i]);
  int32_t lanes[8];
  _mm256_storeu_si256((__m256i*)lanes, total);
  return lanes[0];
}

}  // namespace

// int8 multiply-adds per second of kernel path `isa` (2 AVX2, 3 AVX-512 VNNI) on torch's threads.
double roof_int8_macs(int64_t isa, int64_t iters) {
  sync_thread_count();
  const int path = resolve_isa(isa);
  TORCH_CHECK(path >= ISA_AVX2, "the int8 roof is measured for the AVX2 and AVX-512 paths");
  const int64_t threads = at::get_num_threads();
  std::vector<int32_t> sink(threads);
  const auto t0 = std::chrono::steady_clock::now();
  at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) sink[i] = path == ISA_AVX512 ? spin_avx512(iters) : spin_avx2(iters);
  });
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  volatile int32_t keep = sink[0];
  (void)keep;
  return (double)threads * iters * CHAINS * (path == ISA_AVX512 ? 64 : 32) / seconds;
}

// Bytes per second the threads read from `buffer` (uint8, much larger than the caches), best of
// `reps` passes.
double roof_read_bytes(const torch::Tensor& buffer, int64_t reps) {
  sync_thread_count();
  TORCH_CHECK(buffer.is_contiguous() && buffer.scalar_type() == torch::kUInt8, "a contiguous uint8 buffer");
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

int64_t cpu_best_isa() { return best_isa(); }

void set_prefetch_bytes(int64_t bytes) { PREFETCH_BYTES = bytes; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quantize_rows", &quantize_rows, "int8 activations per 32-block", py::arg("x"), py::arg("isa") = 0);
  m.def("qmatmul", &qmatmul, "y = x @ W.T for a packed quantized W");
  m.def("qmatmul_quantized", &qmatmul_quantized, "y = x @ W.T (+ bias) from quantize_rows' output");
  m.def("rms_norm", &rms_norm, "RMSNorm of each row");
  m.def("add_rms_norm_", &add_rms_norm_, "h += delta in place, then RMSNorm(h)");
  m.def("rope_", &rope_, "rotary embedding in place (HF half-rotation convention)");
  m.def("dequantize_rows", &dequantize_rows, "rows of a packed weight as float32");
  m.def("best_isa", &cpu_best_isa, "1 scalar, 2 AVX2+FMA, 3 AVX-512 VNNI");
  m.def("row_attention", &row_attention, "attention, each query row on its own (block-independent)", py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("visible"), py::arg("scale"), py::arg("isa") = 0);
  m.def("set_prefetch_bytes", &set_prefetch_bytes, "software prefetch distance (benchmarks)");
  m.def("roof_int8_macs", &roof_int8_macs, "int8 multiply-adds per second of a kernel path (benchmarks)");
  m.def("roof_read_bytes", &roof_read_bytes, "bytes per second the threads stream from a buffer (benchmarks)");
  m.def("decode_values", &decode_values, "integer values of GGUF blocks");
  m.def("pack_values", &pack_values, "values -> the kernel's tile layout");
}
