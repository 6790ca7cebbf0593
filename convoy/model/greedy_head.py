"""Greedy tokens without the full float32 vocabulary projection (float32 CPU models).

A greedy row needs only the argmax of its logits ``y = W x``, and the projection is the
biggest matmul of a small model's decode step (a 32k x 384 head is half of a 25M model's
FLOPs). On CPUs with native bfloat16 dot products (AVX512-BF16, AMX) oneDNN computes
``a = bf16(W) bf16(x)`` twice as fast as the float32 product, and reads half the bytes. Every
screened logit is within a proven bound of the float32 one:

    |a_j - y_j| <= E_j = c(C) * |x| * |w_j|   (C = hidden size; by Cauchy-Schwarz from
                                               sum_i |x_i w_ji| <= |x| |w_j|)

with c(C) from rounding x and w to bfloat16 (relative 2^-8 each), summing C products in
float32 (gamma_C = C 2^-24 / (1 - C 2^-24), for the screen and again for the float32 logit
it is compared with) and rounding the screened sum to bfloat16 (2^-8): about 3 * 2^-8. (The
screen's sum is float32 because oneDNN's bfloat16 kernels accumulate in float32: products of
two bfloat16 values are exact in float32, and AVX512-BF16's dot-product instruction rounds
each addition to nearest.)
The argmax j* of y is then among the tokens whose upper bound ``a_j + E_j`` reaches the
highest lower bound ``max_k (a_k - E_k)``: y_j* >= y_k >= a_k - E_k for the k holding it. The
kernel computes those few tokens' float32 logits from the plain weight and keeps the first
maximum, so the token is the float32 argmax (up to the summation order, which already differs
between GEMM libraries). Rows it cannot settle cheaply (too many tokens within reach: near-flat
logits; a non-finite value) come back as -1 and go through the full float32 projection.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from convoy.model.layers import ONEDNN_PACK_ROWS, onednn_available

# More tokens than this within reach of the top and the row is computed in full instead
# (each costs a C-float dot product from a weight row not in cache).
MAX_CANDIDATES = 1024


def fast_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), so oneDNN's bfloat16
    matmul beats its float32 one; elsewhere it emulates bfloat16 and the screen would cost
    more than it saves."""
    if not (onednn_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def error_factor(hidden_size: int) -> float:
    """c(C) of the module docstring, rounded up: |screened - float32 logit| <= c |x| |w_j|."""
    u16, u32 = 2.0**-8, 2.0**-24
    gamma = hidden_size * u32 / (1 - hidden_size * u32)
    rounding_inputs = 2 * u16 + u16 * u16  # (1 + 2^-8)^2 - 1
    screen_sum = gamma * (1 + u16) ** 2
    screen_output = u16 * (1 + gamma) * (1 + u16) ** 2
    float32_logit = gamma
    c = rounding_inputs + screen_sum + screen_output + float32_logit
    # Headroom for the float arithmetic of the bounds themselves (E_j and a_j +- E_j round to
    # float: relative 2^-24 of values at most ~100 E_j, since E_j >= c |a_j| roughly).
    return c * (1 + 2.0**-10)


class ScreenedGreedyHead:
    """The argmax of ``hidden @ weight.T`` per row, via a bfloat16 screen (module docstring).

    ``weight`` is the float32 head, kept as it is (the few candidates' logits read its rows);
    the screen multiplies by a bfloat16 copy in oneDNN's blocked layout (half its size).
    """

    def __init__(self, weight: torch.Tensor, kernel: Any) -> None:
        self.kernel = kernel
        self.weight = weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(
            self.weight.bfloat16(), ONEDNN_PACK_ROWS
        )
        norms = self.weight.double().norm(dim=1) * error_factor(self.weight.shape[1])
        # Rounded up to float, so the bound never shrinks.
        self.row_bound = torch.nextafter(norms.float(), torch.tensor(math.inf))

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden (N, C)`` float32 -> ``(N,)`` int64 token ids, -1 where a row needs the full
        projection."""
        x = hidden.contiguous()
        approx = torch.ops.mkldnn._linear_pointwise(x.bfloat16(), self.packed, None, "none", [], "")
        return self.kernel.screened_argmax(approx, x, self.weight, self.row_bound, MAX_CANDIDATES)
