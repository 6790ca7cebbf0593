"""Building blocks of Llama-family decoders: RMSNorm, rotary embeddings, gated MLP.

Each mirrors transformers' arithmetic (float32 statistics, same op order) so that float32
outputs match it to rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, overload

import torch
from torch import nn
from torch.nn import functional as F

from convoy.model.cpu_kernels import CpuKernels
from convoy.model.linear import Linear, LinearMethod


class RMSNorm(nn.Module):
    """``weight * x / rms(x)``; given the residual stream too, adds ``x`` to it first (the
    decoder's "residual + sublayer output, normalized for the next sublayer") and returns both.

    With ``kernels`` (convoy's CPU kernels, for float32 CPU models) either runs in one pass,
    the add in place; otherwise torch ops do it the way transformers does.
    """

    def __init__(self, dim: int, eps: float, kernels: CpuKernels | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.kernel = kernels

    @overload
    def forward(self, x: torch.Tensor, residual: None = None) -> torch.Tensor: ...
    @overload
    def forward(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...
    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.kernel is not None and x.dim() == 2:
            if residual is None:
                return self.kernel.rms_norm(x, self.weight, self.eps)
            # Both are this step's own tensors (a sublayer's output, the residual stream).
            self.kernel.fused_add_rms_norm(x, residual, self.weight, self.eps)
            return x, residual
        if residual is None:
            return self._norm(x)
        residual = residual + x
        return self._norm(residual), residual

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies ``(head_dim/2,)`` for default, linear and Llama 3 rope scaling."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between
    # interpolated smoothly.
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_len / low
    high_freq_wavelen = old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position up to ``max_positions``, looked up by position id.

    With ``kernels`` (for float32 CPU models) q and k are rotated in place.
    """

    def __init__(
        self,
        head_dim: int,
        theta: float,
        scaling: dict[str, Any] | None,
        max_positions: int,
        kernels: CpuKernels | None = None,
    ) -> None:
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        self.max_positions = max_positions
        self.kernel = kernels
        self.cos: torch.Tensor
        self.sin: torch.Tensor
        self.build(torch.get_default_device())

    def build(self, device: torch.device) -> None:
        """(Re)compute the float32 tables on ``device`` (after building on the meta device)."""
        inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling)
        positions = torch.arange(self.max_positions, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]  # (P, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (P, D)
        self.register_buffer("cos", emb.cos().to(device), persistent=False)
        self.register_buffer("sin", emb.sin().to(device), persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # q: (T, H, D), k: (T, Hkv, D), positions: (T,)
        if self.kernel is not None:
            self.kernel.rotary_embedding(positions, q, k, self.cos, self.sin)
            return q, k
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)  # (T, 1, D)
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"silu": F.silu, "gelu": F.gelu}


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` with gate and up fused into one matmul.

    With ``kernels`` (for float32 CPU models) ``silu(gate) * up`` runs in one pass.
    """

    def __init__(
        self,
        hidden: int,
        intermediate: int,
        act: str,
        bias: bool,
        linear: LinearMethod,
        kernels: CpuKernels | None = None,
    ) -> None:
        super().__init__()
        if act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {act!r} is not supported ({sorted(_ACTIVATIONS)})")
        self.act = _ACTIVATIONS[act]
        self.fusable = act == "silu"
        self.intermediate = intermediate
        self.gate_up_proj = Linear(hidden, 2 * intermediate, bias, linear)
        self.down_proj = Linear(intermediate, hidden, bias, linear)
        self.kernel = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # (T, 2I)
        if self.kernel is not None and self.fusable and gate_up.dim() == 2:
            return self.down_proj(self.kernel.silu_and_mul(gate_up))
        gate, up = gate_up.split(self.intermediate, dim=-1)  # (T, I) each
        return self.down_proj(self.act(gate) * up)
