// Paged decode attention for the CPU, float32.
//
// One query token per sequence attends to its context straight from the paged KV cache:
// no gathered copy of the context, no padding to the longest sequence in the batch. Work
// items are sequences (or (sequence, kv head) pairs when there are fewer sequences than
// threads), handed to free threads longest first; the query heads sharing a kv head (GQA) are
// handled together so every key and value vector is read once for all of them. Scores are
// computed in tiles of 16 dot products summed horizontally together, in the widest vectors
// the build has (16 lanes with AVX-512); each sequence walks its positions in order while the
// rows a fixed distance ahead are prefetched, across block boundaries (the blocks are
// scattered, so the hardware prefetcher cannot see the next one coming).
//
// The kernel reads the cache at close to the machine's streaming bandwidth only when blocks
// are long: the memory system streams long runs of the cache much faster than scattered
// 16-token ones, even for a plain sum over the same bytes. That is why convoy's CPU default
// block is 128 tokens. It still reads more slowly than such a plain sum: it waits on memory
// and computes in turn, more than it overlaps the two. (The figures behind this are in
// docs/performance/README.md.)
//
// Softmax is computed the plain way (scores, max, exp, sum, weighted sum of values) in
// float32, like the reference implementation, so results match it to float rounding.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "attention_cpu.h"
#include "vec.h"

namespace {

using convoy::keep_in_register;
using convoy::load8;
using convoy::store8;
using convoy::vf8;
using convoy::kValueHeads;
using convoy::vfw;

// Scores of NG query heads (rows of q, q_stride apart) against NP keys, NG * NP <= 16: the dot
// products q_i . k_j of a tile, summed horizontally together, into s[i * NP + j] (lanes past
// NG * NP stay zero). Full-width vectors (vfw) over head_dim, then, when AVX-512 leaves a last
// 8 floats (head_dim 24, 40, ...), one 8-lane step.
template <int NG, int NP>
inline void score_tile(const float* q, int64_t q_stride, const float* const* keys,
                       int64_t head_dim, float* s) {
  static_assert(NG * NP <= 16, "a tile is two 8-lane reductions");
  vfw acc[NG * NP] = {};
  int64_t d = 0;
  for (; d + convoy::kLanes <= head_dim; d += convoy::kLanes) {
    vfw k[NP];
    for (int j = 0; j < NP; ++j) {
      k[j] = convoy::loadw(keys[j] + d);
      keep_in_register(k[j]);  // each key feeds NG FMAs
    }
    for (int i = 0; i < NG; ++i) {
      const vfw qv = convoy::loadw(q + i * q_stride + d);
      for (int j = 0; j < NP; ++j) acc[i * NP + j] += qv * k[j];
    }
  }
  vf8 x[2][8] = {};
  for (int t = 0; t < NG * NP; ++t) x[t / 8][t % 8] = convoy::fold8(acc[t]);
  if (d < head_dim) {  // AVX-512 only: 8 floats left
    vf8 k[NP];
    for (int j = 0; j < NP; ++j) {
      k[j] = load8(keys[j] + d);
      keep_in_register(k[j]);
    }
    for (int i = 0; i < NG; ++i) {
      const vf8 qv = load8(q + i * q_stride + d);
      for (int j = 0; j < NP; ++j) x[(i * NP + j) / 8][(i * NP + j) % 8] += qv * k[j];
    }
  }
  store8(s, convoy::reduce8(x[0]));
  if constexpr (NG * NP > 8) store8(s + 8, convoy::reduce8(x[1]));
}


// Asks for [p, p + bytes) to be brought into L2 ahead of use. Blocks are scattered, so at
// every block boundary the hardware prefetcher would have to start over: without this the
// kernel waits on memory latency, not bandwidth, and runs far slower.
inline void prefetch(const float* p, int64_t bytes) {
  if (p == nullptr) return;
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) convoy::prefetch_line(c + off);
}


// How many positions ahead of the one being read the kernel prefetches: 16 rows are 8-16 KB
// for 2-4 kv heads of 64 floats, enough to cover DRAM latency; prefetching farther ahead did
// no better and costs L1/L2 room.
constexpr int64_t kPrefetchAhead = 16;

// Positions whose values are summed together, kv head after kv head, before moving on: the
// rows of a chunk stay in L1 across the kv heads, and the cache is read in slot order.
constexpr int64_t kValueChunk = 16;

