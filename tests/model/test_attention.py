"""Shared-prefix decode attention equals plain paged attention (no model needed)."""

from __future__ import annotations

import pytest
import torch

from convoy.model.attention import AttentionMetadata, SharedPrefixDecode, paged_attention


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
    plain = AttentionMetadata(
        slot_mapping=torch.zeros(4, dtype=torch.long),
        num_decode_tokens=4,
        decode_slots=padded(contexts),
        decode_context_lens=lens,
        prefills=[],
    )
    suffixes = [*own, contexts[3]]
    split = AttentionMetadata(
        slot_mapping=plain.slot_mapping,
        num_decode_tokens=4,
        decode_slots=plain.decode_slots,
        decode_context_lens=lens,
        prefills=[],
        prefix_groups=[SharedPrefixDecode(0, 3, prefix)],
        suffix_slots=padded(suffixes),
        suffix_lens=torch.tensor([len(s) for s in suffixes]),
    )
    want = paged_attention(q, k_cache, v_cache, plain, 0.25, None)
    got = paged_attention(q, k_cache, v_cache, split, 0.25, None)
    assert lmax == 49
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
