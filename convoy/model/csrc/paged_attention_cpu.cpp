// Paged decode attention for the CPU, float32.
//
// One query token per sequence attends to its context straight from the paged KV cache:
// no gathered copy of the context, no padding to the longest sequence in the batch. Work is
// split over (sequence, kv head) pairs; the query heads sharing a kv head (GQA) are handled
// together so every key and value vector is read once for all of them.
//
// Softmax is computed the plain way (scores, max, exp, sum, weighted sum of values) in
// float32, like the reference implementation, so results match it to float rounding.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

inline void axpy(float* __restrict y, const float* __restrict x, float w, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += w * x[i];
}

}  // namespace

// out, q: (D, H, Dh); k_cache, v_cache: (S, Hkv, Dh) with unit stride on Dh;
// block_tables: (D, B) int64; context_lens: (D,) int64 (the query sits at position len-1);
// window <= 0 means no sliding window, else keys at positions >= len - window are attended.
void paged_decode_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache,
                            torch::Tensor v_cache, torch::Tensor block_tables,
                            torch::Tensor context_lens, int64_t block_size, double scale,
                            int64_t window) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32, "q must be float32");
  TORCH_CHECK(k_cache.scalar_type() == torch::kFloat32 && v_cache.scalar_type() == torch::kFloat32,
              "the KV cache must be float32");
  TORCH_CHECK(q.is_contiguous() && out.is_contiguous(), "q and out must be contiguous");
  TORCH_CHECK(k_cache.stride(2) == 1 && v_cache.stride(2) == 1, "head_dim must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt64 && block_tables.is_contiguous());
  TORCH_CHECK(context_lens.scalar_type() == torch::kInt64 && context_lens.is_contiguous());

  const int64_t num_seqs = q.size(0);
  const int64_t num_heads = q.size(1);
  const int64_t head_dim = q.size(2);
  const int64_t num_kv_heads = k_cache.size(1);
  TORCH_CHECK(num_heads % num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads");
  const int64_t group = num_heads / num_kv_heads;
  const int64_t max_blocks = block_tables.size(1);
  const int64_t num_slots = k_cache.size(0);

  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int64_t ks = k_cache.stride(0), kh = k_cache.stride(1);
  const int64_t vs = v_cache.stride(0), vh = v_cache.stride(1);
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<float> acc(group * head_dim);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t seq = item / num_kv_heads;
      const int64_t kvh = item % num_kv_heads;
      const int64_t len = lens[seq];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t n = len - first;
      const int64_t* table = tables + seq * max_blocks;
      const float* qg = qp + (seq * num_heads + kvh * group) * head_dim;
      float* og = op + (seq * num_heads + kvh * group) * head_dim;
      if (n <= 0) {
        std::fill(og, og + group * head_dim, 0.f);
        continue;
      }
      scores.resize(group * n);

      // Scores q . k for every attended position, all query heads of this kv head at once.
      for (int64_t p = first; p < len; ++p) {
        const int64_t slot = table[p / block_size] * block_size + p % block_size;
        TORCH_CHECK(slot >= 0 && slot < num_slots, "slot out of range");
        const float* key = kp + slot * ks + kvh * kh;
        for (int64_t g = 0; g < group; ++g)
          scores[g * n + (p - first)] = dot(qg + g * head_dim, key, head_dim) * fscale;
      }
      // Softmax per query head.
      for (int64_t g = 0; g < group; ++g) {
        float* s = scores.data() + g * n;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t i = 0; i < n; ++i) mx = std::max(mx, s[i]);
        float sum = 0.f;
        for (int64_t i = 0; i < n; ++i) {
          s[i] = std::exp(s[i] - mx);
          sum += s[i];
        }
        const float inv = 1.f / sum;
        for (int64_t i = 0; i < n; ++i) s[i] *= inv;
      }
      // Weighted sum of values.
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t p = first; p < len; ++p) {
        const int64_t slot = table[p / block_size] * block_size + p % block_size;
        const float* value = vp + slot * vs + kvh * vh;
        for (int64_t g = 0; g < group; ++g)
          axpy(acc.data() + g * head_dim, value, scores[g * n + (p - first)], head_dim);
      }
      std::copy(acc.begin(), acc.end(), og);
    }
  });
}