// The cache and batch as the kernel reads them; one work item attends query heads
// [h0 * group, h1 * group) of one sequence.
struct Batch {
  const float* q;
  float* out;
  const float* k;
  const float* v;
  int64_t ks, kh, vs, vh;  // strides of the caches' slot and kv head dimensions
  const int64_t* tables;
  const int64_t* lens;
  int64_t max_blocks, block_size, num_heads, head_dim, group, window;
  float scale;
};

// One tile's scores into the score rows of its NG query heads (n apart), scaled; keys past the
// block (count < NP) were repeats, their lanes dropped.
template <int NG, int NP>
inline void score_heads(const float* q, int64_t head_dim, const float* const* keys, float* dst,
                        int64_t n, int64_t count, float scale) {
  float tile[16];
  score_tile<NG, NP>(q, head_dim, keys, head_dim, tile);
  for (int i = 0; i < NG; ++i)
    for (int64_t j = 0; j < count; ++j) dst[i * n + j] = tile[i * NP + j] * scale;
}

// Query heads of a kv head's group are scored NG at a time against NP = 16 / NG positions, so
// each key loaded feeds NG dot products; a group NG does not divide ends with a narrower tile
// of the rest (group 7 as 4 + 3), its positions the same NP.
template <int NG>
void attend(const Batch& bt, int64_t seq, int64_t h0, int64_t h1, std::vector<float>& scores) {
  constexpr int NP = 16 / NG;
  const int64_t head_dim = bt.head_dim, group = bt.group, block_size = bt.block_size;
  const int64_t heads = (h1 - h0) * group;  // query heads of this item
  const int64_t len = bt.lens[seq];
  const int64_t first = bt.window > 0 ? std::max<int64_t>(0, len - bt.window) : 0;
  const int64_t n = len - first;
  const int64_t* table = bt.tables + seq * bt.max_blocks;
  const float* qh = bt.q + (seq * bt.num_heads + h0 * group) * head_dim;
  float* oh = bt.out + (seq * bt.num_heads + h0 * group) * head_dim;
  if (n <= 0) {
    std::fill(oh, oh + heads * head_dim, 0.f);
    return;
  }
  scores.resize(heads * n);

  // Scores q . k, block by block, NP positions by NG query heads per tile, all kv heads of a
  // position before the next so memory is read in order. A tile running past the block
  // repeats its last position (a read inside the block, lanes discarded).
  const int64_t head_bytes = head_dim * sizeof(float);
  const int64_t last_block = (len - 1) / block_size;
  // This item's first kv head at the start of block b of a cache.
  auto block_start = [&](const float* cache, int64_t slot_stride, int64_t head_stride,
                         int64_t b) {
    return cache + table[b] * block_size * slot_stride + h0 * head_stride;
  };
  // This item's first kv head at offset off of block b, off possibly past the block (the
  // position lies in a later one); null past the context, which is not prefetched. No
  // division: it runs for every row read.
  auto row_ahead = [&](const float* cache, int64_t slot_stride, int64_t head_stride, int64_t b,
                       int64_t off) -> const float* {
    if (b * block_size + off >= len) return nullptr;
    for (; off >= block_size; off -= block_size) ++b;
    return block_start(cache, slot_stride, head_stride, b) + off * slot_stride;
  };
  for (int64_t b = first / block_size; b <= last_block; ++b) {
    const int64_t base = b * block_size;  // position of the block's first slot
    const int64_t lo = std::max(first, base) - base, hi = std::min(len - base, block_size);
    const float* kb = block_start(bt.k, bt.ks, bt.kh, b);
    for (int64_t o = lo; o < hi; o += NP) {
      const float* ahead[NP];
      for (int j = 0; j < NP; ++j)
        ahead[j] = row_ahead(bt.k, bt.ks, bt.kh, b, o + j + kPrefetchAhead);
      const int64_t count = std::min<int64_t>(NP, hi - o);
      for (int64_t kvh = 0; kvh < h1 - h0; ++kvh) {
        // The rows ahead are prefetched a kv head at a time, between tiles: all at once, the
        // prefetches outnumber the core's miss buffers and stall it.
        for (int j = 0; j < NP; ++j)
          prefetch(ahead[j] == nullptr ? nullptr : ahead[j] + kvh * bt.kh, head_bytes);
        const int64_t hq = kvh * group;  // this kv head's first query head in the item
        const float* keys[NP];
        for (int j = 0; j < NP; ++j) keys[j] = kb + std::min(o + j, hi - 1) * bt.ks + kvh * bt.kh;
        float* dst = scores.data() + hq * n + (base + o - first);
        const float* qg = qh + hq * head_dim;
        int64_t g = 0;
        for (; g + NG <= group; g += NG)
          score_heads<NG, NP>(qg + g * head_dim, head_dim, keys, dst + g * n, n, count, bt.scale);
        if constexpr (NG > 1) {  // the rest of the group, fewer than NG heads
          const int64_t rest = group - g;
          const float* qr = qg + g * head_dim;
          if (rest == 1) score_heads<1, NP>(qr, head_dim, keys, dst + g * n, n, count, bt.scale);
          if constexpr (NG > 2)
            if (rest == 2) score_heads<2, NP>(qr, head_dim, keys, dst + g * n, n, count, bt.scale);
          if constexpr (NG > 3)
            if (rest == 3) score_heads<3, NP>(qr, head_dim, keys, dst + g * n, n, count, bt.scale);
        }
      }
    }
  }
  for (int64_t h = 0; h < heads; ++h) convoy::softmax_in_place(scores.data() + h * n, n);
  // Weighted sum of values in position order like the scores, a chunk of positions at a time;
  // within a chunk, kv head by kv head, kValueHeads query heads at a time. Each position's
  // weight multiplies its value in the same order as before chunking, so the sums are
  // unchanged.
  std::fill(oh, oh + heads * head_dim, 0.f);
  for (int64_t b = first / block_size; b <= last_block; ++b) {
    const int64_t base = b * block_size;
    const int64_t lo = std::max(first, base) - base, hi = std::min(len - base, block_size);
    for (int64_t c0 = lo; c0 < hi; c0 += kValueChunk) {
      const int64_t c1 = std::min(hi, c0 + kValueChunk);
      const float* vc = block_start(bt.v, bt.vs, bt.vh, b) + c0 * bt.vs;
      for (int64_t kvh = 0; kvh < h1 - h0; ++kvh) {
        for (int64_t o = c0; o < c1; ++o) {
          const float* r = row_ahead(bt.v, bt.vs, bt.vh, b, o + kPrefetchAhead);
          prefetch(r == nullptr ? nullptr : r + kvh * bt.vh, head_bytes);
        }
        const float* v = vc + kvh * bt.vh;
        const float* w[kValueHeads];
        float* y[kValueHeads];
        for (int64_t h = kvh * group; h < (kvh + 1) * group; h += kValueHeads) {
          const int nh = std::min<int64_t>(kValueHeads, (kvh + 1) * group - h);
          for (int i = 0; i < nh; ++i) {
            w[i] = scores.data() + (h + i) * n + (base + c0 - first);
            y[i] = oh + (h + i) * head_dim;
          }
          convoy::add_weighted_rows(nh, y, w, v, bt.vs, c1 - c0, head_dim);
        }
      }
    }
  }
}

}  // namespace

