"""Weight-only int8 quantization (``quantization="int8"``) for bandwidth-bound CPU decode.

Each linear layer's weight ``W (N, K)`` becomes int8 values and one float scale per output
row: ``scale_n = max_k |W[n, k]| / 127``, ``Wq = round(W / scale)``, symmetric, like llama.cpp's
q8_0 but per row instead of per 32 values. Activations stay float32; the product runs in
torch's int8-weight kernel (``aten._weight_int8pack_mm``), which reads a quarter of the bytes.
The embedding table stays float (it is looked up, not multiplied); a head tied to it gets its
own int8 copy. This changes outputs slightly: the benchmark reports how much.
"""

from __future__ import annotations

import torch
from torch import nn

from convoy.model.layers import Linear

QUANTIZATIONS = ("int8",)


def quantize_weight_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values (N, K), float32 scales (N,)) of a float weight, symmetric per row."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_model_int8(model: nn.Module) -> int:
    """Quantize every :class:`Linear` of ``model`` in place; returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, Linear):
            module.quantize_int8()
            count += 1
    return count
