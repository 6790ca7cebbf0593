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
#include <cmath>
#include <cstring>

#include "vec.h"

#if defined(__FMA__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

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

// ---------------------------------------------------------------------------------------------
// y = x W^T + b in oneDNN's summation order, for batch-invariant decoding.
//
// A row's result must not depend on how many rows share the step. oneDNN on a packed weight
// computes each output (for more than one row) as a sequential chain of fused multiply-adds
// over k within consecutive blocks of k_block inputs (a size its heuristics pick from K;
// batch_invariant.py finds it), adds the blocks' partial sums in order, then the bias. These
// kernels compute exactly that, so that a few rows can take them and more rows oneDNN with
// bitwise the same results. Each vector lane holds one output's chain, and any number of
// rows gives every row the same result.
//
// Two layouts of W. Plain (N, K): a tile of kLanes rows by kLanes inputs is loaded (W
// streamed once) and transposed in registers, which gives the column W[n0 : n0 + kLanes, k]
// for each k of the tile; the shuffles bound it. Blocks (ordered_weight_blocks): W's rows in
// tiles of kLanes, each tile stored input by input, (ceil(N / kLanes), K, kLanes), so that
// the column is one contiguous load: a copy of the weight made once, and about twice as fast
// again as the plain layout's kernel where W is in cache.

namespace {

using convoy::kLanes;
using convoy::loadw;
using convoy::storew;
using convoy::vfw;

// a * b + c rounded once. Explicit: the compiler's contraction of `acc += x * w` depends on
// the -ffp-contract default, and the order here is the whole point.
inline vfw fmadd(vfw a, vfw b, vfw c) {
#if defined(__AVX512F__)
  return (vfw)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__FMA__)
  return (vfw)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  vfw r;
  for (int i = 0; i < kLanes; ++i) r[i] = std::fma(a[i], b[i], c[i]);
  return r;
#endif
}

// x in every lane (convoy::splatw adds x to a zero vector, which is not free without
// -ffast-math: it is an add that turns -0 into +0).
inline vfw broadcast(float x) {
#if defined(__AVX512F__)
  return (vfw)_mm512_set1_ps(x);
#elif defined(__AVX__)
  return (vfw)_mm256_set1_ps(x);
#else
  return vfw{x, x, x, x, x, x, x, x};
#endif
}

