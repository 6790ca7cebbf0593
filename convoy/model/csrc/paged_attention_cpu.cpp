// Paged decode attention for the CPU, float32.
//
// One query token per sequence attends to its context straight from the paged KV cache:
// no gathered copy of the context, no padding to the longest sequence in the batch. Work is
// split over sequences (or (sequence, kv head) pairs when there are fewer sequences than
// threads); the query heads sharing a kv head (GQA) are handled together so every key and
// value vector is read once for all of them.
//
// Softmax is computed the plain way (scores, max, exp, sum, weighted sum of values) in
// float32, like the reference implementation, so results match it to float rounding.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// Four dot products of q with k0..k3, scaled, into s[0..3].
inline void dot4(const float* __restrict q, const float* __restrict k0, const float* __restrict k1,
                 const float* __restrict k2, const float* __restrict k3, int64_t n, float scale,
                 float* __restrict s) {
  float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
  for (int64_t i = 0; i < n; ++i) {
    const float qi = q[i];
    a0 += qi * k0[i];
    a1 += qi * k1[i];
    a2 += qi * k2[i];
    a3 += qi * k3[i];
  }
  s[0] = a0 * scale;
  s[1] = a1 * scale;
  s[2] = a2 * scale;
  s[3] = a3 * scale;
}

// y += w[0] v0 + w[1] v1 + w[2] v2 + w[3] v3.
inline void axpy4(float* __restrict y, const float* __restrict v0, const float* __restrict v1,
                  const float* __restrict v2, const float* __restrict v3,
                  const float* __restrict w, int64_t n) {
  const float w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += w0 * v0[i] + w1 * v1[i] + w2 * v2[i] + w3 * v3[i];
}

// exp(x) for x <= 0 (softmax after subtracting the max), written so the compiler vectorizes
// it (a libm call does not vectorize without -ffast-math): Cody-Waite range reduction and a
// degree-6 polynomial, within 2 ulp of expf; below -87 it flushes to 0 like expf's underflow.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  float r = x - n * 0.693359375f;
  r -= n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
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

  // Validate every block id a sequence will read once, outside the hot loop.
  const int64_t num_blocks = num_slots / block_size;
  for (int64_t seq = 0; seq < num_seqs; ++seq) {
    const int64_t used = (lens[seq] + block_size - 1) / block_size;
    TORCH_CHECK(used <= max_blocks, "context longer than its block table");
    for (int64_t b = 0; b < used; ++b) {
      const int64_t blk = tables[seq * max_blocks + b];
      TORCH_CHECK(blk >= 0 && blk < num_blocks, "block id out of range");
    }
  }

  // One work item is a sequence with all its kv heads, so a thread reads each slot's keys
  // (all heads, contiguous) in one sweep; with fewer sequences than threads, items split a
  // sequence by kv head instead so every thread has work.
  const int64_t splits = num_seqs >= at::get_num_threads() ? 1 : num_kv_heads;
  at::parallel_for(0, num_seqs * splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<float> acc;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t seq = item / splits;
      const int64_t h0 = splits == 1 ? 0 : item % splits;
      const int64_t h1 = splits == 1 ? num_kv_heads : h0 + 1;
      const int64_t heads = (h1 - h0) * group;  // query heads of this item
      const int64_t len = lens[seq];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t n = len - first;
      const int64_t* table = tables + seq * max_blocks;
      const float* qh = qp + (seq * num_heads + h0 * group) * head_dim;
      float* oh = op + (seq * num_heads + h0 * group) * head_dim;
      if (n <= 0) {
        std::fill(oh, oh + heads * head_dim, 0.f);
        continue;
      }
      scores.resize(heads * n);
      acc.assign(heads * head_dim, 0.f);

      // Scores q . k for every attended position, block by block. Four positions per pass:
      // four independent accumulations keep the FMA units busy (one dot alone is
      // latency-bound); each key is read once for all query heads sharing its kv head.
      for (int64_t b = first / block_size; b * block_size < len; ++b) {
        const int64_t lo = std::max(first, b * block_size), hi = std::min(len, (b + 1) * block_size);
        const float* base = kp + (table[b] - b) * block_size * ks;  // + p * ks = position p
        int64_t p = lo;
        for (; p + 4 <= hi; p += 4) {
          for (int64_t kvh = h0; kvh < h1; ++kvh) {
            const float* k0 = base + p * ks + kvh * kh;
            for (int64_t g = 0; g < group; ++g) {
              const int64_t h = (kvh - h0) * group + g;
              dot4(qh + h * head_dim, k0, k0 + ks, k0 + 2 * ks, k0 + 3 * ks, head_dim, fscale,
                   scores.data() + h * n + (p - first));
            }
          }
        }
        for (; p < hi; ++p) {
          for (int64_t kvh = h0; kvh < h1; ++kvh) {
            const float* key = base + p * ks + kvh * kh;
            for (int64_t g = 0; g < group; ++g) {
              const int64_t h = (kvh - h0) * group + g;
              scores[h * n + (p - first)] = dot(qh + h * head_dim, key, head_dim) * fscale;
            }
          }
        }
      }
      // Softmax per query head.
      for (int64_t h = 0; h < heads; ++h) {
        float* s = scores.data() + h * n;
        float mx = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : mx)
        for (int64_t i = 0; i < n; ++i) mx = std::max(mx, s[i]);
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < n; ++i) {
          s[i] = exp_nonpositive(s[i] - mx);
          sum += s[i];
        }
        const float inv = 1.f / sum;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) s[i] *= inv;
      }
      // Weighted sum of values, four positions per pass (one load and store of the
      // accumulator per four values instead of per value).
      for (int64_t b = first / block_size; b * block_size < len; ++b) {
        const int64_t lo = std::max(first, b * block_size), hi = std::min(len, (b + 1) * block_size);
        const float* base = vp + (table[b] - b) * block_size * vs;
        int64_t p = lo;
        for (; p + 4 <= hi; p += 4) {
          for (int64_t kvh = h0; kvh < h1; ++kvh) {
            const float* v0 = base + p * vs + kvh * vh;
            for (int64_t g = 0; g < group; ++g) {
              const int64_t h = (kvh - h0) * group + g;
              axpy4(acc.data() + h * head_dim, v0, v0 + vs, v0 + 2 * vs, v0 + 3 * vs,
                    scores.data() + h * n + (p - first), head_dim);
            }
          }
        }
        for (; p < hi; ++p) {
          for (int64_t kvh = h0; kvh < h1; ++kvh) {
            const float* value = base + p * vs + kvh * vh;
            for (int64_t g = 0; g < group; ++g) {
              const int64_t h = (kvh - h0) * group + g;
              axpy(acc.data() + h * head_dim, value, scores[h * n + (p - first)], head_dim);
            }
          }
        }
      }
      std::copy(acc.begin(), acc.end(), oh);
    }
  });
}
