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
the last bits, differ, and with it a row's result depends on how many rows share the step.
:class:`CpuLinear` with ``batch_invariant`` removes that dependence (speculative decoding
needs it): oneDNN on the packed weight for more than ``SKINNY_MAX_ROWS`` rows, and for fewer
convoy's ordered matrix-vector kernel, which sums in oneDNN's order
(:mod:`convoy.model.batch_invariant` finds it when the weights are processed).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn
from torch.nn import functional as F

from convoy.model.batch_invariant import calibrate, layer_agrees, onednn_linear
from convoy.model.cpu_kernels import CpuKernels

# At most this many rows go through convoy's matrix-vector kernel; more rows reuse each weight
# element enough for a GEMM library to win.
SKINNY_MAX_ROWS = 4
# Batch-invariant layers run the ordered kernel up to this many rows: it reproduces oneDNN's
# sums at any row count, and is the faster of the two for a few rows, such as a speculating
# decode's verify rows (crossover measured in docs/performance).
ORDERED_MAX_ROWS = 8
# The row count oneDNN tunes a packed weight's layout for; any row count can use it.
ONEDNN_PACK_ROWS = 64
# Batch-invariant layers that oneDNN cannot serve invariantly sum in blocks of this many inputs
# (any fixed order is invariant; blocks keep the float32 error of long rows down).
ORDERED_K_BLOCK = 512


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
    (``onednn``, on a packed weight with ``pack``), else ``F.linear``.

    ``batch_invariant``: a row's result is bitwise the same whatever the number of rows
    (``pack`` is then implied). With oneDNN and the kernels (``onednn-packed+ordered-matvec``):
    oneDNN on the packed weight for more than ``SKINNY_MAX_ROWS`` rows, the ordered kernel for
    fewer; a layer whose ``in_features`` oneDNN sums in an order the kernel cannot reproduce
    (another CPU) runs oneDNN for every row count instead, fewer rows padded. Only oneDNN
    (``onednn-packed+padded-rows``): that. Only the kernels (``ordered-matvec``): the ordered
    kernel for every row count. Neither: ``F.linear``, which is not batch-invariant."""

    def __init__(
        self, skinny: CpuKernels | None, onednn: bool, pack: bool, batch_invariant: bool = False
    ) -> None:
        self.skinny = skinny
        self.onednn = onednn
        self.pack = pack or (batch_invariant and onednn)
        self.batch_invariant = batch_invariant
        self.name = "onednn-packed" if onednn and self.pack else "onednn" if onednn else "torch"
        if batch_invariant:
            if skinny is not None:
                self.name = "onednn-packed+ordered-matvec" if onednn else "ordered-matvec"
            elif onednn:
                self.name += "+padded-rows"
        elif skinny is not None:
            self.name += "+matvec"

    def process_weights_after_loading(self, layer: Linear, keep_plain: bool) -> None:
        if self.batch_invariant:
            self._process_batch_invariant(layer, keep_plain)
            return
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

    def _process_batch_invariant(self, layer: Linear, keep_plain: bool) -> None:
        weight = layer.weight.detach()
        bias = None if layer.bias is None else layer.bias.detach()
        k_block: int | None = None
        if self.onednn:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, ONEDNN_PACK_ROWS)
            found = calibrate(self.skinny, layer.in_features, ONEDNN_PACK_ROWS)
            k_block = found.k_block if self.skinny is not None else None
            if (
                self.skinny is not None
                and k_block is not None
                and not layer_agrees(self.skinny, weight, packed, bias, k_block)
            ):
                k_block = None
            if self.skinny is not None and k_block is None and not found.onednn_invariant:
                k_block = ORDERED_K_BLOCK  # the kernel for every row count; oneDNN unused
            else:
                layer.onednn_weight = packed
        elif self.skinny is not None:
            k_block = ORDERED_K_BLOCK
        layer.ordered_k_block = k_block
        if keep_plain or (k_block is None and layer.onednn_weight is None):
            return  # the kernel reads the plain weight, or F.linear does
        if k_block is not None and self.skinny is not None:
            # The kernel's own layout, about twice as fast as reading the plain one.
            layer.ordered_weight = self.skinny.ordered_weight_blocks(weight)
        layer.drop_weight()

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if self.batch_invariant:
            if x.dim() != 2:
                out = self._apply_batch_invariant(layer, x.reshape(-1, x.shape[-1]))
                return out.view(*x.shape[:-1], out.shape[-1])
            return self._apply_batch_invariant(layer, x)
        if (
            self.skinny is not None
            and x.dim() == 2
            and x.shape[0] <= SKINNY_MAX_ROWS
            and layer.weight.shape[0] > 0  # the plain layout is still here
        ):
            return self.skinny.skinny_linear(x.contiguous(), layer.weight, layer.bias)
        if layer.onednn_weight is not None:
            return onednn_linear(x, layer.onednn_weight, layer.bias)
        return F.linear(x, layer.weight, layer.bias)

    def _apply_batch_invariant(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        k_block = layer.ordered_k_block
        if (
            self.skinny is not None
            and k_block is not None
            and (rows <= ORDERED_MAX_ROWS or layer.onednn_weight is None)
        ):
            x = x.contiguous()
            if layer.ordered_weight is not None:
                return self.skinny.skinny_linear_ordered_blocks(
                    x, layer.ordered_weight, layer.bias, k_block, layer.out_features
                )
            return self.skinny.skinny_linear_ordered(x, layer.weight, layer.bias, k_block)
        if layer.onednn_weight is not None:
            if rows <= SKINNY_MAX_ROWS:
                # oneDNN sums a single row in another order than several (see
                # batch_invariant): give it as many rows as it is checked for.
                padded = x.new_zeros(SKINNY_MAX_ROWS + 1, x.shape[1])
                padded[:rows] = x
                return onednn_linear(padded, layer.onednn_weight, layer.bias)[:rows]
            return onednn_linear(x, layer.onednn_weight, layer.bias)
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
        # Batch-invariant CpuLinear: the ordered kernel's block size (None: it is not used),
        # and the weight in the kernel's own layout where the plain one is not kept. A buffer
        # (moved by .to(), counted by the memory report) but not saved with the state_dict.
        self.ordered_k_block: int | None = None
        self.ordered_weight: torch.Tensor | None
        self.register_buffer("ordered_weight", None, persistent=False)

    def drop_weight(self) -> None:
        """Free the float weight (a tied embedding keeps its own reference)."""
        self.weight = nn.Parameter(self.weight.new_empty((0, self.in_features)), False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x)