// In place: t[i][j] becomes t[j][i]. Stage b swaps the off-diagonal b x b blocks of every
// 2b x 2b block (bit b of the row index trades places with bit b of the column index).
inline void transpose(vfw (&t)[kLanes]) {
#if defined(__AVX512F__)
  for (int i = 0; i < 16; i += 2) {
    const vfw a = t[i], c = t[i + 1];
    t[i] = __builtin_shufflevector(a, c, 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14,
                                   30);
    t[i + 1] = __builtin_shufflevector(a, c, 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29,
                                       15, 31);
  }
  for (int i = 0; i < 16; ++i) {
    if (i & 2) continue;  // i = 0, 1, 4, 5, 8, 9, 12, 13
    const vfw a = t[i], c = t[i + 2];
    t[i] = __builtin_shufflevector(a, c, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28,
                                   29);
    t[i + 2] = __builtin_shufflevector(a, c, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15,
                                       30, 31);
  }
  for (int i = 0; i < 16; ++i) {
    if (i & 4) continue;  // i = 0..3, 8..11
    const vfw a = t[i], c = t[i + 4];
    t[i] = __builtin_shufflevector(a, c, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26,
                                   27);
    t[i + 4] = __builtin_shufflevector(a, c, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29,
                                       30, 31);
  }
  for (int i = 0; i < 8; ++i) {
    const vfw a = t[i], c = t[i + 8];
    t[i] = __builtin_shufflevector(a, c, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
    t[i + 8] = __builtin_shufflevector(a, c, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28,
                                       29, 30, 31);
  }
#else
  for (int i = 0; i < 8; i += 2) {
    const vfw a = t[i], c = t[i + 1];
    t[i] = __builtin_shufflevector(a, c, 0, 8, 2, 10, 4, 12, 6, 14);
    t[i + 1] = __builtin_shufflevector(a, c, 1, 9, 3, 11, 5, 13, 7, 15);
  }
  for (int i = 0; i < 8; ++i) {
    if (i & 2) continue;  // i = 0, 1, 4, 5
    const vfw a = t[i], c = t[i + 2];
    t[i] = __builtin_shufflevector(a, c, 0, 1, 8, 9, 4, 5, 12, 13);
    t[i + 2] = __builtin_shufflevector(a, c, 2, 3, 10, 11, 6, 7, 14, 15);
  }
  for (int i = 0; i < 4; ++i) {
    const vfw a = t[i], c = t[i + 4];
    t[i] = __builtin_shufflevector(a, c, 0, 1, 2, 3, 8, 9, 10, 11);
    t[i + 4] = __builtin_shufflevector(a, c, 4, 5, 6, 7, 12, 13, 14, 15);
  }
#endif
}

// Rows of W in passes of NB tiles of kLanes rows (pointers w[b][r]; past N, the last row
// again) for MB rows of x: lane r of sums[m][b] is row m's sum for output row w[b][r], before
// the bias. Several tiles per pass give the FMA chains of one row of x independent company
// (a chain is one FMA per input, each waiting for the last). prefetch(k) runs once per
// kLanes inputs.
template <int MB, int NB, typename Prefetch>
void ordered_pass(const float* const (&w)[NB][kLanes], const float* x, int64_t K,
                  int64_t k_block, const Prefetch& prefetch, vfw (&sums)[MB][NB]) {
  for (int64_t lo = 0; lo < K; lo += k_block) {
    const int64_t hi = std::min(K, lo + k_block);
    vfw acc[MB][NB] = {};
    int64_t k = lo;
    for (; k + kLanes <= hi; k += kLanes) {
      prefetch(k);
#pragma GCC unroll 2
      for (int b = 0; b < NB; ++b) {
        vfw t[kLanes];
        for (int r = 0; r < kLanes; ++r) t[r] = loadw(w[b][r] + k);
        transpose(t);  // t[j]: the tile's column of input k + j
#pragma GCC unroll 16
        for (int j = 0; j < kLanes; ++j)
#pragma GCC unroll 4
          for (int m = 0; m < MB; ++m)
            acc[m][b] = fmadd(broadcast(x[m * K + k + j]), t[j], acc[m][b]);
      }
    }
    if (k < hi) {  // the block's last rem < kLanes inputs
      const int64_t rem = hi - k;
      for (int b = 0; b < NB; ++b) {
        vfw t[kLanes];
        for (int r = 0; r < kLanes; ++r) {
          float part[kLanes] = {};
          std::memcpy(part, w[b][r] + k, rem * sizeof(float));
          t[r] = loadw(part);
        }
        transpose(t);
        for (int64_t j = 0; j < rem; ++j)
          for (int m = 0; m < MB; ++m)
            acc[m][b] = fmadd(broadcast(x[m * K + k + j]), t[j], acc[m][b]);
      }
    }
    for (int m = 0; m < MB; ++m)
      for (int b = 0; b < NB; ++b) sums[m][b] = lo == 0 ? acc[m][b] : sums[m][b] + acc[m][b];
  }
}

struct OrderedProblem {
  const float* x;
  const float* w;
  const float* bias;  // or nullptr
  float* out;
  int64_t M, K, N, k_block;
};

// The sums of MB rows x NB tiles (outputs n0 on) plus the bias, into out; outputs past N are
// dropped. Without a bias the sums are stored as they are (adding a zero would turn -0 into +0).
template <int MB, int NB>
void store_outputs(const OrderedProblem& p, const vfw (&sums)[MB][NB], int64_t n0, int64_t m0) {
  for (int b = 0; b < NB; ++b) {
    const int64_t nb = n0 + b * kLanes, rows = std::min<int64_t>(kLanes, p.N - nb);
    if (rows <= 0) break;
    vfw bias = vfw{};
    if (p.bias) {
      float part[kLanes] = {};
      std::memcpy(part, p.bias + nb, rows * sizeof(float));
      bias = loadw(part);
    }
    for (int m = 0; m < MB; ++m) {
      const vfw s = p.bias ? sums[m][b] + bias : sums[m][b];
      float* o = p.out + (m0 + m) * p.N + nb;
      if (rows == kLanes) {
        storew(o, s);
      } else {
        float part[kLanes];
        storew(part, s);
        std::memcpy(o, part, rows * sizeof(float));
      }
    }
  }
}

// Outputs n0 .. n0 + NB * kLanes - 1 (those below N) for rows m0 .. m0 + MB - 1 of x.
template <int MB, int NB>
void ordered_outputs(const OrderedProblem& p, int64_t n0, int64_t m0, bool prefetch) {
  const float* w[NB][kLanes];
  for (int b = 0; b < NB; ++b)
    for (int r = 0; r < kLanes; ++r)
      w[b][r] = p.w + std::min<int64_t>(n0 + b * kLanes + r, p.N - 1) * p.K;
  // As in skinny_rows: while reading these rows, prefetch the same number of rows
  // kPrefetchBlocks * 8 rows ahead, one contiguous range, in step with the reading.
  const char* wbytes = reinterpret_cast<const char*>(p.w);
  const int64_t row_bytes = p.K * static_cast<int64_t>(sizeof(float));
  const int64_t total_bytes = p.N * row_bytes;
  const int64_t ahead = (n0 + kPrefetchBlocks * 8) * row_bytes;
  constexpr int64_t kStepBytes = NB * kLanes * kLanes * sizeof(float);
  auto fetch = [&](int64_t k) {
    if (!prefetch) return;
    const int64_t at = ahead + k * NB * kLanes * static_cast<int64_t>(sizeof(float));
    for (int64_t b = 0; b < kStepBytes; b += 64)
      if (at + b < total_bytes) convoy::prefetch_line(wbytes + at + b);
  };
  vfw sums[MB][NB];
  ordered_pass<MB, NB>(w, p.x + m0 * p.K, p.K, p.k_block, fetch, sums);
  store_outputs<MB, NB>(p, sums, n0, m0);
}

// Rows m0 .. m0 + min(4, M - m0) - 1 of x; NB tiles per pass for one or two rows.
template <int NB>
void ordered_row_group(const OrderedProblem& p, int64_t n0, int64_t m0, bool prefetch) {
  switch (std::min<int64_t>(4, p.M - m0)) {
    case 1:
      return ordered_outputs<1, NB>(p, n0, m0, prefetch);
    case 2:
      return ordered_outputs<2, NB>(p, n0, m0, prefetch);
    case 3:  // three or four rows already keep the FMA units busy with one tile
      ordered_outputs<3, 1>(p, n0, m0, prefetch);
      if (NB == 2) ordered_outputs<3, 1>(p, n0 + kLanes, m0, prefetch);
      return;
    default:
      ordered_outputs<4, 1>(p, n0, m0, prefetch);
      if (NB == 2) ordered_outputs<4, 1>(p, n0 + kLanes, m0, prefetch);
      return;
  }
}

}  // namespace

