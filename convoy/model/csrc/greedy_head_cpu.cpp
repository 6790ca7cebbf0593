// Greedy tokens from a bfloat16 or int8 screen of the vocabulary projection (see greedy_head.py
// for the error bounds and why the result is the float32 argmax).
//
// Per row: pass 1 takes the highest lower bound lo = max_j (a_j - E_j) of the screened logits
// a_j with their error bounds E_j (Bf16Screen, Int8Screen); pass 2 computes
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

// quantize_rows_int8's values per row: the scale s_x, the bound's P and Q, and |x|.
constexpr int64_t kRowStats = 4;

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

// The two screens, as what pass 1 and 2 read for token j: its screened logit a_j and error
// bound E_j, eight tokens at a time (j a multiple of 8) or one.
//
// bfloat16: a_j from oneDNN's bfloat16 product, E_j = |x| row_bound_j + kAbsSlack.
struct Bf16Screen {
  const at::BFloat16* a;
  const float* row_bound;
  float xn;  // |x|, rounded up
  vf8 logits(int64_t j) const { return load8(a + j); }
  vf8 bounds(int64_t j) const { return splat8(xn) * load8(row_bound + j) + splat8(kAbsSlack); }
  float logit(int64_t j) const { return static_cast<float>(a[j]); }
  float bound(int64_t j) const { return xn * row_bound[j] + kAbsSlack; }
};

// int8: a_j = acc_j * (sx * sw_j) from the exact int32 product acc of the quantized row and
// head; E_j = P u_j + Q v_j + kAbsSlack with the row's P, Q (quantize_rows_int8) and the
// token's residual norm u_j = |w_j - sw_j qw_j| and norm v_j = |w_j| (greedy_head.py).
struct Int8Screen {
  const int32_t* acc;
  const float* w_scale;
  const float* u;
  const float* v;
  float sx, p, q;
  vf8 logits(int64_t j) const {
    vi8 a;
    std::memcpy(&a, acc + j, sizeof(a));
    return __builtin_convertvector(a, vf8) * (splat8(sx) * load8(w_scale + j));
  }
  vf8 bounds(int64_t j) const {
    return splat8(p) * load8(u + j) + splat8(q) * load8(v + j) + splat8(kAbsSlack);
  }
  float logit(int64_t j) const { return static_cast<float>(acc[j]) * (sx * w_scale[j]); }
  float bound(int64_t j) const { return p * u[j] + q * v[j] + kAbsSlack; }
};

// The token of one row, or -1 when the screen cannot settle it cheaply (a non-finite value, or
// more than max_candidates tokens within reach of the top): the caller computes that row in
// full.
template <class Screen>
int64_t screen_row(const Screen& s, const float* x, const float* w, int64_t V, int64_t C,
                   int64_t max_candidates) {
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
      const vf8 av = s.logits(j);
      const vf8 e = s.bounds(j);
      const vf8 lo = av - e, hi = av + e;
      lov = lo > lov ? lo : lov;
      hiv = hi > hiv ? hi : hiv;
      const vf8 z = av * 0.0f + e * 0.0f;  // NaN where a_j or E_j is NaN or infinite
      bad |= z != z;
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
    const float aj = s.logit(j), ej = s.bound(j);
    if (!std::isfinite(aj) || !std::isfinite(ej)) return -1;
    const float l = aj - ej;
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
      const vi8 reach = (s.logits(j) + s.bounds(j)) >= lov2;
      for (int k = 0; k < 8; ++k)
        if (reach[k] && !consider(j + k)) return -1;
    }
  }
  for (int64_t j = V8; j < V; ++j) {
    if (s.logit(j) + s.bound(j) >= lo && !consider(j)) return -1;
  }
  return best;
}

// |x| rounded up (the square root of a double is within half an ulp; float's is coarser).
double norm_up(const float* x, int64_t C) {
  double ss = 0.0;
  for (int64_t i = 0; i < C; ++i) ss += static_cast<double>(x[i]) * x[i];
  return std::sqrt(ss) * (1.0 + 0x1p-30);
}

float round_up(double v) {
  const float f = static_cast<float>(v);
  return static_cast<double>(f) >= v ? f : std::nextafter(f, INFINITY);
}

void check_rows(const torch::Tensor& x, const torch::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.stride(1) == 1,
              "x must be a float32 (rows, hidden) tensor with contiguous rows");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kFloat32 &&
                  weight.is_contiguous() && weight.size(1) == x.size(1),
              "weight must be a contiguous float32 (vocab, hidden) tensor");
}

void check_vector(const torch::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.is_contiguous() && t.numel() == n, name,
              " must be a contiguous float32 vector of the vocabulary's length");
}

}  // namespace

