"""Decodes that share leading KV blocks attend to the shared part once (Hydragen).

A block id in two block tables is one shared block (prefix cache, n > 1 samples). Rows
sharing a prefix compute attention over it as one matrix product for all their queries, the
prefix's keys and values read once instead of once per row, and merge it exactly with each
row's own part (its suffix) through the softmax normalizers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from convoy.model.attention.batch import AttentionBatch

# Decodes sharing fewer leading blocks than this attend the plain way: splitting the softmax
# only pays once the shared prefix is long enough to be worth reading once.
MIN_SHARED_BLOCKS = 4


@dataclass
class SharedPrefixGroup:
    """Decode rows ``[row_start, row_end)`` that all begin with ``prefix_slots``."""

    row_start: int
    row_end: int
    prefix_slots: torch.Tensor  # (P,)


@dataclass
class SharedPrefixDecodes:
    """The step's groups, and each decode row's context after its group's prefix (all of it
    for rows in no group), padded with the zeroed pad slot."""

    groups: list[SharedPrefixGroup]
    suffix_slots: torch.Tensor  # (D, Smax)
    suffix_lens: torch.Tensor  # (D,)


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    k = 0
    while k < limit and a[k] == b[k]:
        k += 1
    return k


def find_shared_prefixes(
    batch: AttentionBatch, block_size: int, pad_slot: int
) -> SharedPrefixDecodes | None:
    """Groups of the batch's decodes whose block tables start alike, or ``None``.

    A group is a run of neighbouring rows sharing at least :data:`MIN_SHARED_BLOCKS` leading
    blocks (the runner sorts decodes by block table, so rows sharing a prefix are
    neighbours); its prefix always leaves each row at least its newest token.
    """
    bs = block_size
    d = batch.num_decodes
    tables_host = batch.host_block_tables
    tables = batch.block_tables[:d]
    device = tables.device
    groups: list[SharedPrefixGroup] = []
    prefix_lens = [0] * d

    def usable(r: int) -> int:
        # Blocks before the newest token's (which stays in the row's own part).
        return min(len(tables_host[r]), batch.starts[r] // bs)

    start = 0
    while start < d:
        lead = tables_host[start]
        shared = usable(start)
        end = start + 1
        # The group grows while its common prefix stays long enough.
        while end < d:
            k = _common_prefix(tables_host[end], lead, min(shared, usable(end)))
            if k < MIN_SHARED_BLOCKS:
                break
            shared, end = k, end + 1
        if end - start > 1:
            pos = torch.arange(shared * bs, device=device)
            slots = tables[start, pos // bs] * bs + pos % bs
            groups.append(SharedPrefixGroup(start, end, slots))
            prefix_lens[start:end] = [shared * bs] * (end - start)
        start = end
    if not groups:
        return None
    ctx = batch.start_positions[:d] + 1  # (D,) context length after this token
    plen = torch.tensor(prefix_lens, dtype=torch.long, device=device)
    suffix_lens = ctx - plen
    pos = plen[:, None] + torch.arange(int(suffix_lens.max()), device=device)[None, :]
    real = pos < ctx[:, None]
    blk = torch.gather(tables, 1, (pos // bs).clamp(max=tables.shape[1] - 1))
    suffix_slots = torch.where(real, blk * bs + pos % bs, pad_slot)
    return SharedPrefixDecodes(groups, suffix_slots, suffix_lens)


def shared_prefix_decode(
    q: torch.Tensor,  # (D, H, Dh)
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    shared: SharedPrefixDecodes,
    scale: float,
) -> torch.Tensor:
    """Decode attention split into shared prefixes and per-row suffixes, merged exactly.

    Softmax over a split context: with ``m`` the running max, ``l = sum(exp(s - m))`` and
    ``o = sum(exp(s - m) v)`` per part, the parts combine as ``o1 e^(m1-m) + o2 e^(m2-m)`` over
    ``l1 e^(m1-m) + l2 e^(m2-m)`` with ``m = max(m1, m2)``: the same attention, up to float
    rounding.
    """
    d, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    qd = q.view(d, num_kv_heads, group, head_dim)

    # Every row's own part (its whole context when it is in no group).
    smax = shared.suffix_slots.shape[1]
    flat = shared.suffix_slots.reshape(-1)
    k = k_cache.index_select(0, flat).view(d, smax, num_kv_heads, head_dim)
    v = v_cache.index_select(0, flat).view(d, smax, num_kv_heads, head_dim)
    scores = (qd @ k.permute(0, 2, 3, 1)).float() * scale  # (D, Hkv, G, S)
    pad = torch.arange(smax, device=q.device)[None, :] >= shared.suffix_lens[:, None]  # (D, S)
    scores.masked_fill_(pad[:, None, None, :], float("-inf"))
    m = scores.amax(dim=-1, keepdim=True)  # (D, Hkv, G, 1)
    e = torch.exp(scores - m)
    denom = e.sum(dim=-1, keepdim=True)
    numer = (e.to(v.dtype) @ v.transpose(1, 2)).float()  # (D, Hkv, G, Dh)

    for g in shared.groups:
        rows = slice(g.row_start, g.row_end)
        n = g.row_end - g.row_start
        kp = k_cache.index_select(0, g.prefix_slots)  # (P, Hkv, Dh), read once for n rows
        vp = v_cache.index_select(0, g.prefix_slots)
        qg = qd[rows].permute(1, 0, 2, 3).reshape(num_kv_heads, n * group, head_dim)
        sp = (qg @ kp.permute(1, 2, 0)).float() * scale  # (Hkv, n*G, P)
        mp = sp.amax(dim=-1, keepdim=True)
        ep = torch.exp(sp - mp)
        lp = ep.sum(dim=-1, keepdim=True)
        op = (ep.to(vp.dtype) @ vp.transpose(0, 1)).float()  # (Hkv, n*G, Dh)
        # (Hkv, n*G, X) -> (n, Hkv, G, X), the suffix part's layout.
        mp, lp, op = (x.view(num_kv_heads, n, group, -1).permute(1, 0, 2, 3) for x in (mp, lp, op))
        ms = m[rows]
        mx = torch.maximum(ms, mp)
        ws, wp = torch.exp(ms - mx), torch.exp(mp - mx)
        numer[rows] = numer[rows] * ws + op * wp
        denom[rows] = denom[rows] * ws + lp * wp
    return (numer / denom).to(q.dtype).reshape(d, num_heads, head_dim)
