// The quantized tile kernel on AVX2 + FMA: each 64-byte chunk of the packed layout (kernels.h) is
// two 256-bit halves (rows 0-7, rows 8-15), multiplied with maddubs + madd. The same bits as
// tile_scalar (matmul.cpp), lane by lane.
#include "x86.h"

#if DOVETAIL_X86
#include <immintrin.h>

namespace dovetail::x86 {
namespace {

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
      const int8_t* x = xq + unit_row(M, u, m) * 32;
      const float* s = xs + unit_row(M, u, m) * 4;
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

}  // namespace

#define DOVETAIL_TILE(B, G, MODE) &tile_avx2<B, G, MODE>,
const TileFn AVX2_TILES[N_FORMATS] = {DOVETAIL_FORMATS(DOVETAIL_TILE)};
#undef DOVETAIL_TILE

}  // namespace dovetail::x86
#endif