torch::Tensor skinny_linear_ordered(torch::Tensor x, torch::Tensor w,
                                    c10::optional<torch::Tensor> bias, int64_t k_block) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "x must be (M, K) and w (N, K)");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && w.scalar_type() == torch::kFloat32,
              "float32 only");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "x and w must be contiguous");
  TORCH_CHECK(k_block > 0, "k_block must be positive");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K, "x and w disagree on in_features");
  auto out = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  const OrderedProblem p{x.data_ptr<float>(), w.data_ptr<float>(),
                         checked_vector(bias, N, "bias"), out.data_ptr<float>(), M, K, N,
                         k_block};
  // Split by tiles of kLanes output rows; each thread takes its tiles two at a time.
  at::parallel_for(0, (N + kLanes - 1) / kLanes, 4, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; tile += 2) {
      const int64_t n0 = tile * kLanes;
      // Rows of x four at a time; later groups find these rows of W in cache.
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        if (tile + 1 < end)
          ordered_row_group<2>(p, n0, m0, m0 == 0);
        else
          ordered_row_group<1>(p, n0, m0, m0 == 0);
      }
    }
  });
  return out;
}

namespace {

// Tiles t0 .. t0 + NB - 1 of blocks wb (K x kLanes each) for rows m0 .. m0 + MB - 1.
template <int MB, int NB>
void ordered_block_outputs(const OrderedProblem& p, int64_t t0, int64_t m0) {
  const float* wb = p.w + t0 * p.K * kLanes;
  const float* x = p.x + m0 * p.K;
  vfw sums[MB][NB];
  for (int64_t lo = 0; lo < p.K; lo += p.k_block) {
    const int64_t hi = std::min(p.K, lo + p.k_block);
    vfw acc[MB][NB] = {};
    for (int64_t k = lo; k < hi; ++k) {
      vfw xk[MB];
      for (int m = 0; m < MB; ++m) xk[m] = broadcast(x[m * p.K + k]);
#pragma GCC unroll 4
      for (int b = 0; b < NB; ++b) {
        const vfw w = loadw(wb + (b * p.K + k) * kLanes);
#pragma GCC unroll 4
        for (int m = 0; m < MB; ++m) acc[m][b] = fmadd(xk[m], w, acc[m][b]);
      }
    }
    for (int m = 0; m < MB; ++m)
      for (int b = 0; b < NB; ++b) sums[m][b] = lo == 0 ? acc[m][b] : sums[m][b] + acc[m][b];
  }
  store_outputs<MB, NB>(p, sums, t0 * kLanes, m0);
}

// NB tiles for rows m0 .. m0 + min(4, M - m0) - 1: as many tiles per pass as keep the FMA
// units busy (a row's chains are each one FMA per input, waiting on the last).
template <int NB>
void ordered_block_rows(const OrderedProblem& p, int64_t t0, int64_t m0) {
  switch (std::min<int64_t>(4, p.M - m0)) {
    case 1:
      return ordered_block_outputs<1, NB>(p, t0, m0);
    case 2:
      for (int64_t t = t0; t < t0 + NB; t += 2) {
        if (t + 1 < t0 + NB)
          ordered_block_outputs<2, 2>(p, t, m0);
        else
          ordered_block_outputs<2, 1>(p, t, m0);
      }
      return;
    case 3:
      for (int64_t t = t0; t < t0 + NB; ++t) ordered_block_outputs<3, 1>(p, t, m0);
      return;
    default:
      for (int64_t t = t0; t < t0 + NB; ++t) ordered_block_outputs<4, 1>(p, t, m0);
      return;
  }
}

}  // namespace

