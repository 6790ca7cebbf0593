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


class RMSNorm(nn.Module):
    """``weight * x / rms(x)``; given the residual stream too, adds ``x`` to it first (the
    decoder's "residual + sublayer output, normalized for the next sublayer") and returns both.

    ``kernel`` (convoy's CPU kernels, set by the runner for float32 CPU models) does either in
    one pass, the add in place; otherwise torch ops do it the way transformers does.
    """

    kernel: Any = None

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

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

    With ``kernel`` (set by the runner for float32 CPU models) q and k are rotated in place.
    """

    kernel: Any = None

    def __init__(
        self, head_dim: int, theta: float, scaling: dict[str, Any] | None, max_positions: int
    ) -> None:
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        self.max_positions = max_positions
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


# At most this many rows go through convoy's matrix-vector kernel; more rows reuse each weight
# element enough for a GEMM library to win.
SKINNY_MAX_ROWS = 4
# The row count oneDNN tunes a packed weight's layout for; any row count can use it.
ONEDNN_PACK_ROWS = 64


def onednn_available() -> bool:
    """Whether this torch build has oneDNN's float32 linear with prepacked weights."""
    return torch.backends.mkldnn.is_available() and hasattr(
        torch.ops.mkldnn, "_reorder_linear_weight"
    )


class Linear(nn.Linear):
    """``nn.Linear`` with the CPU fast paths the runner switches on (float32 CPU models only):

    - oneDNN's matmul (:meth:`use_onednn`). On AMD CPUs torch's default float32 GEMM (MKL)
      takes its AVX2 code path, about half of what the cores can do; oneDNN picks the best
      instruction set itself and reaches 160-215 GFLOP/s on batches of 16+ rows where MKL gets
      50-160 (2-core Zen 4), and another ~10 % with the weight reordered once into its blocked
      layout (``pack=True``; the plain copy is then dropped, so memory stays the same);
    - convoy's bandwidth-bound matrix-vector kernel for products of a few rows (single-stream
      decode), which needs the plain layout;
    - int8 weights after :meth:`quantize_int8`.

    Every path computes the same float32 dot products; only the summation order, and so the
    last bits, differ.
    """

    skinny_kernel: Any = None

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias)
        self.qweight: torch.Tensor | None
        self.qscale: torch.Tensor | None
        self.register_buffer("qweight", None)
        self.register_buffer("qscale", None)
        # The weight oneDNN multiplies by: the plain one, or an opaque packed tensor (no
        # storage, no data_ptr), hence a plain attribute that state_dict and .to() never see.
        self.onednn_weight: torch.Tensor | None = None

    def quantize_int8(self) -> None:
        """Keep the weight as int8 rows with float32 scales (see convoy.model.quantization)."""
        from convoy.model.quantization import quantize_weight_int8

        q, scale = quantize_weight_int8(self.weight)
        self.qweight, self.qscale = q, scale.to(self.weight.dtype)
        self._drop_weight()

    def use_onednn(self, pack: bool, keep_plain: bool = False) -> None:
        """Multiply by oneDNN from now on; with ``pack``, on the weight reordered once into
        oneDNN's blocked layout, dropping the plain copy unless ``keep_plain`` (another module,
        such as a tied embedding table, still reads it: the packed copy then costs its size
        again in memory)."""
        if not pack:
            self.onednn_weight = self.weight.detach()
            return
        self.onednn_weight = torch.ops.mkldnn._reorder_linear_weight(
            self.weight.detach(), ONEDNN_PACK_ROWS
        )
        if not keep_plain:
            self._drop_weight()

    def _drop_weight(self) -> None:
        # Free the float weight (a tied embedding keeps its own reference).
        self.weight = nn.Parameter(self.weight.new_empty((0, self.in_features)), False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qweight is not None and self.qscale is not None:
            if self.skinny_kernel is not None and x.dim() == 2 and x.shape[0] <= SKINNY_MAX_ROWS:
                return self.skinny_kernel.skinny_linear_int8(
                    x.contiguous(), self.qweight, self.qscale, self.bias
                )
            shape = x.shape
            y = torch.ops.aten._weight_int8pack_mm(
                x.reshape(-1, shape[-1]).contiguous(), self.qweight, self.qscale
            ).reshape(*shape[:-1], -1)
            return y + self.bias if self.bias is not None else y
        if (
            self.skinny_kernel is not None
            and x.dim() == 2
            and x.shape[0] <= SKINNY_MAX_ROWS
            and self.weight.shape[0] > 0  # the plain layout is still here
        ):
            return self.skinny_kernel.skinny_linear(x.contiguous(), self.weight, self.bias)
        if self.onednn_weight is not None:
            return torch.ops.mkldnn._linear_pointwise(
                x, self.onednn_weight, self.bias, "none", [], ""
            )
        return F.linear(x, self.weight, self.bias)


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` with gate and up fused into one matmul.

    ``kernel`` (set by the runner for float32 CPU models) computes ``silu(gate) * up`` in one
    pass.
    """

    kernel: Any = None

    def __init__(self, hidden: int, intermediate: int, act: str, bias: bool) -> None:
        super().__init__()
        if act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {act!r} is not supported ({sorted(_ACTIVATIONS)})")
        self.act = _ACTIVATIONS[act]
        self.fusable = act == "silu"
        self.intermediate = intermediate
        self.gate_up_proj = Linear(hidden, 2 * intermediate, bias=bias)
        self.down_proj = Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # (T, 2I)
        if self.kernel is not None and self.fusable and gate_up.dim() == 2:
            return self.down_proj(self.kernel.silu_and_mul(gate_up))
        gate, up = gate_up.split(self.intermediate, dim=-1)  # (T, I) each
        return self.down_proj(self.act(gate) * up)
