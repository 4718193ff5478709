// Sampling one row of the vocabulary (models/verification.py): the top-k / top-p filters and the
// position-seeded inverse-CDF draw, a few passes over the row each, without sorting it and
// without a float64 copy of it. A row of 152k tokens then costs a fraction of a millisecond to
// warp and draw, where a full sort alone costs ten or more.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#include "ops.h"
#include "portable.h"

namespace dovetail {
namespace {

// A non-negative float's bits rise with its value, so their top bits (exponent and 7 mantissa
// bits: steps of under 1%) sort the row into buckets without comparing. Top-p's histogram spans
// SPAN buckets down from the most likely token's (32 octaves); what lies below them shares one.
constexpr int BUCKET_SHIFT = 16;
constexpr int64_t SPAN = 32 << 7;
constexpr float INF = std::numeric_limits<float>::infinity();

inline uint32_t bucket_of(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return bits >> BUCKET_SHIFT;
}

// The whole-row passes, each compiled for AVX2 as well where the build has x86 paths (the loader
// picks the copy this CPU runs). They vectorise without changing a result: the lanes fix the order
// of every sum, and no-trapping-math only lets a compare select instead of branch.
#if DOVETAIL_X86
#define ROW_PASS __attribute__((target_clones("avx2", "default"), optimize("no-trapping-math")))
#else
#define ROW_PASS __attribute__((optimize("no-trapping-math")))
#endif

// sum of a row in float64 over the values at least `floor`, in 8 interleaved lanes (a fixed
// order, no chain of dependent adds)
ROW_PASS double sum_from(const float* p, int64_t V, float floor) {
  double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= V; i += 8)
    for (int t = 0; t < 8; ++t) lane[t] += (double)(p[i + t] >= floor ? p[i + t] : 0.f);
  for (; i < V; ++i) lane[0] += (double)(p[i] >= floor ? p[i] : 0.f);
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

ROW_PASS float max_of(const float* p, int64_t V) {
  float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= V; i += 8)
    for (int t = 0; t < 8; ++t) lane[t] = lane[t] > p[i + t] ? lane[t] : p[i + t];
  for (; i < V; ++i) lane[0] = lane[0] > p[i] ? lane[0] : p[i];
  return *std::max_element(lane, lane + 8);
}

// p <- p / total where p >= cut, else 0
ROW_PASS void keep_from(float* p, int64_t V, float cut, float total) {
  for (int64_t i = 0; i < V; ++i) {
    const float v = p[i] / total;
    p[i] = p[i] >= cut ? v : 0.f;
  }
}

// Appends to `out` the values v of row p with lo <= v < hi, in token order, stopping once more than
// `limit` are found.
void gather_range(FindFn find, const float* p, int64_t V, float lo, float hi, std::vector<float>& out, size_t limit) {
  thread_local std::vector<int32_t> at;
  const int64_t cap = (int64_t)std::min<size_t>(limit, (size_t)V);
  at.resize((size_t)cap + 16);
  const int64_t n = find(p, V, lo, hi, at.data(), cap);
  for (int64_t j = 0; j < n; ++j) out.push_back(p[at[j]]);
}

// index[i] = p[i]'s bucket less `low`, or 0 below it: one vectorised pass ahead of the histogram's
// scattered adds, which do not vectorise
ROW_PASS void bucket_indices(const float* p, int64_t V, int32_t low, int32_t* index) {
  for (int64_t i = 0; i < V; ++i) {
    uint32_t bits;
    std::memcpy(&bits, p + i, sizeof bits);
    const int32_t j = (int32_t)(bits >> BUCKET_SHIFT) - low;
    index[i] = j > 0 ? j : 0;
  }
}

// The k-th largest value of row p (ties counted), in one pass: values above a running threshold
// go into a buffer; when it fills, its k-th largest becomes the threshold and what is below goes.
// The threshold never passes the true k-th value, and every value above it is in the buffer. The
// row is searched a chunk at a time, each chunk for the values above the threshold as it stands.
float kth_largest(FindFn find, const float* p, int64_t V, int64_t k) {
  constexpr int64_t CHUNK = 4096;
  const size_t cap = 2 * (size_t)k + 256;
  std::vector<float> buf;
  buf.reserve(cap + CHUNK);
  float thr = -1.f;  // below every probability
  const auto nth = [&] {
    std::nth_element(buf.begin(), buf.begin() + (k - 1), buf.end(), std::greater<float>());
    return buf[k - 1];
  };
  for (int64_t i = 0; i < V; i += CHUNK) {
    gather_range(find, p + i, std::min(CHUNK, V - i), std::nextafter(thr, INF), INF, buf, CHUNK);
    if (buf.size() >= cap) {
      thr = nth();
      buf.erase(std::remove_if(buf.begin(), buf.end(), [&](float v) { return v <= thr; }), buf.end());
    }
  }
  return (int64_t)buf.size() >= k ? nth() : thr;
}

// Top-p's cut among `candidates` (sorted from the most likely down), `before` being what the tokens
// more likely than all of them hold: a candidate stays while the probability ranked strictly
// above it is below `need`; tied candidates count once. Sets `kept` to what the kept tokens hold.
float cut_by_weight(const std::vector<float>& candidates, double before, double need, double& kept) {
  float cut = candidates.front();
  double ahead = before;
  for (size_t j = 0; j < candidates.size() && ahead < need;) {
    cut = candidates[j];
    for (; j < candidates.size() && candidates[j] == cut; ++j) ahead += candidates[j];
  }
  kept = ahead;
  return cut;
}

constexpr float PEAKED = 1.f / 256;  // top-p first tries the tokens within this factor of the most likely
constexpr size_t FEW = 4096;         // ... and sorts them when there are no more than this many

// The least probable token top-p keeps of row p (HF's TopPLogitsWarper: a token stays while the
// tokens more likely than it hold less than top_p of the row; the most likely always stays), and
// what the kept tokens hold (`total`: what the whole row holds). A peaked row's mass sits in a few tokens near the top: those are
// gathered and sorted. Otherwise a histogram over the buckets finds the one bucket where the
// running mass, from the most likely down, reaches the cut, and only that bucket is sorted.
float top_p_cut(FindFn find, const float* p, int64_t V, double top_p, double total, double& kept) {
  const float top = max_of(p, V);
  const double need = top_p * total;
  std::vector<float> near;
  gather_range(find, p, V, std::nextafter(top * PEAKED, INF), INF, near, FEW);
  if (near.size() <= FEW) {
    double held = 0;
    for (float v : near) held += v;
    if (held >= need) {
      std::sort(near.begin(), near.end(), std::greater<float>());
      return cut_by_weight(near, 0.0, need, kept);
    }
  }
  // bucket j holds the tokens SPAN - 1 - j buckets below the top one's; bucket 0 everything lower
  // (zeros too, which add nothing)
  const int32_t high = (int32_t)bucket_of(top), low = high - (int32_t)(SPAN - 1);
  thread_local std::vector<int32_t> index;
  index.resize((size_t)V);
  bucket_indices(p, V, low, index.data());
  std::vector<double> hist(SPAN, 0.0);
  for (int64_t i = 0; i < V; ++i) hist[index[i]] += (double)p[i];
  int64_t b = SPAN - 1;
  double before = 0;  // what the buckets above b hold
  for (; b > 0 && before + hist[b] < need; --b) before += hist[b];
  // bucket b's values as a range: [the least float of its bits, the least of the next bucket's)
  const auto first_of = [](int64_t bucket) {
    const uint32_t bits = bucket > 0 ? (uint32_t)bucket << BUCKET_SHIFT : 0u;
    float v;
    std::memcpy(&v, &bits, sizeof v);
    return v;
  };
  const float lo = std::max(b ? first_of(low + b) : 0.f, std::numeric_limits<float>::denorm_min());  // zeros: filtered
  std::vector<float> inside;
  gather_range(find, p, V, lo, first_of(low + b + 1), inside, (size_t)V);
  if (inside.empty()) {  // rounding left the mass short of `need` in the buckets: keep every nonzero token
    kept = total;
    return std::numeric_limits<float>::denorm_min();
  }
  std::sort(inside.begin(), inside.end(), std::greater<float>());
  return cut_by_weight(inside, before, need, kept);
}

}  // namespace

