"""Linear layers and how they multiply: a :class:`LinearMethod` chosen once for the model.

The runner picks the method from the device, dtype and options before the model is built;
every :class:`Linear` gets it at construction, and the loader calls
:meth:`LinearMethod.process_weights_after_loading` on each layer once its weight is in
(vLLM's ``quant_method`` shape). The methods:

- :class:`TorchLinear`: ``F.linear``, any device;
- :class:`CpuLinear`: float32 CPU models. oneDNN's matmul, which picks the best instruction
  set itself where torch's default float32 GEMM may not, optionally on the weight reordered
  once into oneDNN's blocked layout (``pack``; the plain copy is then dropped, so memory
  stays the same); and convoy's bandwidth-bound matrix-vector kernel for products of a few
  rows (single-stream decode), which needs the plain layout;
- ``Int8Linear`` (:mod:`convoy.model.quantization`): int8 weights.

Every float32 path computes the same float32 dot products; only the summation order, and so
the last bits, differ.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn
from torch.nn import functional as F

from convoy.model.cpu_kernels import CpuKernels

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


class LinearMethod(ABC):
    """How every :class:`Linear` of a model multiplies. One instance serves all layers; what
    it keeps per layer (a packed or quantized weight) lives on the layer."""

    name: str = ""

    def process_weights_after_loading(self, layer: Linear, keep_plain: bool) -> None:
        """Turn the loaded float weight into what :meth:`apply` reads. ``keep_plain``: another
        module (a tied embedding table, the greedy screen) reads the plain weight too. By
        default the weight stays as loaded."""
        return None

    @abstractmethod
    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        """``x W^T + b`` for ``x (..., in_features)``."""


class TorchLinear(LinearMethod):
    name = "torch"

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, layer.weight, layer.bias)


class CpuLinear(LinearMethod):
    """Float32 CPU: the matrix-vector kernel for a few rows (``skinny``), else oneDNN
    (``onednn``, on a packed weight with ``pack``), else ``F.linear``."""

    def __init__(self, skinny: CpuKernels | None, onednn: bool, pack: bool) -> None:
        self.skinny = skinny
        self.onednn = onednn
        self.pack = pack
        self.name = "onednn-packed" if onednn and pack else "onednn" if onednn else "torch"
        if skinny is not None:
            self.name += "+matvec"

    def process_weights_after_loading(self, layer: Linear, keep_plain: bool) -> None:
        if not self.onednn:
            return
        if not self.pack:
            layer.onednn_weight = layer.weight.detach()
            return
        layer.onednn_weight = torch.ops.mkldnn._reorder_linear_weight(
            layer.weight.detach(), ONEDNN_PACK_ROWS
        )
        if not keep_plain:
            layer.drop_weight()

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if (
            self.skinny is not None
            and x.dim() == 2
            and x.shape[0] <= SKINNY_MAX_ROWS
            and layer.weight.shape[0] > 0  # the plain layout is still here
        ):
            return self.skinny.skinny_linear(x.contiguous(), layer.weight, layer.bias)
        if layer.onednn_weight is not None:
            return torch.ops.mkldnn._linear_pointwise(
                x, layer.onednn_weight, layer.bias, "none", [], ""
            )
        return F.linear(x, layer.weight, layer.bias)


class Linear(nn.Linear):
    """``nn.Linear`` that multiplies the way its :class:`LinearMethod` says."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, method: LinearMethod
    ) -> None:
        super().__init__(in_features, out_features, bias)
        self.method = method
        # Int8 weights (Int8Linear): values and one scale per output row; buffers, so that
        # .to() moves them.
        self.qweight: torch.Tensor | None
        self.qscale: torch.Tensor | None
        self.register_buffer("qweight", None)
        self.register_buffer("qscale", None)
        # The weight oneDNN multiplies by: the plain one, or an opaque packed tensor (no
        # storage, no data_ptr), hence a plain attribute that state_dict and .to() never see.
        self.onednn_weight: torch.Tensor | None = None

    def drop_weight(self) -> None:
        """Free the float weight (a tied embedding keeps its own reference)."""
        self.weight = nn.Parameter(self.weight.new_empty((0, self.in_features)), False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x)