// out, q: (D, H, Dh); k_cache, v_cache: (S, Hkv, Dh) with unit stride on Dh, Dh a multiple of 8;
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
  TORCH_CHECK(q.size(2) % 8 == 0, "head_dim must be a multiple of 8");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt64 && block_tables.is_contiguous());
  TORCH_CHECK(context_lens.scalar_type() == torch::kInt64 && context_lens.is_contiguous());

  const int64_t num_seqs = q.size(0);
  const int64_t num_heads = q.size(1);
  const int64_t num_kv_heads = k_cache.size(1);
  TORCH_CHECK(num_heads % num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads");
  const Batch bt{q.data_ptr<float>(),
                 out.data_ptr<float>(),
                 k_cache.data_ptr<float>(),
                 v_cache.data_ptr<float>(),
                 k_cache.stride(0),
                 k_cache.stride(1),
                 v_cache.stride(0),
                 v_cache.stride(1),
                 block_tables.data_ptr<int64_t>(),
                 context_lens.data_ptr<int64_t>(),
                 block_tables.size(1),
                 block_size,
                 num_heads,
                 q.size(2),
                 num_heads / num_kv_heads,
                 window,
                 static_cast<float>(scale)};

  // Validate every block id a sequence will read once, outside the hot loop.
  const int64_t num_blocks = k_cache.size(0) / block_size;
  for (int64_t seq = 0; seq < num_seqs; ++seq) {
    const int64_t used = (bt.lens[seq] + block_size - 1) / block_size;
    TORCH_CHECK(used <= bt.max_blocks, "context longer than its block table");
    for (int64_t b = 0; b < used; ++b) {
      const int64_t blk = bt.tables[seq * bt.max_blocks + b];
      TORCH_CHECK(blk >= 0 && blk < num_blocks, "block id out of range");
    }
  }

  // Query heads per tile: up to 4 of a kv head's group, preferring a tile size that divides
  // it (6 as 3 + 3, not 4 + 2); a group no size divides (5, 7) takes 4 and a narrower rest.
  const int64_t g = bt.group;
  const auto run = g % 4 == 0 ? attend<4>
                   : g % 3 == 0 ? attend<3>
                   : g % 2 == 0 ? attend<2>
                   : g > 4      ? attend<4>
                                : attend<1>;
  // One work item is a sequence with all its kv heads; with fewer sequences than threads,
  // items split a sequence by kv head instead so every thread has work.
  const int64_t splits = num_seqs >= at::get_num_threads() ? 1 : num_kv_heads;
  convoy::run_costliest_first(
      num_seqs * splits, [&](int64_t item) { return bt.lens[item / splits]; },
      [&](int64_t item, std::vector<float>& scores) {
        const int64_t seq = item / splits;
        const int64_t h0 = splits == 1 ? 0 : item % splits;
        run(bt, seq, h0, splits == 1 ? num_kv_heads : h0 + 1, scores);
      });
}

