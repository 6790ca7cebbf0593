// Paged prefill attention for the CPU, float32: the queries of prompt chunks attend to their
// causal context straight from the paged KV cache.
//
// torch's CPU scaled_dot_product_attention, called once per chunk on a gathered copy of its
// context, runs these shapes (head_dim 64, grouped kv heads) far below the machine's matmul
// peak, and this kernel about twice as fast (figures in docs/performance/README.md).
// Here each chunk's keys are first transposed, kv head by kv head, into a matrix with one row
// per head dimension, so scores are a plain matrix product vectorized over keys (no
// horizontal sums). A work item is then (chunk, kv head, a few query positions): its rows are
// the query heads of the kv head's group at each position; the value sums are the decode
// kernel's, for several rows at once over each block's values.
//
// Softmax is computed the plain way (scores, max, exp, sum, weighted sum of values) in
// float32, each row over exactly the keys its mask allows (causal, and the sliding window),
// like the decode kernel.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "attention_cpu.h"
#include "vec.h"

namespace {

using convoy::kLanes;
using convoy::kValueHeads;
using convoy::vfw;

// Rows of a score tile: MR rows x 2 vectors of keys in registers (16 accumulators with
// AVX-512's 32 registers, 8 with AVX2's 16).
constexpr int kScoreRows = kLanes == 16 ? 8 : 4;
constexpr int64_t kKeyTile = 2 * kLanes;

// Query rows per work item, about: enough that an item's fixed costs (its score rows' setup,
// each value read once per kValueHeads rows) are shared, few enough that its scores (rows x
// keys) stay in L2 and a chunk splits into items for every thread. Both 16 and 64 were
// slower.
constexpr int64_t kItemRows = 32;
constexpr int64_t kItemScoreFloats = 256 * 1024;

// s_r[j0, j0 + kKeyTile) = scale * q_r . k_j for MR rows r: keys are the columns of kt, one row
// per head dimension (row stride ld), so each key's dot products build up across the lanes of
// the accumulators, one head dimension (one FMA per row and vector) at a time.
template <int MR>
inline void score_rows(const float* const* q, const float* kt, int64_t ld, int64_t head_dim,
                       float* const* s, int64_t j0, float scale) {
  vfw acc[MR][2] = {};
  for (int64_t d = 0; d < head_dim; ++d) {
    const vfw k0 = convoy::loadw(kt + d * ld + j0);
    const vfw k1 = convoy::loadw(kt + d * ld + j0 + kLanes);
    for (int r = 0; r < MR; ++r) {
      const vfw qd = convoy::splatw(q[r][d]);
      acc[r][0] += qd * k0;
      acc[r][1] += qd * k1;
    }
  }
  const vfw sc = convoy::splatw(scale);
  for (int r = 0; r < MR; ++r) {
    convoy::storew(s[r] + j0, acc[r][0] * sc);
    convoy::storew(s[r] + j0 + kLanes, acc[r][1] * sc);
  }
}

template <int MR>
void score_row_tile(const float* const* q, const float* kt, int64_t ld, int64_t head_dim,
                    float* const* s, int64_t num_keys, float scale) {
  for (int64_t j0 = 0; j0 < num_keys; j0 += kKeyTile)
    score_rows<MR>(q, kt, ld, head_dim, s, j0, scale);
}

// score_row_tile for rows < kScoreRows rows (a tile's rest).
void score_row_rest(int rows, const float* const* q, const float* kt, int64_t ld,
                    int64_t head_dim, float* const* s, int64_t num_keys, float scale) {
  switch (rows) {
    case 1: return score_row_tile<1>(q, kt, ld, head_dim, s, num_keys, scale);
    case 2: return score_row_tile<2>(q, kt, ld, head_dim, s, num_keys, scale);
    case 3: return score_row_tile<3>(q, kt, ld, head_dim, s, num_keys, scale);
    case 4: return score_row_tile<4>(q, kt, ld, head_dim, s, num_keys, scale);
    case 5: return score_row_tile<5>(q, kt, ld, head_dim, s, num_keys, scale);
    case 6: return score_row_tile<6>(q, kt, ld, head_dim, s, num_keys, scale);
    case 7: return score_row_tile<7>(q, kt, ld, head_dim, s, num_keys, scale);
    default: TORCH_CHECK(false, "a score tile rest has 1-7 rows");
  }
}

// The chunks and the cache as the kernel reads them.
struct Chunks {
  const float* q;
  float* out;
  const float* k;
  const float* v;
  int64_t qt, qh, ot, oh;  // strides of q's and out's token and head dimensions
  int64_t ks, kh, vs, vh;  // strides of the caches' slot and kv head dimensions
  const int64_t* tables;
  const int64_t* query_starts;
  const int64_t* positions;
  const int64_t* num_queries;
  int64_t max_blocks, block_size, num_heads, num_kv_heads, head_dim, group, window;
  float scale;
};

// One work item: query positions [i0, i1) of chunk c (offsets from its first query), the
// query heads of kv head kvh.
struct Item {
  int64_t chunk, kvh, i0, i1;
};

// The first key position query position p may attend to.
inline int64_t first_key(const Chunks& ch, int64_t p) {
  return ch.window > 0 ? std::max<int64_t>(0, p + 1 - ch.window) : 0;
}

// The keys of chunk c's kv head kvh that any of its queries attends to, transposed:
// kt[d * ld + j] is dimension d of the key at position first_key(first query) + j. ld leaves
// at least one tile of zero columns past the keys, so a score tile starting at any key stays
// inside the matrix (the scores of zero columns are computed and ignored).
struct TransposedKeys {
  const float* kt;
  int64_t ld, k0;
};

inline int64_t transposed_ld(const Chunks& ch, int64_t c) {
  const int64_t keys = ch.positions[c] + ch.num_queries[c] - first_key(ch, ch.positions[c]);
  return (keys + kKeyTile - 1) / kKeyTile * kKeyTile + kKeyTile;
}

void transpose_keys(const Chunks& ch, int64_t c, int64_t kvh, float* kt) {
  const int64_t bs = ch.block_size, head_dim = ch.head_dim, ld = transposed_ld(ch, c);
  const int64_t* table = ch.tables + c * ch.max_blocks;
  const int64_t k0 = first_key(ch, ch.positions[c]);
  const int64_t num_keys = ch.positions[c] + ch.num_queries[c] - k0;
  for (int64_t j = 0; j < num_keys;) {
    const int64_t pos = k0 + j;
    const int64_t run = std::min(num_keys - j, bs - pos % bs);  // keys left in this block
    const float* key = ch.k + (table[pos / bs] * bs + pos % bs) * ch.ks + kvh * ch.kh;
    for (int64_t t = 0; t < run; ++t, ++j, key += ch.ks)
      for (int64_t d = 0; d < head_dim; ++d) kt[d * ld + j] = key[d];
  }
  for (int64_t d = 0; d < head_dim; ++d) std::fill(kt + d * ld + num_keys, kt + (d + 1) * ld, 0.f);
}

void attend_item(const Chunks& ch, const Item& it, const TransposedKeys& keys,
                 std::vector<float>& scratch) {
  const int64_t head_dim = ch.head_dim, group = ch.group, bs = ch.block_size;
  const int64_t* table = ch.tables + it.chunk * ch.max_blocks;
  const int64_t p0 = ch.positions[it.chunk] + it.i0;  // first query position of the item
  const int64_t p1 = ch.positions[it.chunk] + it.i1;  // one past the last
  const int64_t k0 = first_key(ch, p0);               // the first key any row attends to
  const int64_t ld = (p1 - k0 + kKeyTile - 1) / kKeyTile * kKeyTile;  // score row stride
  const int64_t rows = (it.i1 - it.i0) * group;  // row r: position i0 + r / group, head r % group
  scratch.resize(rows * ld);
  float* scores = scratch.data();
  const float* kt = keys.kt + (k0 - keys.k0);  // column 0: the key at k0

  auto q_row = [&](int64_t r) {
    return ch.q + (ch.query_starts[it.chunk] + it.i0 + r / group) * ch.qt +
           (it.kvh * group + r % group) * ch.qh;
  };
  auto out_row = [&](int64_t r) {
    return ch.out + (ch.query_starts[it.chunk] + it.i0 + r / group) * ch.ot +
           (it.kvh * group + r % group) * ch.oh;
  };
  // Keys [lo, hi) of row r, as offsets from k0.
  auto row_keys = [&](int64_t r) {
    const int64_t p = p0 + r / group;
    return std::pair<int64_t, int64_t>{first_key(ch, p) - k0, p + 1 - k0};
  };

  for (int64_t r0 = 0; r0 < rows; r0 += kScoreRows) {
    const int mr = static_cast<int>(std::min<int64_t>(kScoreRows, rows - r0));
    const float* q[kScoreRows];
    float* s[kScoreRows];
    for (int r = 0; r < mr; ++r) {
      q[r] = q_row(r0 + r);
      s[r] = scores + (r0 + r) * ld;
    }
    // Keys up to the tile's last row's last one: the rows before it have at most a few less.
    const int64_t tile_keys = row_keys(r0 + mr - 1).second;
    if (mr == kScoreRows)
      score_row_tile<kScoreRows>(q, kt, keys.ld, head_dim, s, tile_keys, ch.scale);
    else
      score_row_rest(mr, q, kt, keys.ld, head_dim, s, tile_keys, ch.scale);
  }

  // Softmax of each row over its own keys; zero weight elsewhere, so the value sums below can
  // run over a group of rows' common range.
  for (int64_t r = 0; r < rows; ++r) {
    float* s = scores + r * ld;
    const auto [lo, hi] = row_keys(r);
    std::fill(s, s + lo, 0.f);
    convoy::softmax_in_place(s + lo, hi - lo);
    std::fill(s + hi, s + ld, 0.f);
  }

  // out_r = sum over keys j of w_r[j] v_j, kValueHeads rows at a time, in key order, a block's
  // run of values at a time.
  for (int64_t r0 = 0; r0 < rows; r0 += kValueHeads) {
    const int nh = static_cast<int>(std::min<int64_t>(kValueHeads, rows - r0));
    float* y[kValueHeads];
    const float* w[kValueHeads];
    for (int r = 0; r < nh; ++r) {
      y[r] = out_row(r0 + r);
      std::fill(y[r], y[r] + head_dim, 0.f);
    }
    const int64_t lo = row_keys(r0).first, hi = row_keys(r0 + nh - 1).second;
    for (int64_t j = lo; j < hi;) {
      const int64_t pos = k0 + j;
      const int64_t run = std::min(hi - j, bs - pos % bs);
      const float* v = ch.v + (table[pos / bs] * bs + pos % bs) * ch.vs + it.kvh * ch.vh;
      for (int r = 0; r < nh; ++r) w[r] = scores + (r0 + r) * ld + j;
      convoy::add_weighted_rows(nh, y, w, v, ch.vs, run, head_dim);
      j += run;
    }
  }
}

}  // namespace

