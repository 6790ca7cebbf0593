// y = x W^T (+ b) for a few rows of x, float32, on the CPU; W float32, or int8 with one
// float scale per row (weight-only quantization: a quarter of the bytes to stream).
//
// With one to a few tokens in a step (single-stream decode), a linear layer is a
// matrix-vector product bound by reading W once from memory. A general GEMM library tuned for
// large matrices leaves much of the bandwidth unused here (it packs panels of W, and splits
// the work in ways that suit big M); this streams W's rows exactly once, eight at a time,
// split over threads by output features, with every row of x held in cache meanwhile.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>

#include "vec.h"

namespace {

using convoy::load8;
using convoy::vf8;

// Blocks of R rows of W between the one being read and the one being prefetched.
constexpr int64_t kPrefetchBlocks = 4;

// out (M, N) = x (M, K) W^T * scale (per row of W, if given) + bias (if given).
template <typename WT>
void skinny_rows(const float* xp, const WT* wp, const float* sp, const float* bp, float* op,
                 int64_t M, int64_t K, int64_t N) {
  constexpr int64_t R = 8;  // rows of W per pass: each element of x is loaded once per R rows
  // A pass reads its R rows as R interleaved streams, which the hardware prefetcher follows
  // poorly when rows are short (K = 384: 1.5 KB each, well below a plain read's bandwidth).
  // The R rows kPrefetchBlocks blocks ahead are one contiguous range, so each step of 8
  // columns also prefetches the next R * 8 weights of that range: it arrives in order, a block
  // per block read. This matters most for small models' short rows.
  constexpr int64_t kStepBytes = R * 8 * sizeof(WT);
  const char* wbytes = reinterpret_cast<const char*>(wp);
  const int64_t total_bytes = N * K * static_cast<int64_t>(sizeof(WT));
  const int64_t K8 = K - K % 8;
  at::parallel_for(0, (N + R - 1) / R, 8, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n0 = blk * R, rows = std::min(R, N - n0);
      const WT* w[R];  // past N, the last row again (its sums are not stored)
      for (int64_t r = 0; r < R; ++r) w[r] = wp + std::min(n0 + r, N - 1) * K;
      const int64_t ahead = (n0 + kPrefetchBlocks * R) * K * static_cast<int64_t>(sizeof(WT));
      for (int64_t m = 0; m < M; ++m) {
        const float* xm = xp + m * K;
        vf8 acc[R] = {};
        for (int64_t k = 0; k < K8; k += 8) {
          if (m == 0) {  // later rows of x find this block's weights in cache
            const int64_t at = ahead + k * R * static_cast<int64_t>(sizeof(WT));
            for (int64_t b = 0; b < kStepBytes; b += 64)
              if (at + b < total_bytes) convoy::prefetch_line(wbytes + at + b);
          }
          const vf8 xv = load8(xm + k);
          for (int64_t r = 0; r < R; ++r) acc[r] += xv * load8(w[r] + k);
        }
        vf8 sums = convoy::reduce8(acc);  // lane r: row n0 + r
        for (int64_t k = K8; k < K; ++k)
          for (int64_t r = 0; r < R; ++r) sums[r] += xm[k] * static_cast<float>(w[r][k]);
        float* o = op + m * N + n0;
        for (int64_t r = 0; r < rows; ++r)
          o[r] = sums[r] * (sp ? sp[n0 + r] : 1.f) + (bp ? bp[n0 + r] : 0.f);
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
