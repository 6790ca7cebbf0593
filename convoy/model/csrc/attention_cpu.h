// Pieces shared by convoy's CPU attention kernels (paged decode and paged prefill).

#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "vec.h"

namespace convoy {

// For NH query heads: y_h[0, W * width) += sum over the count positions p of w_h[p] * v_p[0,
// W * width), positions in order (the order the reference sums them in), the accumulators held
// in registers for the whole run of positions instead of loaded and stored per position. V is
// the vector type (vfw, or vf8 for an 8-float rest).
template <typename V, int W, int NH>
inline void add_weighted(float* const* y, const float* const* w, const float* v,
                         int64_t v_stride, int64_t count) {
  constexpr int width = sizeof(V) / sizeof(float);
  V acc[NH][W];
  for (int h = 0; h < NH; ++h)
    for (int i = 0; i < W; ++i) std::memcpy(&acc[h][i], y[h] + width * i, sizeof(V));
  for (int64_t p = 0; p < count; ++p) {
    V vv[W];
    for (int i = 0; i < W; ++i) {
      std::memcpy(&vv[i], v + p * v_stride + width * i, sizeof(V));
      keep_in_register(vv[i]);  // each value vector feeds NH FMAs
    }
    for (int h = 0; h < NH; ++h) {
      const V ws = V{} + w[h][p];
      for (int i = 0; i < W; ++i) acc[h][i] += ws * vv[i];
    }
  }
  for (int h = 0; h < NH; ++h)
    for (int i = 0; i < W; ++i) std::memcpy(y[h] + width * i, &acc[h][i], sizeof(V));
}

// Query heads whose value sums run together: their accumulators and a run of values fill the
// vector registers (4 heads x 4 vectors + 4 of 32 with AVX-512; 2 x 4 + 4 of AVX2's 16).
constexpr int kValueHeads = kLanes == 16 ? 4 : 2;

// add_weighted over a whole head: 4 vectors per pass, then one at a time, then (AVX-512) the
// last 8 floats.
template <int NH>
inline void add_weighted_head(float* const* y, const float* const* w, const float* v,
                              int64_t v_stride, int64_t count, int64_t head_dim) {
  constexpr int64_t lanes = kLanes;
  auto at = [&](int64_t d, auto run) {
    float* yd[NH];
    for (int h = 0; h < NH; ++h) yd[h] = y[h] + d;
    run(yd);
  };
  int64_t d = 0;
  for (; d + 4 * lanes <= head_dim; d += 4 * lanes)
    at(d, [&](float* const* yd) { add_weighted<vfw, 4, NH>(yd, w, v + d, v_stride, count); });
  for (; d + lanes <= head_dim; d += lanes)
    at(d, [&](float* const* yd) { add_weighted<vfw, 1, NH>(yd, w, v + d, v_stride, count); });
  for (; d < head_dim; d += 8)
    at(d, [&](float* const* yd) { add_weighted<vf8, 1, NH>(yd, w, v + d, v_stride, count); });
}

// add_weighted_head for nh rows, 1 <= nh <= kValueHeads, nh known at run time.
inline void add_weighted_rows(int nh, float* const* y, const float* const* w, const float* v,
                              int64_t v_stride, int64_t count, int64_t head_dim) {
  switch (nh) {
    case 4: return add_weighted_head<4>(y, w, v, v_stride, count, head_dim);
    case 3: return add_weighted_head<3>(y, w, v, v_stride, count, head_dim);
    case 2: return add_weighted_head<2>(y, w, v, v_stride, count, head_dim);
    default: return add_weighted_head<1>(y, w, v, v_stride, count, head_dim);
  }
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

// Softmax of s[0, n) in place, the plain way: max, exp of the differences, sum, scale.
inline void softmax_in_place(float* s, int64_t n) {
  float mx = -std::numeric_limits<float>::infinity();
  // A vector max: the scalar loop is one long chain of 3-cycle dependent maxes.
#pragma omp simd reduction(max : mx)
  for (int64_t i = 0; i < n; ++i) mx = s[i] > mx ? s[i] : mx;
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

// Runs work(item, scratch) for items [0, num_items) on torch's threads, handing them out one
// at a time, costliest first, to whichever thread is free: items differ by several times
// within a batch (contexts of 50 and 4000 tokens), and a static split leaves a thread waiting
// for the other (in a batch ordered by age, the oldest, longest sequences all land on the
// first thread). Each thread has its own scratch vector.
template <typename Cost, typename Work>
void run_costliest_first(int64_t num_items, Cost cost, Work work) {
  std::vector<int64_t> order(num_items);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return cost(a) > cost(b); });
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), num_items);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::vector<float> scratch;
    for (int64_t i = next++; i < num_items; i = next++) work(order[i], scratch);
  });
}

}  // namespace convoy
