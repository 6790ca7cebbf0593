"""Paged attention over a flattened, unpadded batch (torch backend: CPU and CUDA).

Memory layout of one layer's cache (keys and values alike)::

    cache: (num_blocks * block_size, num_kv_heads, head_dim)
           slot = block_id * block_size + offset_in_block

The batch is ragged: ``T`` query tokens from all scheduled requests, concatenated, decodes
(one query token each) first, then prompt chunks. New keys/values are written to their
slots first; then each query attends to its request's whole context: on the CPU in float32
with convoy's C++ kernels, which read the cache in place through the block tables
(``decode_kernel``, ``paged_prefill``); elsewhere with torch ops on a copy gathered from the
cache by slot index.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


@dataclass
class PrefillChunk:
    """One request computing several tokens: queries ``[q_start, q_end)`` of the batch."""

    q_start: int
    q_end: int
    context_slots: torch.Tensor  # (L,) slots of positions 0..L-1, L = start + num_tokens
    query_positions: torch.Tensor  # (q,) positions of the queries


@dataclass
class PagedPrefill:
    """The step's prompt chunks as convoy's CPU prefill kernel reads them: each chunk's block
    table and its queries (rows ``query_starts[c]`` on, ``num_queries[c]`` of them, at
    positions ``positions[c]`` on), keys and values straight from the cache."""

    kernel: Any
    block_tables: torch.Tensor  # (C, B)
    query_starts: torch.Tensor  # (C,)
    positions: torch.Tensor  # (C,)
    num_queries: torch.Tensor  # (C,)


@dataclass
class SharedPrefixDecode:
    """Decodes that share their leading KV blocks (prefix caching, or n > 1 samples).

    Decode rows ``[row_start, row_end)`` all begin with the same ``prefix_slots``; the rest of
    each row's context is in :attr:`AttentionMetadata.suffix_slots`. Attention over the prefix
    is then one matrix product for all the group's queries, with the prefix's keys and values
    read once instead of once per row (Hydragen), and merged exactly with the suffix part
    through the softmax normalizers.
    """

    row_start: int
    row_end: int
    prefix_slots: torch.Tensor  # (P,)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # (T,) where each new token's K/V goes
    num_decode_tokens: int  # the first D tokens are decodes, one per request
    decode_slots: torch.Tensor | None  # (D, Lmax) context slots, padded with slot 0
    decode_context_lens: torch.Tensor | None  # (D,)
    prefills: list[PrefillChunk]
    # Set when decodes run convoy's paged kernel (which reads the cache in place): the decode
    # rows' block tables (D, B) and the kernel module. ``decode_slots`` is then not built.
    decode_block_tables: torch.Tensor | None = None
    decode_kernel: Any = None
    block_size: int = 0
    # Set when prompt chunks run convoy's CPU prefill kernel instead of torch's attention on a
    # gathered copy of each chunk's context (``prefills`` still describes them).
    paged_prefill: PagedPrefill | None = None
    # Shared-prefix decode (used by layers without a sliding window): groups of decode rows
    # with a common prefix, and each row's context after its group's prefix (all of it for
    # rows in no group), padded with the zeroed pad slot.
    prefix_groups: list[SharedPrefixDecode] = field(default_factory=list)
    suffix_slots: torch.Tensor | None = None  # (D, Smax)
    suffix_lens: torch.Tensor | None = None  # (D,)
    # Set when only some rows' final hidden states are used (the sampled ones; a prompt chunk
    # that stops short of its last token samples nothing): those rows of the batch, in order,
    # and this metadata for them alone. The last layer then writes every row's keys and
    # values but computes queries, attention and MLP for these rows only.
    output_rows: torch.Tensor | None = None
    output_meta: AttentionMetadata | None = None
    # Masks depend on the layer's sliding window; built once per step per window.
    _masks: dict[int | None, tuple[torch.Tensor | None, list[torch.Tensor | None]]] = field(
        default_factory=dict
    )

    def masks(self, window: int | None) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
        """Additive float masks (0 = attend, -inf = not): decode ``(D, 1, 1, Lmax)`` and one
        ``(1, q, L)`` per prefill chunk. Float, not boolean: torch's CPU attention takes a far
        slower path for boolean masks. A chunk that is a whole prompt (queries at positions
        0..L-1) under no window narrower than it gets ``None``: plain causal attention, which
        torch runs without a mask and skipping the masked-out tiles (1.6-2x faster)."""
        if window not in self._masks:
            self._masks[window] = (self._decode_mask(window), self._prefill_masks(window))
        return self._masks[window]

    def _decode_mask(self, window: int | None) -> torch.Tensor | None:
        if self.decode_slots is None or self.decode_context_lens is None:
            return None
        lens = self.decode_context_lens[:, None]  # (D, 1)
        keys = torch.arange(self.decode_slots.shape[1], device=lens.device)[None, :]
        allowed = keys < lens  # (D, Lmax)
        if window is not None:
            # The query sits at position len-1; keys at distance >= window are out.
            allowed &= keys > lens - 1 - window
        return _additive(allowed)[:, None, None, :]

    def _prefill_masks(self, window: int | None) -> list[torch.Tensor | None]:
        masks: list[torch.Tensor | None] = []
        if self.paged_prefill is not None:
            return masks  # the kernel masks each row itself
        for chunk in self.prefills:
            n = chunk.context_slots.shape[0]
            if chunk.q_end - chunk.q_start == n and (window is None or window >= n):
                masks.append(None)
                continue
            keys = torch.arange(n, device=chunk.query_positions.device)
            q = chunk.query_positions[:, None]  # (q, 1)
            allowed = keys[None, :] <= q  # causal
            if window is not None:
                allowed &= keys[None, :] > q - window
            masks.append(_additive(allowed)[None])
        return masks


def _additive(allowed: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device)
    return mask.masked_fill_(~allowed, float("-inf"))


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
    kernel: Any = None,
) -> None:
    """Store the new tokens' keys/values ``(T, Hkv, D)`` at their slots: with convoy's CPU
    kernel (``kernel``, one row copy per token) when given, else ``index_copy_``."""
    if kernel is not None:
        kernel.write_kv(k_cache, v_cache, k, v, slot_mapping)
        return
    k_cache.index_copy_(0, slot_mapping, k)
    v_cache.index_copy_(0, slot_mapping, v)


# What prompt attention may use on CUDA (see paged_attention).
_CUDA_PREFILL_BACKENDS = [
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


def paged_attention(
    q: torch.Tensor,  # (T, H, D), rotary already applied
    k_cache: torch.Tensor,  # (S, Hkv, D)
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """Attention of each query over its request's cached context; returns ``(T, H, D)``."""
    num_heads = q.shape[1]
    num_kv_heads = k_cache.shape[1]
    gqa = num_heads != num_kv_heads
    out = torch.empty_like(q)
    decode_mask, prefill_masks = meta.masks(window)

    d = meta.num_decode_tokens
    if d and window is None and meta.prefix_groups:
        out[:d] = _shared_prefix_decode(q[:d], k_cache, v_cache, meta, scale)
    elif d and meta.decode_kernel is not None:
        meta.decode_kernel.paged_decode_attention(
            out[:d],
            q[:d].contiguous(),
            k_cache,
            v_cache,
            meta.decode_block_tables,
            meta.decode_context_lens,
            meta.block_size,
            scale,
            window or 0,
        )
    elif d and meta.decode_slots is not None and decode_mask is not None:
        # Decode: one query per request. A grouped matmul over the padded context beats
        # torch's CPU SDPA here, which is slow with GQA and a mask.
        group = num_heads // num_kv_heads
        lmax = meta.decode_slots.shape[1]
        flat = meta.decode_slots.reshape(-1)
        k = k_cache.index_select(0, flat).view(d, lmax, num_kv_heads, -1)  # (D, L, Hkv, Dh)
        v = v_cache.index_select(0, flat).view(d, lmax, num_kv_heads, -1)
        qd = q[:d].view(d, num_kv_heads, group, -1)  # (D, Hkv, G, Dh)
        scores = qd @ k.permute(0, 2, 3, 1) * scale  # (D, Hkv, G, L)
        probs = torch.softmax(scores.float() + decode_mask, dim=-1).to(v.dtype)
        o = probs @ v.transpose(1, 2)  # (D, Hkv, G, Dh)
        out[:d] = o.reshape(d, num_heads, -1)

    if meta.paged_prefill is not None:
        pp = meta.paged_prefill
        pp.kernel.paged_prefill_attention(
            out,
            q,
            k_cache,
            v_cache,
            pp.block_tables,
            pp.query_starts,
            pp.positions,
            pp.num_queries,
            meta.block_size,
            scale,
            window or 0,
        )
        return out
    # On CUDA not cuDNN's attention, which torch prefers on recent GPUs: it builds an execution
    # plan for every new (query, context) shape, and each prompt length is one (~10 s of plans
    # in the first 64-prompt run on an H200, measured).
    cuda_prefill = q.is_cuda and bool(meta.prefills)
    with sdpa_kernel(_CUDA_PREFILL_BACKENDS) if cuda_prefill else contextlib.nullcontext():
        for chunk, mask in zip(meta.prefills, prefill_masks, strict=True):
            k = k_cache.index_select(0, chunk.context_slots).transpose(0, 1)  # (Hkv, L, Dh)
            v = v_cache.index_select(0, chunk.context_slots).transpose(0, 1)
            qc = q[chunk.q_start : chunk.q_end].transpose(0, 1)  # (H, q, Dh)
            o = F.scaled_dot_product_attention(
                qc.unsqueeze(0),
                k.unsqueeze(0),
                v.unsqueeze(0),
                attn_mask=None if mask is None else mask.unsqueeze(0).to(qc.dtype),
                is_causal=mask is None,
                scale=scale,
                enable_gqa=gqa,
            )  # (1, H, q, Dh)
            out[chunk.q_start : chunk.q_end] = o[0].transpose(0, 1)
    return out


