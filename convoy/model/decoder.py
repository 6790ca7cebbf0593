"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3) over a flat, paged batch.

Module names follow transformers' so checkpoints load by name; the only departures are
the fused ``qkv_proj`` and ``gate_up_proj`` matmuls (see :data:`PACKED_MODULES`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from convoy.model.arch import ModelArch
from convoy.model.attention.base import AttentionMetadata
from convoy.model.layers import GatedMLP, RMSNorm, RotaryEmbedding
from convoy.model.linear import Linear
from convoy.model.ops import ModelOps

Metadata = AttentionMetadata[Any, Any]

# Checkpoint weight name -> (our fused parameter, which shard of it). The loader uses this.
PACKED_MODULES: dict[str, tuple[str, str]] = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", "gate"),
    "up_proj": ("gate_up_proj", "up"),
}


class Attention(nn.Module):
    def __init__(
        self, arch: ModelArch, layer_idx: int, rotary: RotaryEmbedding, ops: ModelOps
    ) -> None:
        super().__init__()
        self.backend = ops.attention
        self.num_heads = arch.num_heads
        self.num_kv_heads = arch.num_kv_heads
        self.head_dim = arch.head_dim
        self.q_size = arch.num_heads * arch.head_dim
        self.kv_size = arch.num_kv_heads * arch.head_dim
        self.scale = arch.head_dim**-0.5
        self.window = arch.sliding_windows[layer_idx]
        qkv_size = self.q_size + 2 * self.kv_size
        self.qkv_proj = Linear(arch.hidden_size, qkv_size, arch.qkv_bias, ops.linear)
        self.o_proj = Linear(self.q_size, arch.hidden_size, arch.o_bias, ops.linear)
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if arch.qk_norm:
            self.q_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps, ops.kernels)
            self.k_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps, ops.kernels)
        self.rotary = rotary

    def shard_sizes(self) -> dict[str, tuple[int, int]]:
        """Rows of ``qkv_proj`` that hold q, k and v: name -> (offset, size)."""
        return {
            "q": (0, self.q_size),
            "k": (self.q_size, self.kv_size),
            "v": (self.q_size + self.kv_size, self.kv_size),
        }

    def forward(
        self,
        positions: torch.Tensor,  # (T,)
        x: torch.Tensor,  # (T, C)
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: Metadata,
        output_layer: bool = False,
    ) -> torch.Tensor:
        """``output_layer``: the model's last layer, whose queries are needed only for
        ``meta.output_rows`` when that is set; every row's keys and values are still written."""
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)  # (T, H, D)
        k = k.view(t, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # Qwen3: per-head RMSNorm before rotary
        q, k = self.rotary(positions, q, k)
        k_cache, v_cache = kv_cache
        self.backend.write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        if output_layer and meta.output_rows is not None and meta.output_meta is not None:
            q, meta = q.index_select(0, meta.output_rows), meta.output_meta
            t = q.shape[0]
            if t == 0:
                return x.new_empty((0, x.shape[1]))
        o = self.backend.forward(q, k_cache, v_cache, meta, self.scale, self.window)  # (T, H, D)
        return self.o_proj(o.reshape(t, self.q_size))


class DecoderLayer(nn.Module):
    def __init__(
        self, arch: ModelArch, layer_idx: int, rotary: RotaryEmbedding, ops: ModelOps
    ) -> None:
        super().__init__()
        self.self_attn = Attention(arch, layer_idx, rotary, ops)
        self.mlp = GatedMLP(
            arch.hidden_size,
            arch.intermediate_size,
            arch.hidden_act,
            arch.mlp_bias,
            ops.linear,
            ops.kernels,
        )
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, ops.kernels)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, ops.kernels)

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: Metadata,
        output_layer: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` is the previous layer's MLP output, not yet added to the residual stream
        (``residual``; ``None`` for the first layer, whose ``x`` is the embeddings): each add
        happens inside the norm that follows it. Returns this layer's (MLP output, residual).

        ``output_layer`` (the last layer): when ``meta.output_rows`` is set, both come back for
        those rows only; a row's final hidden state depends on the other rows only through the
        keys and values, which are written for all of them."""
        if residual is None:
            residual = x
            h = self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(positions, h, kv_cache, meta, output_layer)
        if output_layer and meta.output_rows is not None:
            residual = residual.index_select(0, meta.output_rows)
            if h.shape[0] == 0:
                return h, residual
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class DecoderModel(nn.Module):
    def __init__(self, arch: ModelArch, max_positions: int, ops: ModelOps) -> None:
        super().__init__()
        rotary = RotaryEmbedding(
            arch.head_dim, arch.rope_theta, arch.rope_scaling, max_positions, ops.kernels
        )
        self.rotary = rotary  # one table, shared by every layer
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(arch, i, rotary, ops) for i in range(arch.num_layers)
        )
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, ops.kernels)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: Metadata,
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # (T, C)
        residual = None
        last = len(self.layers) - 1
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            x, residual = layer(positions, x, residual, kv_cache, meta, output_layer=i == last)
        if residual is None:  # no layers
            return self.norm(x)
        return self.norm(x, residual)[0]


class DecoderForCausalLM(nn.Module):
    """``forward`` gives final hidden states ``(T, C)`` (only ``meta.output_rows``' rows when
    that is set); ``compute_logits`` projects the rows that need them, so a prompt chunk pays
    for the vocabulary projection only once."""

    def __init__(self, arch: ModelArch, max_positions: int, ops: ModelOps) -> None:
        super().__init__()
        self.arch = arch
        self.model = DecoderModel(arch, max_positions, ops)
        self.lm_head = Linear(arch.hidden_size, arch.vocab_size, False, ops.linear)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: Metadata,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()  # (N, V), float32 for sampling and logprobs
