// Greedy tokens from a bfloat16 screen of the vocabulary projection (see greedy_head.py for the
// error bound and why the result is the float32 argmax).
//
// Per row: pass 1 takes the highest lower bound lo = max_j (a_j - E_j) of the screened logits
// a_j (bfloat16) with their error bounds E_j = |x| * row_bound_j + kAbsSlack; pass 2 computes
// the float32 logit x . w_j of every token whose upper bound a_j + E_j reaches lo (the true
// argmax is always one of them), visiting only the blocks of tokens whose highest upper bound
// does, and keeps the first maximum, as torch.argmax does.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "vec.h"

namespace {

using convoy::load8;
using convoy::splat8;
using convoy::vf8;
using vi8 = int32_t __attribute__((vector_size(32)));

// Covers the errors no relative bound does: bfloat16 and its dot-product instructions flush
// values below 2^-126 to zero (one such term is under 2^-126 |w_i|), far below this.
constexpr float kAbsSlack = 0x1p-100f;

// Tokens per block of pass 1's per-block maximum (a multiple of 8).
constexpr int64_t kBlock = 128;

// Eight bfloat16 values as floats (exact: a bfloat16 is a float's upper 16 bits).
inline vf8 load8(const at::BFloat16* p) {
  using vu16 = uint16_t __attribute__((vector_size(16)));
  using vu32 = uint32_t __attribute__((vector_size(32)));
  vu16 h;
  std::memcpy(&h, p, sizeof(h));
  const vu32 w = __builtin_convertvector(h, vu32) << 16;
  vf8 f;
  std::memcpy(&f, &w, sizeof(f));
  return f;
}

float dot(const float* x, const float* w, int64_t C) {
  vf8 acc[4] = {};
  int64_t i = 0;
  for (; i + 32 <= C; i += 32)
    for (int k = 0; k < 4; ++k) acc[k] += load8(x + i + 8 * k) * load8(w + i + 8 * k);
  for (; i + 8 <= C; i += 8) acc[0] += load8(x + i) * load8(w + i);
  const vf8 s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  float r = 0.0f;
  for (int k = 0; k < 8; ++k) r += s[k];
  for (; i < C; ++i) r += x[i] * w[i];
  return r;
}

// The token of one row, or -1 when the screen cannot settle it cheaply (a non-finite value, or
// more than max_candidates tokens within reach of the top): the caller computes that row in
// full.
int64_t screen_row(const at::BFloat16* a, const float* x, const float* w, const float* rb,
                   int64_t V, int64_t C, int64_t max_candidates) {
  double ss = 0.0;
  for (int64_t i = 0; i < C; ++i) ss += static_cast<double>(x[i]) * x[i];
  // |x|, rounded up (the square root of a double is within half an ulp; float's is coarser).
  const float xn = static_cast<float>(std::sqrt(ss) * (1.0 + 0x1p-40));
  if (!std::isfinite(xn)) return -1;
  const vf8 xv = splat8(xn), slack = splat8(kAbsSlack);
  const int64_t V8 = V - V % 8;

  // Pass 1: the highest lower bound, whether any screened logit is NaN or infinite, and each
  // block's highest upper bound, so that pass 2 skips the blocks that cannot reach the top.
  thread_local std::vector<float> block_hi;
  const int64_t nblocks = (V8 + kBlock - 1) / kBlock;
  block_hi.resize(nblocks);
  vf8 lov = splat8(-INFINITY);
  vi8 bad = {};
  for (int64_t b = 0; b < nblocks; ++b) {
    vf8 hiv = splat8(-INFINITY);
    for (int64_t j = b * kBlock; j < std::min(V8, (b + 1) * kBlock); j += 8) {
      const vf8 av = load8(a + j);
      const vf8 e = xv * load8(rb + j) + slack;
      const vf8 lo = av - e, hi = av + e;
      lov = lo > lov ? lo : lov;
      hiv = hi > hiv ? hi : hiv;
      bad |= (av - av) != (av - av);  // NaN - NaN and inf - inf are NaN, never equal
    }
    float h = -INFINITY;
    for (int k = 0; k < 8; ++k) h = hiv[k] > h ? hiv[k] : h;
    block_hi[b] = h;
  }
  float lo = -INFINITY;
  for (int k = 0; k < 8; ++k) {
    if (bad[k]) return -1;
    lo = lov[k] > lo ? lov[k] : lo;
  }
  for (int64_t j = V8; j < V; ++j) {
    const float aj = static_cast<float>(a[j]);
    if (!std::isfinite(aj)) return -1;
    const float l = aj - (xn * rb[j] + kAbsSlack);
    lo = l > lo ? l : lo;
  }

  // Pass 2 (the row is in cache): float32 logits of the tokens that can still win.
  const vf8 lov2 = splat8(lo);
  int64_t best = -1, count = 0;
  float best_logit = -INFINITY;
  auto consider = [&](int64_t j) {
    const float y = dot(x, w + j * C, C);
    if (best < 0 || y > best_logit) {  // the first of equal maxima, as torch.argmax
      best = j;
      best_logit = y;
    }
    return ++count <= max_candidates;
  };
  for (int64_t b = 0; b < nblocks; ++b) {
    if (!(block_hi[b] >= lo)) continue;  // the same sums as pass 1's: none of its tokens reach
    for (int64_t j = b * kBlock; j < std::min(V8, (b + 1) * kBlock); j += 8) {
      const vi8 reach = (load8(a + j) + (xv * load8(rb + j) + slack)) >= lov2;
      for (int k = 0; k < 8; ++k)
        if (reach[k] && !consider(j + k)) return -1;
    }
  }
  for (int64_t j = V8; j < V; ++j) {
    const float aj = static_cast<float>(a[j]);
    if (aj + (xn * rb[j] + kAbsSlack) >= lo && !consider(j)) return -1;
  }
  return best;
}

}  // namespace

torch::Tensor screened_argmax(torch::Tensor approx, torch::Tensor x, torch::Tensor weight,
                              torch::Tensor row_bound, int64_t max_candidates) {
  TORCH_CHECK(approx.dim() == 2 && approx.scalar_type() == torch::kBFloat16 &&
                  approx.stride(1) == 1,
              "approx must be a bfloat16 (rows, vocab) tensor with contiguous rows");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.stride(1) == 1,
              "x must be a float32 (rows, hidden) tensor with contiguous rows");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kFloat32 &&
                  weight.is_contiguous(),
              "weight must be a contiguous float32 (vocab, hidden) tensor");
  const int64_t N = x.size(0), C = x.size(1), V = weight.size(0);
  TORCH_CHECK(weight.size(1) == C && approx.size(0) == N && approx.size(1) == V,
              "approx (rows, vocab), x (rows, hidden) and weight (vocab, hidden) disagree");
  TORCH_CHECK(row_bound.scalar_type() == torch::kFloat32 && row_bound.is_contiguous() &&
                  row_bound.numel() == V,
              "row_bound must be a contiguous float32 vector of the vocabulary's length");
  auto out = torch::empty({N}, x.options().dtype(torch::kInt64));
  const at::BFloat16* ap = approx.data_ptr<at::BFloat16>();
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float* rbp = row_bound.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  const int64_t as = approx.stride(0), xs = x.stride(0);
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      op[n] = screen_row(ap + n * as, xp + n * xs, wp, rbp, V, C, max_candidates);
  });
  return out;
}