torch::Tensor ordered_weight_blocks(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kFloat32, "w must be float32 (N, K)");
  const int64_t N = w.size(0), K = w.size(1), T = (N + kLanes - 1) / kLanes;
  auto padded = torch::zeros({T * kLanes, K}, w.options());
  padded.narrow(0, 0, N).copy_(w);
  return padded.view({T, kLanes, K}).transpose(1, 2).contiguous();
}

torch::Tensor skinny_linear_ordered_blocks(torch::Tensor x, torch::Tensor w_blocks,
                                           c10::optional<torch::Tensor> bias, int64_t k_block,
                                           int64_t out_features) {
  TORCH_CHECK(x.dim() == 2 && w_blocks.dim() == 3, "x must be (M, K) and w_blocks (T, K, L)");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && w_blocks.scalar_type() == torch::kFloat32,
              "float32 only");
  TORCH_CHECK(x.is_contiguous() && w_blocks.is_contiguous(),
              "x and w_blocks must be contiguous");
  TORCH_CHECK(k_block > 0, "k_block must be positive");
  const int64_t M = x.size(0), K = x.size(1), T = w_blocks.size(0), N = out_features;
  TORCH_CHECK(w_blocks.size(1) == K, "x and w_blocks disagree on in_features");
  TORCH_CHECK(w_blocks.size(2) == kLanes && N > (T - 1) * kLanes && N <= T * kLanes,
              "w_blocks must come from ordered_weight_blocks of an (out_features, K) weight");
  auto out = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  const OrderedProblem p{x.data_ptr<float>(), w_blocks.data_ptr<float>(),
                         checked_vector(bias, N, "bias"), out.data_ptr<float>(), M, K, N,
                         k_block};
  // Split by tiles; each thread takes its tiles four at a time, and all rows of x (four at a
  // time) over those before the next, which then find them in cache.
  at::parallel_for(0, T, 4, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; t += 4) {
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        switch (std::min<int64_t>(4, end - t)) {
          case 1:
            ordered_block_rows<1>(p, t, m0);
            break;
          case 2:
            ordered_block_rows<2>(p, t, m0);
            break;
          case 3:
            ordered_block_rows<3>(p, t, m0);
            break;
          default:
            ordered_block_rows<4>(p, t, m0);
            break;
        }
      }
    }
  });
  return out;
}