// k_cache[slot_mapping[t]] = k[t] and the same for v: the new tokens' keys and values stored
// at their slots. torch's index_copy_ copies element by element through a strided iterator,
// several times slower than one memcpy per row with both caches in one call, as here. Any
// dtype; caches (S, Hkv, D) and k, v (T, Hkv, D), each token's (Hkv, D) contiguous (k and v
// may be column slices of the qkv projection's output).
void write_kv(torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor k, torch::Tensor v,
              torch::Tensor slot_mapping) {
  TORCH_CHECK(k_cache.dim() == 3 && v_cache.dim() == 3 && k.dim() == 3 && v.dim() == 3,
              "caches must be (S, Hkv, D) and k, v (T, Hkv, D)");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "the K and V caches must have one shape");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(1) == k_cache.size(1) &&
                  k.size(2) == k_cache.size(2),
              "k and v must be (T, Hkv, D) with the caches' Hkv and D");
  const auto dtype = k_cache.scalar_type();
  TORCH_CHECK(v_cache.scalar_type() == dtype && k.scalar_type() == dtype &&
                  v.scalar_type() == dtype,
              "k, v and the caches must have one dtype");
  const int64_t heads = k.size(1), dim = k.size(2);
  auto rows_contiguous = [&](const torch::Tensor& x) {
    return x.stride(2) == 1 && (heads == 1 || x.stride(1) == dim);
  };
  TORCH_CHECK(rows_contiguous(k) && rows_contiguous(v) && rows_contiguous(k_cache) &&
                  rows_contiguous(v_cache),
              "each token's (Hkv, D) must be contiguous");
  TORCH_CHECK(slot_mapping.scalar_type() == torch::kInt64 && slot_mapping.is_contiguous() &&
                  slot_mapping.numel() == k.size(0),
              "slot_mapping must be a contiguous int64 vector, one slot per token");
  const int64_t T = k.size(0), S = k_cache.size(0);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(slots[t] >= 0 && slots[t] < S, "slot ", slots[t], " is outside the cache");
  const int64_t item = k.element_size();
  const int64_t row_bytes = heads * dim * item;
  auto* kc = static_cast<char*>(k_cache.data_ptr());
  auto* vc = static_cast<char*>(v_cache.data_ptr());
  const auto* kp = static_cast<const char*>(k.data_ptr());
  const auto* vp = static_cast<const char*>(v.data_ptr());
  const int64_t kcs = k_cache.stride(0) * item, vcs = v_cache.stride(0) * item;
  const int64_t ks = k.stride(0) * item, vs = v.stride(0) * item;
  // Threads only for prompt-sized writes: a decode step's 32-128 KB copy faster than a fork.
  const int64_t grain = std::max<int64_t>(1, (256 << 10) / (2 * row_bytes));
  at::parallel_for(0, T, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      std::memcpy(kc + slots[t] * kcs, kp + t * ks, row_bytes);
      std::memcpy(vc + slots[t] * vcs, vp + t * vs, row_bytes);
    }
  });
}