// Top-k, then top-p (HF's order), on each row of probs [n, V] in place: the tokens each filter
// drops become 0 and the row is divided by what it kept, so it sums to 1 again. top_k 0: no top-k;
// top_p 1: no top-p. Tokens of equal probability stay or go together. isa: the kernel path (0: the
// best); every path keeps the same tokens.
void filter_probs_(at::Tensor& probs, int64_t top_k, double top_p, int64_t isa) {
  TORCH_CHECK(probs.dim() == 2 && probs.is_contiguous() && probs.scalar_type() == at::kFloat,
              "probs must be contiguous float32 [n, V]");
  const int64_t n = probs.size(0), V = probs.size(1);
  const FindFn find = kernel_set(isa).find_range;
  for (int64_t r = 0; r < n; ++r) {
    float* p = probs.data_ptr<float>() + r * V;
    const bool by_count = top_k > 0 && top_k < V;
    float cut = by_count ? kth_largest(find, p, V, top_k) : 0.f;
    double kept = sum_from(p, V, cut);  // what the row holds after top-k
    if (top_p < 1.0) {
      if (by_count) keep_from(p, V, cut, 1.f);  // top-p then sees only what top-k kept
      cut = top_p_cut(find, p, V, top_p, kept, kept);
    }
    keep_from(p, V, cut, (float)kept);
  }
}

