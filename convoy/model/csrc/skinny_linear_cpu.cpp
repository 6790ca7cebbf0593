// y = x W^T (+ b) for a few rows of x, float32, on the CPU; W float32, or int8 with one
// float scale per row (weight-only quantization: a quarter of the bytes to stream).
//
// With one to a few tokens in a step (single-stream decode), a linear layer is a
// matrix-vector product bound by reading W once from memory. A general GEMM library tuned for
// large matrices leaves much of the bandwidth unused here (it packs panels of W, and splits
// the work in ways that suit big M); this streams W's rows exactly once, four at a time,
// split over threads by output features, with every row of x held in cache meanwhile.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>

namespace {

// out (M, N) = x (M, K) W^T * scale (per row of W, if given) + bias (if given).
template <typename WT>
void skinny_rows(const float* xp, const WT* wp, const float* sp, const float* bp, float* op,
                 int64_t M, int64_t K, int64_t N) {
  constexpr int64_t R = 4;  // rows of W per pass: each element of x is loaded once per R rows
  auto finish = [&](int64_t n, float acc) {
    return acc * (sp ? sp[n] : 1.f) + (bp ? bp[n] : 0.f);
  };
  at::parallel_for(0, (N + R - 1) / R, 16, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n0 = blk * R;
      if (n0 + R <= N) {
        const WT* w0 = wp + n0 * K;
        const WT* w1 = w0 + K;
        const WT* w2 = w1 + K;
        const WT* w3 = w2 + K;
        for (int64_t m = 0; m < M; ++m) {
          const float* xm = xp + m * K;
          float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
          for (int64_t k = 0; k < K; ++k) {
            const float xv = xm[k];
            a0 += xv * static_cast<float>(w0[k]);
            a1 += xv * static_cast<float>(w1[k]);
            a2 += xv * static_cast<float>(w2[k]);
            a3 += xv * static_cast<float>(w3[k]);
          }
          float* o = op + m * N + n0;
          o[0] = finish(n0, a0);
          o[1] = finish(n0 + 1, a1);
          o[2] = finish(n0 + 2, a2);
          o[3] = finish(n0 + 3, a3);
        }
      } else {
        for (int64_t n = n0; n < N; ++n) {
          const WT* wn = wp + n * K;
          for (int64_t m = 0; m < M; ++m) {
            const float* xm = xp + m * K;
            float a = 0.f;
#pragma omp simd reduction(+ : a)
            for (int64_t k = 0; k < K; ++k) a += xm[k] * static_cast<float>(wn[k]);
            op[m * N + n] = finish(n, a);
          }
        }
      }
    }
  });
}

const float* checked_vector(const c10::optional<torch::Tensor>& v, int64_t n, const char* what) {
  if (!v.has_value()) return nullptr;
  TORCH_CHECK(v->scalar_type() == torch::kFloat32 && v->is_contiguous() && v->numel() == n, what,
              " must be a contiguous float32 vector of out_features");
  return v->data_ptr<float>();
}

}  // namespace

torch::Tensor skinny_linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "x must be (M, K) and w (N, K)");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && w.scalar_type() == torch::kFloat32,
              "float32 only");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "x and w must be contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K, "x and w disagree on in_features");
  auto out = torch::empty({M, N}, x.options());
  skinny_rows<float>(x.data_ptr<float>(), w.data_ptr<float>(), nullptr,
                     checked_vector(bias, N, "bias"), out.data_ptr<float>(), M, K, N);
  return out;
}

torch::Tensor skinny_linear_int8(torch::Tensor x, torch::Tensor qweight, torch::Tensor scale,
                                 c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && qweight.dim() == 2, "x must be (M, K) and qweight (N, K)");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && qweight.scalar_type() == torch::kInt8,
              "x float32, qweight int8");
  TORCH_CHECK(x.is_contiguous() && qweight.is_contiguous(), "x and qweight must be contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  TORCH_CHECK(qweight.size(1) == K, "x and qweight disagree on in_features");
  auto out = torch::empty({M, N}, x.options());
  skinny_rows<int8_t>(x.data_ptr<float>(), qweight.data_ptr<int8_t>(),
                      checked_vector(scale, N, "scale"), checked_vector(bias, N, "bias"),
                      out.data_ptr<float>(), M, K, N);
  return out;
}
