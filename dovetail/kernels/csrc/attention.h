// Attention, row by row: the arithmetic every path shares, written with GCC vector types so that
// each build (attention.cpp: portable; x86/attention_avx2.cpp and x86/attention_avx512.cpp)
// compiles the same source for its own vector width.
// Each query row attends to its visible keys in cache order with a fixed order of operations, so
// a token's attention output is bit-identical whether it is decoded alone or verified inside a
// tree or a batch (a library attention kernel picks its blocking by shape, and with quantized
// activations a last-bit difference can flip an int8 rounding). The arithmetic of one (row, head):
//   score_t = dot(q, k_t) * scale, the dot product in 16 lanes of fused multiply-adds reduced in
//             a fixed tree (dots16);
//   p_t     = exp(score_t - max) / sum, the sum in 16 lanes (key t in lane t % 16), reduced in a
//             fixed tree; exp is a fixed polynomial;
//   out     = sum over t of p_t * v_t, each output lane a chain of fused multiply-adds over the
//             keys in cache order.
// Only vector widths change between the builds, never the order of operations (no -ffast-math,
// no contraction: each fused multiply-add is explicit, one rounding on every build), so every
// build gives the same bits.
//
// The loops are arranged so that the keys and values of a KV head are read once for all the query
// rows and heads that share them (decoding one token, verifying a block, or a block of prompt
// rows): at long context a block's attention costs about what one row's does in memory traffic.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels.h"

namespace dovetail {
namespace {  // each build keeps its own copy, compiled for its own instruction set

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

// The portable build's fused multiply-add, lane by lane (one rounding, as the x86 builds' fma
// instructions): every build gives the same bits.
struct PortableFma {
  template <typename V>
  __attribute__((always_inline)) static inline V fma(V a, V b, V c) {
    V r;
    for (int i = 0; i < (int)(sizeof(V) / sizeof(float)); ++i) r[i] = std::fma(a[i], b[i], c[i]);
    return r;
  }
};

__attribute__((always_inline)) inline float tree8(const float* l) { return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7])); }

// q . k_i for 16 keys at once (d a multiple of 16), lane i of the result holding key i: lane l of
// key i's accumulator sums q[c + l] * k_i[c + l] over c = 0, 16, 32, ... in order (fused), then each key's
// 16 lanes are added in a fixed tree, (l, l + 8), then (l, l + 4), (l, l + 2), (l, l + 1), by a
// transposing network that reduces all 16 keys together. A key's score depends on that key alone,
// never on which keys share its group.
template <typename F>
__attribute__((always_inline)) inline v16f dots16(const float* q, const float* const* k, int64_t d) {
  v16f acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = v16f{};
  for (int64_t c = 0; c < d; c += 16) {
    const v16f qc = loadv<v16f>(q + c);
    for (int i = 0; i < 16; ++i) acc[i] = F::fma(qc, loadv<v16f>(k[i] + c), acc[i]);
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
template <int KG, typename F>
__attribute__((always_inline)) inline void dots_group(const float* q, const float* const* k, int64_t d, float* out) {
  if constexpr (KG == 16) {
    storev(out, dots16<F>(q, k, d));
  } else {
    v8f lo[KG], hi[KG];  // lanes 0-7 and 8-15 of each key's accumulator, in native 256-bit vectors
    for (int i = 0; i < KG; ++i) lo[i] = hi[i] = v8f{};
    for (int64_t c = 0; c < d; c += 16) {
      const v8f qlo = loadv<v8f>(q + c), qhi = loadv<v8f>(q + c + 8);
      for (int i = 0; i < KG; ++i) {
        lo[i] = F::fma(qlo, loadv<v8f>(k[i] + c), lo[i]);
        hi[i] = F::fma(qhi, loadv<v8f>(k[i] + c + 8), hi[i]);
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
template <int KG, typename VT, int OC, typename F>
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
          dots_group<KG, F>(qv, group, d, lanes);
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
            for (int i = 0; i < OC; ++i) a[i] = F::fma(VT{} + w[t], loadv<VT>(vj + VL * i), a[i]);
          }
          for (int i = 0; i < OC; ++i) storev(o + c + VL * i, a[i]);
        }
        for (; c < d; c += 16) {
          v16f a = loadv<v16f>(o + c);
          for (int64_t t = 0; t < nk; ++t) a = F::fma(v16f{} + w[t], loadv<v16f>(V + keys[t] * d + c), a);
          storev(o + c, a);
        }
      }
    }
  }
}


}  // namespace
}  // namespace dovetail

// A build of attend_item: KG keys scored together, OC vectors of VT outputs summed together, F's
// fused multiply-adds.
#define DOVETAIL_ATTEND_BUILD(NAME, KG, VT, OC, F)                                                          \
  void NAME(DOVETAIL_ATTEND_ARGS) {                                                                        \
    attend_item<KG, VT, OC, F>(g, i0, i1, h0, h1, pq, pk, pv, k_stride, v_stride, vis, po, H, Hkv, Lq, Lk, d, scale, \
                            score, count);                                                                 \
  }
