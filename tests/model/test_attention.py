"""Attention variants equal plain paged attention (no model needed): the shared-prefix split
softmax, convoy's C++ paged decode and prefill kernels, and unmasked causal prefill of whole
prompts; and the C++ KV cache write equals ``index_copy_``."""

from __future__ import annotations

import pytest
import torch

from convoy.model import cpu_kernels
from convoy.model.attention import (
    AttentionBatch,
    AttentionMetadata,
    CpuKernelAttention,
    TorchAttention,
)
from convoy.model.attention.cpu import PagedPrefill
from convoy.model.attention.shared_prefix import SharedPrefixDecodes, SharedPrefixGroup
from convoy.model.attention.torch_ops import GatheredDecode, GatheredPrefill, PrefillChunk

CPU = torch.device("cpu")


def _cpu_backend(block_size: int, pad_slot: int) -> CpuKernelAttention:
    kernel = cpu_kernels.load()
    assert kernel is not None, cpu_kernels.unavailable_reason()
    return CpuKernelAttention(block_size, pad_slot, CPU, kernel)


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (6, 2), (4, 1)])
def test_split_softmax_equals_plain_attention(heads: int, kv_heads: int) -> None:
    gen = torch.Generator().manual_seed(0)
    slots, dim = 200, 16
    k_cache = torch.randn(slots + 1, kv_heads, dim, generator=gen)
    v_cache = torch.randn(slots + 1, kv_heads, dim, generator=gen)
    k_cache[slots] = v_cache[slots] = 0  # the pad slot
    # Rows 0-2 share slots 0..39; row 3 is alone. Own parts at 100+ (lengths 5, 9, 1 and 30).
    prefix = torch.arange(40)
    own = [torch.arange(100, 105), torch.arange(110, 119), torch.arange(120, 121)]
    contexts = [torch.cat([prefix, o]) for o in own] + [torch.arange(150, 180)]
    lens = torch.tensor([len(c) for c in contexts])
    lmax = int(lens.max())

    def padded(rows: list[torch.Tensor]) -> torch.Tensor:
        width = max(len(r) for r in rows)
        return torch.stack([torch.cat([r, torch.full((width - len(r),), slots)]) for r in rows])

    q = torch.randn(4, heads, dim, generator=gen)
    plain: AttentionMetadata[GatheredDecode, GatheredPrefill] = AttentionMetadata(
        slot_mapping=torch.zeros(4, dtype=torch.long),
        num_decode_tokens=4,
        decode=GatheredDecode(padded(contexts), lens),
        prefill=None,
    )
    suffixes = [*own, contexts[3]]
    split: AttentionMetadata[GatheredDecode, GatheredPrefill] = AttentionMetadata(
        slot_mapping=plain.slot_mapping,
        num_decode_tokens=4,
        decode=plain.decode,
        prefill=None,
        shared_prefix=SharedPrefixDecodes(
            [SharedPrefixGroup(0, 3, prefix)],
            padded(suffixes),
            torch.tensor([len(s) for s in suffixes]),
        ),
    )
    backend = TorchAttention(1, slots, CPU)
    want = backend.forward(q, k_cache, v_cache, plain, 0.25, None)
    got = backend.forward(q, k_cache, v_cache, split, 0.25, None)
    assert lmax == 49
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# Query heads per kv head 1, 3, 2, 4, 6, 5 and 7: the kernel scores them in tiles of 1, 3, 2,
# 4, 3 + 3, 4 + 1 and 4 + 3 heads.
@pytest.mark.parametrize(
    ("heads", "kv_heads"), [(4, 4), (6, 2), (8, 4), (4, 1), (12, 2), (10, 2), (14, 2)]
)
@pytest.mark.parametrize("window", [None, 1, 7, 1000])
# Tiles of 4-16 positions against blocks smaller, larger and not a multiple of them; 128 is
# the CPU default, longer than a value chunk and the prefetch distance.
@pytest.mark.parametrize(("dim", "block_size"), [(16, 4), (64, 16), (24, 5), (64, 128)])
def test_paged_kernel_equals_gathered_attention(
    heads: int, kv_heads: int, window: int | None, dim: int, block_size: int
) -> None:
    """The kernel reads K/V through scattered block tables of ragged lengths (1 token to
    several blocks, a partly filled last block) and matches the gather-and-matmul path, each
    backend building its metadata from the same batch."""
    gen = torch.Generator().manual_seed(1)
    lens = torch.tensor([1, 4, 5, 13, 30, 2 * block_size + 21])
    need_blocks = [-(-n // block_size) for n in lens.tolist()]
    num_blocks = sum(need_blocks) + 3
    pad = num_blocks * block_size
    k_cache = torch.randn(pad + 1, kv_heads, dim, generator=gen)
    v_cache = torch.randn(pad + 1, kv_heads, dim, generator=gen)
    k_cache[pad] = v_cache[pad] = 0
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, width = [], max(need_blocks) + 1
    for n in lens.tolist():
        need = -(-n // block_size)
        tables.append(perm[:need] + [0] * (width - need))
        perm = perm[need:]
    table_t = torch.tensor(tables)
    q = torch.randn(len(lens), heads, dim, generator=gen)
    starts = (lens - 1).tolist()
    batch = AttentionBatch(
        num_decodes=len(lens),
        query_starts=list(range(len(lens))),
        query_lens=[1] * len(lens),
        starts=starts,
        host_block_tables=tables,
        block_tables=table_t,
        start_positions=lens - 1,
        slot_mapping=torch.zeros(len(lens), dtype=torch.long),
    )
    gathered, paged = TorchAttention(block_size, pad, CPU), _cpu_backend(block_size, pad)
    meta = gathered.build_metadata(batch)
    assert meta.decode is not None and meta.shared_prefix is None
    pos = torch.arange(int(lens.max()))
    slots = table_t[:, pos // block_size] * block_size + pos % block_size
    assert torch.equal(meta.decode.slots, torch.where(pos[None, :] < lens[:, None], slots, pad))
    # The reference on float64 inputs: in float32 its own rounding is as large as the
    # kernel's, which sums in another order.
    want = gathered.forward(q.double(), k_cache.double(), v_cache.double(), meta, 0.25, window)
    got = paged.forward(q, k_cache, v_cache, paged.build_metadata(batch), 0.25, window)
    want = want.float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_paged_kernel_refuses_a_head_dim_it_cannot_tile() -> None:
    kernel = cpu_kernels.load()
    assert kernel is not None, cpu_kernels.unavailable_reason()
    q = torch.zeros(1, 2, 12)
    cache = torch.zeros(9, 2, 12)
    table, lens = torch.zeros(1, 2, dtype=torch.long), torch.tensor([3])
    with pytest.raises(RuntimeError, match="multiple of 8"):
        kernel.paged_decode_attention(torch.empty_like(q), q, cache, cache, table, lens, 4, 1.0, 0)


# Query heads per kv head 1, 3, 4 and 7 (score tiles of 8 rows and a rest of 1-7; value sums of
# 4 rows and a rest); head dims a multiple of 16 and not (24: AVX-512's 8-float rest).
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (6, 2), (8, 2), (14, 2)])
@pytest.mark.parametrize("window", [None, 1, 7, 1000])
@pytest.mark.parametrize(("dim", "block_size"), [(16, 4), (64, 16), (24, 5), (64, 128)])
def test_paged_prefill_kernel_equals_gathered_attention(
    heads: int, kv_heads: int, window: int | None, dim: int, block_size: int
) -> None:
    """Prompt chunks of a mixed step (after two decode rows): whole prompts, chunks resuming
    at a later position (chunked prefill, prefix cache hits), a one-token chunk and one long
    enough to span several items and blocks, their contexts in scattered blocks. The kernel
    matches torch's attention on gathered contexts, and the decode rows are left alone."""
    gen = torch.Generator().manual_seed(2)
    # (position of the first query, queries) per chunk.
    chunks = [(0, 9), (13, 6), (0, 1), (40, 1), (3 * block_size + 5, 70), (0, 37)]
    decodes = 2
    need_blocks = [-(-(start + n) // block_size) for start, n in chunks]
    num_blocks = sum(need_blocks) + 3
    k_cache = torch.randn(num_blocks * block_size + 1, kv_heads, dim, generator=gen)
    v_cache = torch.randn(num_blocks * block_size + 1, kv_heads, dim, generator=gen)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, width = [], max(need_blocks) + 1
    for need in need_blocks:
        tables.append(perm[:need] + [0] * (width - need))
        perm = perm[need:]
    table_t = torch.tensor(tables)
    q_starts, prefills, row = [], [], decodes
    for c, (start, n) in enumerate(chunks):
        pos = torch.arange(start + n)
        slots = table_t[c, pos // block_size] * block_size + pos % block_size
        prefills.append(PrefillChunk(row, row + n, slots, pos[start:]))
        q_starts.append(row)
        row += n
    # q as the model has it: a column slice of the qkv projection's output, rows not contiguous.
    qkv = torch.randn(row, heads + 2 * kv_heads, dim, generator=gen)
    q = qkv[:, :heads]
    slot_mapping = torch.zeros(row, dtype=torch.long)
    gathered: AttentionMetadata[GatheredDecode, GatheredPrefill] = AttentionMetadata(
        slot_mapping, 0, decode=None, prefill=GatheredPrefill(prefills)
    )
    paged_prefill = PagedPrefill(
        block_tables=table_t,
        query_starts=torch.tensor(q_starts),
        positions=torch.tensor([start for start, _ in chunks]),
        num_queries=torch.tensor([n for _, n in chunks]),
    )
    paged = AttentionMetadata(slot_mapping, 0, decode=None, prefill=paged_prefill)
    pad = num_blocks * block_size
    want = TorchAttention(block_size, pad, CPU).forward(q, k_cache, v_cache, gathered, 0.25, window)
    got = _cpu_backend(block_size, pad).forward(q, k_cache, v_cache, paged, 0.25, window)
    torch.testing.assert_close(got[decodes:], want[decodes:], rtol=1e-5, atol=1e-6)


def test_paged_prefill_kernel_refuses_blocks_outside_the_cache() -> None:
    kernel = cpu_kernels.load()
    assert kernel is not None, cpu_kernels.unavailable_reason()
    cache = torch.zeros(2, 4 * 4, 1, 8)  # K and V: 4 blocks of 4 slots
    q = torch.zeros(6, 1, 8)
    one = torch.tensor([0])
    with pytest.raises(RuntimeError, match="block id out of range"):
        kernel.paged_prefill_attention(
            torch.empty_like(q),
            q,
            cache[0],
            cache[1],
            torch.tensor([[1, 4]]),
            one,
            one,
            torch.tensor([6]),
            4,
            1.0,
            0,
        )


@pytest.mark.parametrize("window", [None, 3, 20, 64])
def test_whole_prompt_prefill_equals_masked_softmax(window: int | None) -> None:
    """A chunk holding a whole prompt runs as plain causal attention (no mask tensor) unless a
    window narrower than the prompt needs one; both match an explicitly masked softmax."""
    heads, kv_heads, dim, n = 6, 2, 16, 20
    gen = torch.Generator().manual_seed(3)
    k_cache = torch.randn(n + 7, kv_heads, dim, generator=gen)
    v_cache = torch.randn(n + 7, kv_heads, dim, generator=gen)
    slots = torch.randperm(n + 7, generator=gen)[:n]
    q = torch.randn(n, heads, dim, generator=gen)
    prefill = GatheredPrefill([PrefillChunk(0, n, slots, torch.arange(n))])
    meta: AttentionMetadata[GatheredDecode, GatheredPrefill] = AttentionMetadata(
        slot_mapping=slots, num_decode_tokens=0, decode=None, prefill=prefill
    )
    got = TorchAttention(1, n + 6, CPU).forward(q, k_cache, v_cache, meta, 0.25, window)
    assert (prefill.masks(window)[0] is None) == (window is None or window >= n)

    group = heads // kv_heads
    k = k_cache[slots].repeat_interleave(group, dim=1)  # (n, H, D)
    v = v_cache[slots].repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * 0.25
    pos = torch.arange(n)
    allowed = pos[None, :] <= pos[:, None]
    if window is not None:
        allowed &= pos[None, :] > pos[:, None] - window
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    want = torch.einsum("hqk,khd->qhd", probs, v)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# 3 rows: a decode step's few (one thread); 3000 rows of 128 B: a prompt's many (the kernel
# splits writes above 256 KB across threads).
@pytest.mark.parametrize("tokens", [3, 3000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_write_kernel_equals_index_copy(tokens: int, dtype: torch.dtype) -> None:
    """K and V come as column slices of one qkv output (rows not contiguous, like the model's)
    and land at scattered slots; untouched slots keep their contents."""
    kernel = cpu_kernels.load()
    assert kernel is not None, cpu_kernels.unavailable_reason()
    gen = torch.Generator().manual_seed(2)
    slots, kv_heads, dim = 4000, 2, 16
    qkv = torch.randn(tokens, (4 + 2 * kv_heads) * dim, generator=gen).to(dtype)
    _, k, v = qkv.split([4 * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    k, v = k.view(tokens, kv_heads, dim), v.view(tokens, kv_heads, dim)
    slot_mapping = torch.randperm(slots, generator=gen)[:tokens]
    # One layer's (K, V) pair of a (2, S, Hkv, D) cache, as the runner slices it.
    want = torch.randn(2, slots, kv_heads, dim, generator=gen).to(dtype)
    got = want.clone()
    TorchAttention(1, slots, CPU).write_kv(want[0], want[1], k, v, slot_mapping)
    TorchAttention(1, slots, CPU, kv_writer=kernel).write_kv(got[0], got[1], k, v, slot_mapping)
    assert torch.equal(got, want)
    assert torch.equal(got[0, slot_mapping], k)


def test_kv_write_kernel_refuses_slots_outside_the_cache() -> None:
    kernel = cpu_kernels.load()
    assert kernel is not None, cpu_kernels.unavailable_reason()
    cache = torch.zeros(2, 8, 1, 4)
    kv = torch.ones(2, 1, 4)
    for bad in (8, -1):
        with pytest.raises(RuntimeError, match="outside the cache"):
            kernel.write_kv(cache[0], cache[1], kv, kv, torch.tensor([0, bad]))
    assert not cache.any()
