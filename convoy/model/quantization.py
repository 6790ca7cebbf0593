"""Weight-only int8 quantization (``quantization="int8"``) for bandwidth-bound CPU decode.

Each linear layer's weight ``W (N, K)`` becomes int8 values and one float scale per output
row: ``scale_n = max_k |W[n, k]| / 127``, ``Wq = round(W / scale)``, symmetric, like llama.cpp's
q8_0 but per row instead of per 32 values. Activations stay float32; the product runs in
torch's int8-weight kernel (``aten._weight_int8pack_mm``), which reads a quarter of the bytes,
or, for a few rows, convoy's int8 matrix-vector kernel. The embedding table stays float (it
is looked up, not multiplied); a head tied to it gets its own int8 copy. This changes outputs
slightly: ``benchmarks/quantization.py`` reports how much.
"""

from __future__ import annotations

import torch

from convoy.model.cpu_kernels import CpuKernels
from convoy.model.linear import SKINNY_MAX_ROWS, Linear, LinearMethod

QUANTIZATIONS = ("int8",)


def quantize_weight_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values (N, K), float32 scales (N,)) of a float weight, symmetric per row."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(LinearMethod):
    """Int8 weights with per-row scales; the float weight is dropped after loading.
    ``skinny``: convoy's int8 matrix-vector kernel for products of a few rows."""

    def __init__(self, skinny: CpuKernels | None) -> None:
        self.skinny = skinny
        self.name = "int8+matvec" if skinny is not None else "int8"

    def process_weights_after_loading(self, layer: Linear, keep_plain: bool) -> None:
        q, scale = quantize_weight_int8(layer.weight)
        layer.qweight, layer.qscale = q, scale.to(layer.weight.dtype)
        layer.drop_weight()

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        assert layer.qweight is not None and layer.qscale is not None
        if self.skinny is not None and x.dim() == 2 and x.shape[0] <= SKINNY_MAX_ROWS:
            return self.skinny.skinny_linear_int8(
                x.contiguous(), layer.qweight, layer.qscale, layer.bias
            )
        shape = x.shape
        y = torch.ops.aten._weight_int8pack_mm(
            x.reshape(-1, shape[-1]).contiguous(), layer.qweight, layer.qscale
        ).reshape(*shape[:-1], -1)
        return y + layer.bias if layer.bias is not None else y
