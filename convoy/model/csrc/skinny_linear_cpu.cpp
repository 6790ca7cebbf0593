// y = x W^T (+ b) for a few rows of x, float32, on the CPU.
//
// With one to a few tokens in a step (single-stream decode), a linear layer is a
// matrix-vector product bound by reading W once from memory. A general GEMM library tuned for
// large matrices leaves much of the bandwidth unused here (it packs panels of W, and splits
// the work in ways that suit big M); this streams W's rows exactly once, four at a time,
// split over threads by output features, with every row of x held in cache meanwhile.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>

torch::Tensor skinny_linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "x must be (M, K) and w (N, K)");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && w.scalar_type() == torch::kFloat32,
              "float32 only");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "x and w must be contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K, "x and w disagree on in_features");
  const float* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == torch::kFloat32 && bias->is_contiguous() &&
                bias->numel() == N);
    bp = bias->data_ptr<float>();
  }
  auto out = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();

  constexpr int64_t R = 4;  // rows of W per pass: each element of x is loaded once per R rows
  at::parallel_for(0, (N + R - 1) / R, 16, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n0 = blk * R;
      if (n0 + R <= N) {
        const float* w0 = wp + n0 * K;
        const float* w1 = w0 + K;
        const float* w2 = w1 + K;
        const float* w3 = w2 + K;
        for (int64_t m = 0; m < M; ++m) {
          const float* xm = xp + m * K;
          float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
          for (int64_t k = 0; k < K; ++k) {
            const float xv = xm[k];
            a0 += xv * w0[k];
            a1 += xv * w1[k];
            a2 += xv * w2[k];
            a3 += xv * w3[k];
          }
          float* o = op + m * N + n0;
          o[0] = a0 + (bp ? bp[n0] : 0.f);
          o[1] = a1 + (bp ? bp[n0 + 1] : 0.f);
          o[2] = a2 + (bp ? bp[n0 + 2] : 0.f);
          o[3] = a3 + (bp ? bp[n0 + 3] : 0.f);
        }
      } else {
        for (int64_t n = n0; n < N; ++n) {
          const float* wn = wp + n * K;
          for (int64_t m = 0; m < M; ++m) {
            const float* xm = xp + m * K;
            float a = 0.f;
#pragma omp simd reduction(+ : a)
            for (int64_t k = 0; k < K; ++k) a += xm[k] * wn[k];
            op[m * N + n] = a + (bp ? bp[n] : 0.f);
          }
        }
      }
    }
  });
  return out;
}