torch::Tensor screened_argmax(torch::Tensor approx, torch::Tensor x, torch::Tensor weight,
                              torch::Tensor row_bound, int64_t max_candidates) {
  check_rows(x, weight);
  const int64_t N = x.size(0), C = x.size(1), V = weight.size(0);
  TORCH_CHECK(approx.dim() == 2 && approx.scalar_type() == torch::kBFloat16 &&
                  approx.stride(1) == 1 && approx.size(0) == N && approx.size(1) == V,
              "approx must be a bfloat16 (rows, vocab) tensor with contiguous rows");
  check_vector(row_bound, V, "row_bound");
  auto out = torch::empty({N}, x.options().dtype(torch::kInt64));
  const at::BFloat16* ap = approx.data_ptr<at::BFloat16>();
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float* rbp = row_bound.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  const int64_t as = approx.stride(0), xs = x.stride(0);
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float* xr = xp + n * xs;
      const float xn = round_up(norm_up(xr, C));
      op[n] = std::isfinite(xn)
                  ? screen_row(Bf16Screen{ap + n * as, rbp, xn}, xr, wp, V, C, max_candidates)
                  : -1;
    }
  });
  return out;
}

std::tuple<torch::Tensor, torch::Tensor> quantize_rows_int8(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.stride(1) == 1,
              "x must be a float32 (rows, hidden) tensor with contiguous rows");
  const int64_t N = x.size(0), C = x.size(1);
  auto qx = torch::empty({N, C}, x.options().dtype(torch::kInt8));
  auto rows = torch::empty({N, kRowStats}, x.options());
  const float* xp = x.data_ptr<float>();
  int8_t* qp = qx.data_ptr<int8_t>();
  float* rp = rows.data_ptr<float>();
  const int64_t xs = x.stride(0);
  // gamma_C: float32 summation of C products (the float32 logit's own error); see
  // greedy_head.py for the rest of the bound.
  const double gamma = C * 0x1p-24 / (1.0 - C * 0x1p-24);
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float* xr = xp + n * xs;
      int8_t* q = qp + n * C;
      float* r = rp + kRowStats * n;
      float m = 0.0f;
      bool finite = true;
      for (int64_t i = 0; i < C; ++i) {
        finite &= std::isfinite(xr[i]);
        m = std::max(m, std::fabs(xr[i]));
      }
      if (!finite) {  // the row goes to the full projection
        std::memset(q, 0, C);
        r[0] = r[1] = r[2] = r[3] = NAN;
        continue;
      }
      float sx = m / 127.0f;
      if (!(sx > 0.0f)) sx = 1.0f;  // all zeros (or too small to scale): q = 0, residual = x
      double ss_x = 0.0, ss_q = 0.0, ss_r = 0.0;
      for (int64_t i = 0; i < C; ++i) {
        const float t = std::nearbyint(xr[i] / sx);
        const int qi = static_cast<int>(std::min(127.0f, std::max(-127.0f, t)));
        q[i] = static_cast<int8_t>(qi);
        const double res = static_cast<double>(xr[i]) - static_cast<double>(sx) * qi;
        ss_x += static_cast<double>(xr[i]) * xr[i];
        ss_q += static_cast<double>(qi) * qi;
        ss_r += res * res;
      }
      const double up = 1.0 + 0x1p-30;  // the double sums and square roots, rounded up
      const double X = std::sqrt(ss_x) * up, Xq = sx * std::sqrt(ss_q) * up,
                   R = std::sqrt(ss_r) * up;
      const double d = 0x1p-21, e = 1.0 + 0x1p-20;
      r[0] = sx;
      r[1] = round_up(Xq * (1.0 + d) * e);
      r[2] = round_up((R + gamma * X + d * Xq) * e);
      r[3] = static_cast<float>(X);
    }
  });
  return {qx, rows};
}

torch::Tensor screened_argmax_int8(torch::Tensor acc, torch::Tensor x, torch::Tensor weight,
                                   torch::Tensor w_scale, torch::Tensor u, torch::Tensor v,
                                   torch::Tensor rows, int64_t max_candidates) {
  check_rows(x, weight);
  const int64_t N = x.size(0), C = x.size(1), V = weight.size(0);
  TORCH_CHECK(acc.dim() == 2 && acc.scalar_type() == torch::kInt32 && acc.stride(1) == 1 &&
                  acc.size(0) == N && acc.size(1) == V,
              "acc must be an int32 (rows, vocab) tensor with contiguous rows");
  check_vector(w_scale, V, "w_scale");
  check_vector(u, V, "u");
  check_vector(v, V, "v");
  TORCH_CHECK(rows.scalar_type() == torch::kFloat32 && rows.is_contiguous() &&
                  rows.numel() == kRowStats * N,
              "rows must be quantize_rows_int8's (rows, 4) float32 tensor");
  auto out = torch::empty({N}, x.options().dtype(torch::kInt64));
  const int32_t* ap = acc.data_ptr<int32_t>();
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float *sp = w_scale.data_ptr<float>(), *up = u.data_ptr<float>(),
              *vp = v.data_ptr<float>(), *rp = rows.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  const int64_t as = acc.stride(0), xs = x.stride(0);
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float* r = rp + kRowStats * n;
      op[n] = std::isfinite(r[0]) ? screen_row(Int8Screen{ap + n * as, sp, up, vp, r[0], r[1], r[2]},
                                               xp + n * xs, wp, V, C, max_candidates)
                                  : -1;
    }
  });
  return out;
}
