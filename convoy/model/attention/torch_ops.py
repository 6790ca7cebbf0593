"""Paged attention with torch ops on contexts gathered from the cache by slot index.

Runs on any device and dtype. Decodes attend with a grouped matmul over their contexts padded
to the longest (the pad slot stays zero, and an additive mask hides it); each prompt chunk
runs torch's scaled-dot-product attention over its gathered context.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from convoy.model.attention.base import AttentionBackend
from convoy.model.attention.batch import AttentionBatch

# What prompt attention may use on CUDA: not cuDNN's attention, which torch prefers on recent
# GPUs, because it builds an execution plan for every new (query, context) shape, and every
# prompt length is a new shape.
_CUDA_PREFILL_BACKENDS = [
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


def _additive(allowed: torch.Tensor) -> torch.Tensor:
    # Float, not boolean: torch's CPU attention takes a far slower path for boolean masks.
    mask = torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device)
    return mask.masked_fill_(~allowed, float("-inf"))


@dataclass
class GatheredDecode:
    """Each decode row's context slots, padded with the pad slot to the longest row."""

    slots: torch.Tensor  # (D, Lmax)
    context_lens: torch.Tensor  # (D,)
    # Additive masks (0 = attend, -inf = not), (D, 1, 1, Lmax), by sliding window.
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict)

    def mask(self, window: int | None) -> torch.Tensor:
        if window not in self._masks:
            lens = self.context_lens[:, None]  # (D, 1)
            keys = torch.arange(self.slots.shape[1], device=lens.device)[None, :]
            allowed = keys < lens  # (D, Lmax)
            if window is not None:
                # The query sits at position len-1; keys at distance >= window are out.
                allowed &= keys > lens - 1 - window
            self._masks[window] = _additive(allowed)[:, None, None, :]
        return self._masks[window]


@dataclass
class PrefillChunk:
    """One request computing several tokens: queries ``[q_start, q_end)`` of the batch."""

    q_start: int
    q_end: int
    context_slots: torch.Tensor  # (L,) slots of positions 0..L-1, L = start + num_tokens
    query_positions: torch.Tensor  # (q,) positions of the queries

    def mask(self, window: int | None) -> torch.Tensor | None:
        """``(1, q, L)`` additive mask; ``None`` for a whole prompt (queries at positions
        0..L-1) under no window narrower than it: plain causal attention, which torch runs
        without a mask, skipping the masked-out tiles."""
        n = self.context_slots.shape[0]
        if self.q_end - self.q_start == n and (window is None or window >= n):
            return None
        keys = torch.arange(n, device=self.query_positions.device)
        q = self.query_positions[:, None]  # (q, 1)
        allowed = keys[None, :] <= q  # causal
        if window is not None:
            allowed &= keys[None, :] > q - window
        return _additive(allowed)[None]


@dataclass
class GatheredPrefill:
    chunks: list[PrefillChunk]
    # One mask per chunk, by sliding window: built once a step, not once a layer.
    _masks: dict[int | None, list[torch.Tensor | None]] = field(default_factory=dict)

    def masks(self, window: int | None) -> list[torch.Tensor | None]:
        if window not in self._masks:
            self._masks[window] = [c.mask(window) for c in self.chunks]
        return self._masks[window]


class TorchAttention(AttentionBackend[GatheredDecode, GatheredPrefill]):
    """torch ops on gathered contexts (``kv_writer``: convoy's CPU kernels write the keys and
    values where they are loaded)."""

    name = "torch"

    def build_decode(self, batch: AttentionBatch) -> GatheredDecode:
        d, bs = batch.num_decodes, self.block_size
        tables = batch.block_tables
        lens = batch.start_positions[:d] + 1  # context length after this token
        lmax = max(batch.starts[:d]) + 1  # from the host: no sync
        pos = torch.arange(lmax, device=tables.device)
        blk = tables[:d, (pos // bs).clamp(max=tables.shape[1] - 1)]
        real = pos[None, :] < lens[:, None]
        slots = torch.where(real, blk * bs + pos % bs, self.pad_slot)  # (D, Lmax)
        return GatheredDecode(slots, lens)

    def build_prefill(self, batch: AttentionBatch) -> GatheredPrefill:
        bs = self.block_size
        tables = batch.block_tables
        chunks = []
        for r in range(batch.num_decodes, batch.num_rows):
            start, n, q0 = batch.starts[r], batch.query_lens[r], batch.query_starts[r]
            pos = torch.arange(start + n, device=tables.device)
            chunks.append(
                PrefillChunk(
                    q_start=q0,
                    q_end=q0 + n,
                    context_slots=tables[r, pos // bs] * bs + pos % bs,
                    query_positions=pos[start:],
                )
            )
        return GatheredPrefill(chunks)

    def decode_attention(
        self,
        out: torch.Tensor,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        decode: GatheredDecode,
        scale: float,
        window: int | None,
    ) -> None:
        # A grouped matmul over the padded context beats torch's CPU SDPA here, which is slow
        # with GQA and a mask.
        d, num_heads = q.shape[0], q.shape[1]
        num_kv_heads = k_cache.shape[1]
        group = num_heads // num_kv_heads
        lmax = decode.slots.shape[1]
        flat = decode.slots.reshape(-1)
        k = k_cache.index_select(0, flat).view(d, lmax, num_kv_heads, -1)  # (D, L, Hkv, Dh)
        v = v_cache.index_select(0, flat).view(d, lmax, num_kv_heads, -1)
        qd = q.view(d, num_kv_heads, group, -1)  # (D, Hkv, G, Dh)
        scores = qd @ k.permute(0, 2, 3, 1) * scale  # (D, Hkv, G, L)
        probs = torch.softmax(scores.float() + decode.mask(window), dim=-1).to(v.dtype)
        o = probs @ v.transpose(1, 2)  # (D, Hkv, G, Dh)
        out.copy_(o.reshape(d, num_heads, -1))

    def prefill_attention(
        self,
        out: torch.Tensor,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        prefill: GatheredPrefill,
        scale: float,
        window: int | None,
    ) -> None:
        gqa = q.shape[1] != k_cache.shape[1]
        masks = prefill.masks(window)
        with sdpa_kernel(_CUDA_PREFILL_BACKENDS) if q.is_cuda else contextlib.nullcontext():
            for chunk, mask in zip(prefill.chunks, masks, strict=True):
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