def _shared_prefix_decode(
    q: torch.Tensor,  # (D, H, Dh)
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Decode attention split into shared prefixes and per-row suffixes, merged exactly.

    Softmax over a split context: with ``m`` the running max, ``l = sum(exp(s - m))`` and
    ``o = sum(exp(s - m) v)`` per part, the parts combine as ``o1 e^(m1-m) + o2 e^(m2-m)`` over
    ``l1 e^(m1-m) + l2 e^(m2-m)`` with ``m = max(m1, m2)``: the same attention, up to float
    rounding.
    """
    assert meta.suffix_slots is not None and meta.suffix_lens is not None
    d, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    qd = q.view(d, num_kv_heads, group, head_dim)

    # Every row's own part (its whole context when it is in no group).
    smax = meta.suffix_slots.shape[1]
    flat = meta.suffix_slots.reshape(-1)
    k = k_cache.index_select(0, flat).view(d, smax, num_kv_heads, head_dim)
    v = v_cache.index_select(0, flat).view(d, smax, num_kv_heads, head_dim)
    scores = (qd @ k.permute(0, 2, 3, 1)).float() * scale  # (D, Hkv, G, S)
    pad = torch.arange(smax, device=q.device)[None, :] >= meta.suffix_lens[:, None]  # (D, S)
    scores.masked_fill_(pad[:, None, None, :], float("-inf"))
    m = scores.amax(dim=-1, keepdim=True)  # (D, Hkv, G, 1)
    e = torch.exp(scores - m)
    denom = e.sum(dim=-1, keepdim=True)
    numer = (e.to(v.dtype) @ v.transpose(1, 2)).float()  # (D, Hkv, G, Dh)

    for g in meta.prefix_groups:
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
