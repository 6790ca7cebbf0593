// The elementwise parts of a decoder layer, each fused into one pass over memory, float32, CPU:
// RMSNorm (with the residual add before it), SiLU(gate) * up, and rotary embeddings in place.
//
// Written as torch ops, each of these is several passes: RMSNorm squares, averages, scales
// and multiplies by the weight into a new tensor every time (four passes, plus the residual
// add), the rotary embedding builds rotate_half with a cat and a negation, and the MLP's
// activation reads a strided half of the gate/up product and writes it again to multiply by
// the other half. On a long prefill chunk these passes cost a noticeable fraction of the time
// the matrix products do; fused, each element is read once and written once.
//
// The arithmetic is the models' own, in the same order (RMSNorm: x * rsqrt(mean(x^2) + eps),
// then times the weight); only the order of the sum of squares and the exp used by SiLU (a
// polynomial within a few ulp of torch's exp) differ, which moves the last bits.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>

#include "vec.h"

namespace {

using convoy::load8;
using convoy::splat8;
using convoy::store8;
using convoy::vf8;
using vi8 = int32_t __attribute__((vector_size(32)));

// Rows handed to one thread at a time: enough elements that a thread's start-up is noise.
int64_t grain_rows(int64_t row_elems) { return std::max<int64_t>(1, 16384 / row_elems); }

// e^x for eight floats: x = n ln2 + r with |r| <= ln2/2, e^r by a degree-6 polynomial (the
// Cephes coefficients), 2^n put straight into the exponent bits. Inputs are clamped to the
// range where e^x is a normal float; below it the result is 0 or a tiny normal, which is all
// SiLU needs (x / (1 + e^-x) for x large).
inline vf8 exp8(vf8 x) {
  x = x < splat8(88.3762626647949f) ? x : splat8(88.3762626647949f);
  x = x > splat8(-87.3365447504f) ? x : splat8(-87.3365447504f);
  // Round x / ln2 to the nearest integer: adding and subtracting 1.5 * 2^23 leaves no
  // fraction bits (round to nearest even, the default rounding mode).
  const vf8 magic = splat8(12582912.f);
  const vf8 n = (x * splat8(1.44269504088896341f) + magic) - magic;
  vf8 r = x - n * splat8(0.693359375f);
  r = r - n * splat8(-2.12194440e-4f);
  vf8 p = splat8(1.9875691500e-4f);
  p = p * r + splat8(1.3981999507e-3f);
  p = p * r + splat8(8.3334519073e-3f);
  p = p * r + splat8(4.1665795894e-2f);
  p = p * r + splat8(1.6666665459e-1f);
  p = p * r + splat8(5.0000001201e-1f);
  p = p * (r * r) + r + splat8(1.f);
  const vi8 bits = (__builtin_convertvector(n, vi8) + 127) << 23;  // 2^n
  vf8 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// out = x * rsqrt(mean(x^2) + eps) * weight for one row of C floats.
inline void rms_norm_row(float* out, const float* x, const float* w, int64_t C, float eps) {
  const int64_t C8 = C - C % 8;
  vf8 acc = {};
  for (int64_t i = 0; i < C8; i += 8) {
    const vf8 v = load8(x + i);
    acc += v * v;
  }
  float ss = 0.f;
  for (int i = 0; i < 8; ++i) ss += acc[i];
  for (int64_t i = C8; i < C; ++i) ss += x[i] * x[i];
  const float r = 1.f / std::sqrt(ss / static_cast<float>(C) + eps);
  const vf8 rv = splat8(r);
  for (int64_t i = 0; i < C8; i += 8) store8(out + i, load8(x + i) * rv * load8(w + i));
  for (int64_t i = C8; i < C; ++i) out[i] = x[i] * r * w[i];
}

void check_rows(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.dim() == 2 && t.scalar_type() == torch::kFloat32 && t.stride(1) == 1, what,
              " must be a float32 (rows, features) tensor with contiguous rows");
}

void check_weight(const torch::Tensor& w, int64_t C) {
  TORCH_CHECK(w.scalar_type() == torch::kFloat32 && w.is_contiguous() && w.numel() == C,
              "weight must be a contiguous float32 vector of the row length");
}

}  // namespace

// RMSNorm of each row of x, into a new tensor.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  check_rows(x, "x");
  const int64_t N = x.size(0), C = x.size(1);
  check_weight(weight, C);
  auto out = torch::empty({N, C}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t xs = x.stride(0);
  at::parallel_for(0, N, grain_rows(C), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      rms_norm_row(op + n * C, xp + n * xs, wp, C, static_cast<float>(eps));
  });
  return out;
}

// In place: residual += x, then x = RMSNorm(residual). The decoder's "add the sublayer's
// output to the residual stream, normalize for the next sublayer" in one pass.
void fused_add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor weight,
                        double eps) {
  check_rows(x, "x");
  check_rows(residual, "residual");
  TORCH_CHECK(x.sizes() == residual.sizes(), "x and residual must have the same shape");
  const int64_t N = x.size(0), C = x.size(1);
  check_weight(weight, C);
  float* xp = x.data_ptr<float>();
  float* rp = residual.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const int64_t xs = x.stride(0), rs = residual.stride(0);
  at::parallel_for(0, N, grain_rows(C), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      float* xr = xp + n * xs;
      float* rr = rp + n * rs;
      for (int64_t i = 0; i < C; ++i) rr[i] += xr[i];
      rms_norm_row(xr, rr, wp, C, static_cast<float>(eps));
    }
  });
}

