// Attention, each query row on its own (the arithmetic: attention.h): the operator, and the
// portable build every path's bits follow.
#include "attention.h"
#include "ops.h"
#include "portable.h"

namespace dovetail {

// 4 keys scored together and 4 vectors of 8 outputs summed together: 16 registers' worth on most
// CPUs with 128-bit vectors.
DOVETAIL_ATTEND_BUILD(attend_scalar, 4, v8f, 4, PortableFma)

// q [H, Lq, d], k/v [Hkv, Lk, d] float32, visible uint8 [Lq, Lk] -> out [Lq, H, d].
at::Tensor row_attention(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                            const at::Tensor& visible_in, double scale, int64_t isa) {
  sync_thread_count();
  // The cache's keys and values are views into buffers with room to spare (models/kv_cache.py):
  // rows must be contiguous, heads may lie any distance apart, so the cache is never copied here.
  const auto rows_contiguous = [](const at::Tensor& t) {
    at::Tensor f = t.scalar_type() == at::kFloat ? t : t.to(at::kFloat);
    return f.stride(2) == 1 && (f.size(1) <= 1 || f.stride(1) == f.size(2)) ? f : f.contiguous();
  };
  const at::Tensor q = as_contiguous(q_in), visible = as_contiguous(visible_in, at::kByte);
  at::Tensor k = rows_contiguous(k_in), v = rows_contiguous(v_in);
  const int64_t H = q.size(0), Lq = q.size(1), d = q.size(2), Hkv = k.size(0), Lk = k.size(1);
  TORCH_CHECK(H % Hkv == 0 && visible.size(0) == Lq && visible.size(1) == Lk && k.size(2) == d &&
              v.sizes() == k.sizes(), "bad attention shapes");
  TORCH_CHECK(d % 16 == 0, "attention head size ", d, " is not a multiple of 16");
  auto out = at::empty({Lq, H, d}, at::kFloat);
  const float *pq = q.data_ptr<float>(), *pk = k.data_ptr<float>(), *pv = v.data_ptr<float>();
  const uint8_t* vis = visible.data_ptr<uint8_t>();
  float* po = out.data_ptr<float>();
  // Items: (KV head, block of up to 16 query rows, share of the group's heads). Heads are split
  // only as far as it takes to give every thread an item: each split reads the keys once more.
  const int64_t G = H / Hkv, RB = 16, blocks = (Lq + RB - 1) / RB;
  const int64_t threads = at::get_num_threads();
  const int64_t splits = std::min<int64_t>(G, std::max<int64_t>(1, (threads + Hkv * blocks - 1) / (Hkv * blocks)));
  const int64_t per = (G + splits - 1) / splits;
  const AttendFn attend = kernel_set(isa).attend;
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

}  // namespace dovetail