int64_t find_range_scalar(const float* p, int64_t V, float lo, float hi, int32_t* at, int64_t limit) {
  int64_t n = 0;
  for (int64_t i = 0; i < V && n <= limit; ++i)
    if (p[i] >= lo && p[i] < hi) at[n++] = (int32_t)i;
  return n;
}

// The inverse CDF of one row of probabilities (in token order) at u * the row's sum, u in [0, 1).
// Blocks of DRAW_BLOCK tokens are summed in float64 (eight lanes, a fixed order), the block the
// number falls in is found, and only that block is accumulated token by token. A token of zero
// probability is never drawn: the CDF does not rise at it.
int64_t draw_token(const at::Tensor& probs_in, double u) {
  constexpr int64_t DRAW_BLOCK = 1024;
  const at::Tensor probs = as_contiguous(probs_in);
  const float* p = probs.data_ptr<float>();
  const int64_t V = probs.numel(), blocks = (V + DRAW_BLOCK - 1) / DRAW_BLOCK;
  TORCH_CHECK(V > 0, "nothing to draw from");
  std::vector<double> cum(blocks);
  double running = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    const int64_t lo = b * DRAW_BLOCK, hi = std::min(V, lo + DRAW_BLOCK);
    int64_t i = lo;
    for (; i + 8 <= hi; i += 8)
      for (int t = 0; t < 8; ++t) lane[t] += (double)p[i + t];
    for (; i < hi; ++i) lane[0] += (double)p[i];
    running += ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
    cum[b] = running;
  }
  const double target = u * running;
  int64_t b = std::upper_bound(cum.begin(), cum.end(), target) - cum.begin();
  if (b >= blocks) b = std::lower_bound(cum.begin(), cum.end(), running) - cum.begin();  // rounded up: the last block with mass
  const int64_t lo = b * DRAW_BLOCK, hi = std::min(V, lo + DRAW_BLOCK);
  double cdf = b ? cum[b - 1] : 0.0;
  int64_t last = -1;  // the block's last token that can be drawn
  for (int64_t i = lo; i < hi; ++i) {
    if (p[i] <= 0.f) continue;
    cdf += (double)p[i];
    last = i;
    if (cdf > target) return i;
  }
  TORCH_CHECK(last >= 0, "a row of probabilities without mass");
  return last;  // the block's own sum rounded a little above the walk
}

}  // namespace dovetail