// (N, 2I) gate|up -> (N, I) silu(gate) * up, silu(g) = g / (1 + e^-g).
torch::Tensor silu_and_mul(torch::Tensor gate_up) {
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up must have an even number of features");
  const int64_t N = gate_up.size(0), I = gate_up.size(1) / 2, I8 = I - I % 8;
  auto out = torch::empty({N, I}, gate_up.options());
  const float* gp = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t gs = gate_up.stride(0);
  at::parallel_for(0, N, grain_rows(I), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float* g = gp + n * gs;
      const float* u = g + I;
      float* o = op + n * I;
      for (int64_t i = 0; i < I8; i += 8) {
        const vf8 gv = load8(g + i);
        store8(o + i, gv / (splat8(1.f) + exp8(-gv)) * load8(u + i));
      }
      for (int64_t i = I8; i < I; ++i) o[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
    }
  });
  return out;
}

// In place, for q (T, H, D) and k (T, Hkv, D) with contiguous heads: x * cos + rotate_half(x)
// * sin at each token's position, rotate_half(x) = (-x[D/2:], x[:D/2]); cos and sin are the
// (positions, D) tables.
void rotary_embedding(torch::Tensor positions, torch::Tensor q, torch::Tensor k, torch::Tensor cos,
                      torch::Tensor sin) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.size(0) == k.size(0) && q.size(2) == k.size(2),
              "q must be (T, H, D) and k (T, Hkv, D)");
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && k.scalar_type() == torch::kFloat32 &&
                  q.stride(2) == 1 && k.stride(2) == 1,
              "q and k must be float32 with contiguous heads");
  const int64_t T = q.size(0), D = q.size(2), half = D / 2;
  TORCH_CHECK(D % 2 == 0, "head_dim must be even");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.scalar_type() == torch::kFloat32 &&
                  sin.scalar_type() == torch::kFloat32 && cos.dim() == 2 && cos.size(1) == D &&
                  sin.sizes() == cos.sizes(),
              "cos and sin must be contiguous float32 (positions, head_dim) tables");
  TORCH_CHECK(positions.scalar_type() == torch::kInt64 && positions.is_contiguous() &&
                  positions.numel() == T,
              "positions must be a contiguous int64 vector, one per token");
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t P = cos.size(0);
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(pos[t] >= 0 && pos[t] < P, "position ", pos[t], " is outside the rotary table");
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  auto rotate = [&](float* x, int64_t heads, int64_t token_stride, int64_t head_stride,
                    int64_t t) {
    const float* c = cp + pos[t] * D;
    const float* s = sp + pos[t] * D;
    for (int64_t h = 0; h < heads; ++h) {
      float* xh = x + t * token_stride + h * head_stride;
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = xh[i], x2 = xh[i + half];
        xh[i] = x1 * c[i] + -x2 * s[i];
        xh[i + half] = x2 * c[i + half] + x1 * s[i + half];
      }
    }
  };
  float* qp = q.data_ptr<float>();
  float* kp = k.data_ptr<float>();
  const int64_t H = q.size(1), Hkv = k.size(1);
  at::parallel_for(0, T, grain_rows((H + Hkv) * D), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      rotate(qp, H, q.stride(0), q.stride(1), t);
      rotate(kp, Hkv, k.stride(0), k.stride(1), t);
    }
  });
}

// The index of each row's largest value, as torch.argmax: the first one on ties, and the first
// NaN where a row has any (NaN counts as the largest). torch's CPU argmax walks a row one
// element at a time, a visible share of a small model's decode step; this is vectorized.
torch::Tensor argmax_rows(torch::Tensor x) {
  check_rows(x, "x");
  const int64_t N = x.size(0), V = x.size(1), V8 = V - V % 8;
  TORCH_CHECK(V > 0, "x must have at least one column");
  auto out = torch::empty({N}, x.options().dtype(torch::kInt64));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  const int64_t xs = x.stride(0);
  at::parallel_for(0, N, grain_rows(V), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float* row = xp + n * xs;
      // Pass 1: the maximum (comparisons with NaN are false, so NaN never wins here) and
      // whether a NaN occurs at all.
      vf8 mv = splat8(-INFINITY);
      vi8 nan = {};
      for (int64_t i = 0; i < V8; i += 8) {
        const vf8 v = load8(row + i);
        mv = v > mv ? v : mv;
        nan |= v != v;
      }
      float m = -INFINITY;
      bool has_nan = false;
      for (int i = 0; i < 8; ++i) {
        m = mv[i] > m ? mv[i] : m;
        has_nan |= nan[i] != 0;
      }
      for (int64_t i = V8; i < V; ++i) {
        m = row[i] > m ? row[i] : m;
        has_nan |= std::isnan(row[i]);
      }
      // Pass 2 (the row is in cache now): the first index holding it.
      int64_t idx = 0;
      for (int64_t i = 0; i < V; ++i) {
        if (has_nan ? std::isnan(row[i]) : row[i] == m) {
          idx = i;
          break;
        }
      }
      op[n] = idx;
    }
  });
  return out;
}