// out, q: (T, H, Dh) with unit stride on Dh, Dh a multiple of 8; k_cache, v_cache: (S, Hkv, Dh)
// likewise; block_tables: (C, B) int64, one row per chunk; query_starts, positions,
// num_queries: (C,) int64: chunk c's queries are rows [query_starts[c], + num_queries[c]) of q
// at positions positions[c], ...; its keys and values at positions 0 .. its last query's are in
// the cache already. window <= 0 means no sliding window, else a query at position p attends
// to keys at positions > p - window.
void paged_prefill_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache,
                             torch::Tensor v_cache, torch::Tensor block_tables,
                             torch::Tensor query_starts, torch::Tensor positions,
                             torch::Tensor num_queries, int64_t block_size, double scale,
                             int64_t window) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && out.scalar_type() == torch::kFloat32,
              "q and out must be float32");
  TORCH_CHECK(k_cache.scalar_type() == torch::kFloat32 && v_cache.scalar_type() == torch::kFloat32,
              "the KV cache must be float32");
  TORCH_CHECK(q.dim() == 3 && out.sizes() == q.sizes(), "q and out must be (T, H, Dh)");
  TORCH_CHECK(q.stride(2) == 1 && out.stride(2) == 1 && k_cache.stride(2) == 1 &&
                  v_cache.stride(2) == 1,
              "head_dim must be contiguous");
  TORCH_CHECK(q.size(2) % 8 == 0, "head_dim must be a multiple of 8");
  TORCH_CHECK(k_cache.size(2) == q.size(2) && v_cache.sizes() == k_cache.sizes(),
              "the caches must be (S, Hkv, Dh) with q's Dh");
  for (const auto* t : {&block_tables, &query_starts, &positions, &num_queries})
    TORCH_CHECK(t->scalar_type() == torch::kInt64 && t->is_contiguous(),
                "block tables and chunk bounds must be contiguous int64");
  const int64_t num_chunks = block_tables.size(0);
  TORCH_CHECK(query_starts.numel() == num_chunks && positions.numel() == num_chunks &&
                  num_queries.numel() == num_chunks,
              "one query start, position and query count per block table row");
  const int64_t num_heads = q.size(1), num_kv_heads = k_cache.size(1);
  TORCH_CHECK(num_heads % num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads");
  const Chunks ch{q.data_ptr<float>(),
                  out.data_ptr<float>(),
                  k_cache.data_ptr<float>(),
                  v_cache.data_ptr<float>(),
                  q.stride(0),
                  q.stride(1),
                  out.stride(0),
                  out.stride(1),
                  k_cache.stride(0),
                  k_cache.stride(1),
                  v_cache.stride(0),
                  v_cache.stride(1),
                  block_tables.data_ptr<int64_t>(),
                  query_starts.data_ptr<int64_t>(),
                  positions.data_ptr<int64_t>(),
                  num_queries.data_ptr<int64_t>(),
                  block_tables.size(1),
                  block_size,
                  num_heads,
                  num_kv_heads,
                  q.size(2),
                  num_heads / num_kv_heads,
                  window,
                  static_cast<float>(scale)};

  // Validate every row and block a chunk will touch once, outside the hot loops, and cut the
  // chunks into items.
  const int64_t num_blocks = k_cache.size(0) / block_size;
  std::vector<Item> items;
  for (int64_t c = 0; c < num_chunks; ++c) {
    const int64_t n = ch.num_queries[c], end = ch.positions[c] + n;
    TORCH_CHECK(n >= 0 && ch.positions[c] >= 0, "negative query count or position");
    TORCH_CHECK(ch.query_starts[c] >= 0 && ch.query_starts[c] + n <= q.size(0),
                "a chunk's queries lie outside q");
    TORCH_CHECK((end + block_size - 1) / block_size <= ch.max_blocks,
                "context longer than its block table");
    for (int64_t b = 0; b * block_size < end; ++b) {
      const int64_t blk = ch.tables[c * ch.max_blocks + b];
      TORCH_CHECK(blk >= 0 && blk < num_blocks, "block id out of range");
    }
    // Positions per item: ~kItemRows rows, fewer when the context is long enough that their
    // scores would not fit in L2.
    const int64_t keys = end - first_key(ch, ch.positions[c]);
    const int64_t by_rows = std::max<int64_t>(1, kItemRows / ch.group);
    const int64_t by_scores = std::max<int64_t>(1, kItemScoreFloats / (ch.group * keys + 1));
    const int64_t per_item = std::min(by_rows, by_scores);
    for (int64_t i0 = 0; i0 < n; i0 += per_item)
      for (int64_t kvh = 0; kvh < num_kv_heads; ++kvh)
        items.push_back({c, kvh, i0, std::min(n, i0 + per_item)});
  }
  // Every chunk's keys, transposed once for all its items (a pass over the chunk's keys per kv
  // head, in parallel).
  std::vector<int64_t> offsets(num_chunks * num_kv_heads + 1, 0);
  for (int64_t c = 0; c < num_chunks; ++c)
    for (int64_t kvh = 0; kvh < num_kv_heads; ++kvh)
      offsets[c * num_kv_heads + kvh + 1] =
          offsets[c * num_kv_heads + kvh] + ch.head_dim * transposed_ld(ch, c);
  std::vector<float> transposed(offsets.back());
  at::parallel_for(0, num_chunks * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      transpose_keys(ch, i / num_kv_heads, i % num_kv_heads, transposed.data() + offsets[i]);
  });
  convoy::run_costliest_first(
      static_cast<int64_t>(items.size()),
      [&](int64_t i) {
        const Item& it = items[i];
        const int64_t last = ch.positions[it.chunk] + it.i1;
        return (it.i1 - it.i0) * (last - first_key(ch, ch.positions[it.chunk] + it.i0));
      },
      [&](int64_t i, std::vector<float>& scratch) {
        const Item& it = items[i];
        const TransposedKeys keys{transposed.data() + offsets[it.chunk * num_kv_heads + it.kvh],
                                  transposed_ld(ch, it.chunk),
                                  first_key(ch, ch.positions[it.chunk])};
        attend_item(ch, it, keys, scratch);
      });
}
