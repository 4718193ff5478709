// The quantized tile kernel on AVX-512 VNNI: one dpbusd per 64-byte chunk of the packed layout
// (kernels.h) and row. The same bits as tile_scalar (matmul.cpp), lane by lane.
#include "x86.h"

#if DOVETAIL_X86
#include <immintrin.h>

namespace dovetail::x86 {
namespace {

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
// to itself GCC keeps the group loop of 16-input formats rolled and spills them to the stack, which
// makes Q6_K about half as fast per multiply-add as Q4_K.
template <int BITS, int GS, int MODE, int R>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
inline void rows_avx512(const int8_t* xq, const float* xs, float* acc, int32_t zi,
                        const __m512i* wv, const __mmask64* neg, const Unit512<MODE, 32 / GS>& uf) {
  constexpr int HALVES = 32 / GS, CHUNKS = GS / 4;
  constexpr bool SYM = MODE == SYM_BLOCK || MODE == SYM_K;
  const __m512i zero = _mm512_setzero_si512();
  __m512 f[R];
  __m512i total[R];
  #pragma GCC unroll 16
  for (int r = 0; r < R; ++r) f[r] = _mm512_loadu_ps(acc + r * 16);
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
        std::memcpy(&x4, xq + r * 32 + c * 4, 4);
        __m512i xb = _mm512_set1_epi32(x4);
        if (BITS == 8) xb = _mm512_mask_sub_epi8(xb, neg[c], zero, xb);  // sign(x, w): |w| is unsigned
        part[r][c % P] = _mm512_dpbusd_epi32(part[r][c % P], wv[c], xb);
      }
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      __m512i isum = part[r][0];
      #pragma GCC unroll 16
      for (int j = 1; j < P; ++j) isum = _mm512_add_epi32(isum, part[r][j]);
      const float* s = xs + r * 4;
      if (SYM) {
        const int32_t xsum = HALVES == 1 ? (int32_t)s[2] + (int32_t)s[3] : (int32_t)s[2 + h];
        isum = _mm512_sub_epi32(isum, _mm512_set1_epi32(zi * xsum));
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
      const float* s = xs + r * 4;
      f[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total[r]), _mm512_mul_ps(uf.D, _mm512_set1_ps(s[0])), f[r]);
    }
  #pragma GCC unroll 16
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(acc + r * 16, f[r]);
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
    const int8_t* x = xq + unit_row(M, u, 0) * 32;
    const float* s = xs + unit_row(M, u, 0) * 4;
    int64_t m = 0;
#define DOVETAIL_ROWS(R) rows_avx512<BITS, GS, MODE, R>(x + m * 32, s + m * 4, acc + m * 16, w.zi, wv, neg, uf)
    for (; m + 8 <= M; m += 8) DOVETAIL_ROWS(8);
    for (; m + 4 <= M; m += 4) DOVETAIL_ROWS(4);
    for (; m + 2 <= M; m += 2) DOVETAIL_ROWS(2);
    for (; m < M; ++m) DOVETAIL_ROWS(1);
#undef DOVETAIL_ROWS
  }
}

}  // namespace

#define DOVETAIL_TILE(B, G, MODE) &tile_avx512<B, G, MODE>,
const TileFn AVX512_TILES[N_FORMATS] = {DOVETAIL_FORMATS(DOVETAIL_TILE)};
#undef DOVETAIL_TILE

}  // namespace dovetail::x86
#endif
