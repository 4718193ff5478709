// Load-time repacking: GGUF blocks -> integer values (decode_values) -> the packed tile layout of
// kernels.h (pack_values). The scales are read by packing.py.
#include "ops.h"

namespace dovetail {

// GGML type ids of the formats whose values decode_values extracts.
enum GgmlType { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14 };

// The integer values of GGUF blocks [N, bytes per row] -> uint8 [N, K] (int8 bits for Q8_0), in
// the order of the weights; the scales are read by packing.py. Mirrors ggml's block layouts.
at::Tensor decode_values(const at::Tensor& raw_in, int64_t type, int64_t N, int64_t K) {
  sync_thread_count();
  const at::Tensor raw = raw_in.contiguous();
  TORCH_CHECK(raw.scalar_type() == at::kByte && raw.numel() % N == 0, "raw blocks must be uint8 [N, bytes]");
  const int64_t row_bytes = raw.numel() / N;
  int64_t per = 32, size = 0;
  switch (type) {
    case Q4_0: size = 18; break;
    case Q4_1: size = 20; break;
    case Q5_0: size = 22; break;
    case Q5_1: size = 24; break;
    case Q8_0: size = 34; break;
    case Q2_K: per = 256; size = 84; break;
    case Q3_K: per = 256; size = 110; break;
    case Q4_K: per = 256; size = 144; break;
    case Q5_K: per = 256; size = 176; break;
    case Q6_K: per = 256; size = 210; break;
    default: TORCH_CHECK(false, "decode_values: unsupported GGML type ", type);
  }
  TORCH_CHECK(K % per == 0 && row_bytes == K / per * size, "raw blocks do not match the shape");
  auto out = at::empty({N, K}, at::kByte);
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
        case Q5_K: {  // d, dmin, 12 bytes of scales, then the fifth bits, then the nibbles
          const uint8_t* qh = x + 16;
          const uint8_t* qs = x + 48;
          for (int j = 0; j < 4; ++j)
            for (int i = 0; i < 32; ++i) {
              y[64 * j + i] = (qs[32 * j + i] & 15) | (((qh[i] >> (2 * j)) & 1) << 4);
              y[64 * j + 32 + i] = (qs[32 * j + i] >> 4) | (((qh[i] >> (2 * j + 1)) & 1) << 4);
            }
          break;
        }
        case Q3_K: case Q2_K: {  // 2-bit fields, four to a byte, 32 bytes per 128 weights
          const uint8_t* qs = x + (type == Q3_K ? 32 : 16);
          const uint8_t* hmask = x;  // Q3_K: the third bit, one bit plane per 32 weights
          for (int half = 0; half < 2; ++half)
            for (int j = 0; j < 4; ++j)
              for (int l = 0; l < 32; ++l) {
                uint8_t v = (qs[32 * half + l] >> (2 * j)) & 3;
                if (type == Q3_K) v |= ((hmask[l] >> (4 * half + j)) & 1) << 2;
                y[128 * half + 32 * j + l] = v;
              }
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
at::Tensor pack_values(const at::Tensor& q_in, int64_t bits) {
  sync_thread_count();
  const at::Tensor q = q_in.contiguous();
  TORCH_CHECK(q.dim() == 2 && q.size(1) % 32 == 0, "values must be [N, K] with K a multiple of 32");
  const int64_t N = q.size(0), K = q.size(1), T = (N + 15) / 16, U = K / 32;
  const int64_t qbytes = bits == 8 ? 512 : 256 + (bits - 4) * 64;
  auto out = at::zeros({T, U, qbytes}, at::kByte);
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

}  // namespace dovetail
