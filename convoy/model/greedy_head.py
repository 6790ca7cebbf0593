"""Greedy tokens without the full float32 vocabulary projection (float32 CPU models).

A greedy row needs only the argmax of its logits ``y = W x``, and the projection is the
biggest matmul of a small model's decode step (a 32k x 384 head is half of a 25M model's
FLOPs). A screen computes every logit cheaply, ``a_j``, with a proven bound ``E_j`` on its
distance from the float32 one, ``|a_j - y_j| <= E_j``. The argmax j* of y is then among the
tokens whose upper bound ``a_j + E_j`` reaches the highest lower bound ``max_k (a_k - E_k)``
(y_j* >= y_k >= a_k - E_k for the k holding it). The kernel computes those few tokens'
float32 logits from the plain weight and keeps the first maximum, so the token is the float32
argmax (up to the summation order, which already differs between GEMM libraries). Rows it
cannot settle cheaply (too many tokens within reach of the top: near-flat logits; a
non-finite value) come back as -1 and go through the full float32 projection.

Two screens, by what the CPU multiplies natively (:func:`screen_kind`):

* **int8** (AVX512-VNNI, AVX-VNNI, AMX-INT8, for CPUs without native bfloat16: oneDNN's int8
  product runs several times faster than its float32 one, and reads a quarter of the float32
  bytes). Each head row is stored as int8
  with its own scale, ``w_j = s_j q_j + r_j``; each step quantizes each hidden row the same way,
  ``x = s_x q_x + r_x``, and ``acc = q_x . q_j`` is exact in int32. With ``x^ = s_x q_x``:

      x . w_j - s_x s_j acc_j = x^ . r_j + r_x . w_j,  so
      |y_j - a_j| <= |x^| |r_j| + |r_x| |w_j| + gamma_C |x| |w_j| + rounding

  (Cauchy-Schwarz on each term; gamma_C = C 2^-24 / (1 - C 2^-24) for the float32 logit's own
  summation; "rounding" covers computing ``a_j = acc_j (s_x s_j)`` and the bounds in float,
  2^-21 |x^| (|w_j| + |r_j|)). The residual norms are the actual ones, per row and per token,
  not worst cases: for a Gaussian-like row ~0.7% of |x| |w_j| each.
* **bfloat16** (AVX512-BF16 or AMX without VNNI): ``a = bf16(W) bf16(x)`` by oneDNN, reading
  half the float32 product's bytes, with ``E_j = c(C) |x| |w_j|`` (:func:`error_factor`): c from
  rounding x and w to bfloat16 (relative 2^-8 each), summing C products in float32 (gamma_C,
  for the screen and again for the float32 logit) and rounding the screened sum to bfloat16
  (2^-8), about 3 * 2^-8. (oneDNN's bfloat16 kernels accumulate in float32: products of two
  bfloat16 values are exact in float32, and AVX512-BF16's dot-product instruction rounds each
  addition to nearest.)

CPUs with both (native bfloat16 and int8 dot products) hold both and route each row
(:class:`MixedGreedyHead`): int8 where its bound is about as tight as bfloat16's, which it is
for rows without outlier dimensions. Elsewhere (plain AVX2) both products are emulated and
there is no screen.
"""

from __future__ import annotations

import math

import torch

from convoy.model.cpu_kernels import CpuKernels
from convoy.model.linear import ONEDNN_PACK_ROWS, onednn_available

# More tokens than this within reach of the top and the row is computed in full instead
# (each costs a C-float dot product from a weight row not in cache).
MAX_CANDIDATES = 1024


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def fast_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), so oneDNN's bfloat16
    matmul beats its float32 one; elsewhere it emulates bfloat16."""
    if not (onednn_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


def fast_int8() -> bool:
    """Whether this CPU has int8 dot-product instructions (VNNI, AMX), which oneDNN's int8
    matmul (``torch._int_mm``) uses."""
    return onednn_available() and bool(_cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def screen_kind() -> str | None:
    """The screen for this CPU: ``"mixed"`` (:class:`MixedGreedyHead`) where it multiplies
    both bfloat16 and int8 natively, else ``"bfloat16"`` or ``"int8"``, whichever it has,
    else ``None`` (an emulated product would cost more than the screen saves)."""
    bf16, int8 = fast_bf16(), fast_int8()
    if bf16 and int8:
        return "mixed"
    if bf16:
        return "bfloat16"
    if int8:
        return "int8"
    return None


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
    """The argmax of ``hidden @ weight.T`` per row, via a screen (module docstring).

    ``weight`` is the float32 head, kept as it is (the few candidates' logits read its rows).
    """

    def __init__(self, weight: torch.Tensor, kernel: CpuKernels) -> None:
        self.kernel = kernel
        self.weight = weight.detach()

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden (N, C)`` float32 -> ``(N,)`` int64 token ids, -1 where a row needs the full
        projection."""
        raise NotImplementedError

    def own_tensors(self) -> list[torch.Tensor]:
        """What the screen holds beside the head itself (for the memory report)."""
        raise NotImplementedError


class Bf16GreedyHead(ScreenedGreedyHead):
    """The bfloat16 screen: a bfloat16 copy of the head in oneDNN's blocked layout (half its
    size) and one bound factor per token."""

    def __init__(self, weight: torch.Tensor, kernel: CpuKernels) -> None:
        super().__init__(weight, kernel)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(
            self.weight.bfloat16(), ONEDNN_PACK_ROWS
        )
        norms = self.weight.double().norm(dim=1) * error_factor(self.weight.shape[1])
        # Rounded up to float, so the bound never shrinks.
        self.row_bound = torch.nextafter(norms.float(), torch.tensor(math.inf))

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.contiguous()
        approx = torch.ops.mkldnn._linear_pointwise(x.bfloat16(), self.packed, None, "none", [], "")
        return self.kernel.screened_argmax(approx, x, self.weight, self.row_bound, MAX_CANDIDATES)

    def own_tensors(self) -> list[torch.Tensor]:
        return [self.packed, self.row_bound]


class Int8GreedyHead(ScreenedGreedyHead):
    """The int8 screen: the head as int8 rows with per-row scales (a quarter of its size), and
    per token its scale, residual norm and norm."""

    # Rows quantized at a time when the screen is built (in float64: bounds the temporaries).
    BUILD_ROWS = 4096

    def __init__(self, weight: torch.Tensor, kernel: CpuKernels) -> None:
        super().__init__(weight, kernel)
        vocab, hidden = self.weight.shape
        q = torch.empty((vocab, hidden), dtype=torch.int8)
        self.scale = torch.empty(vocab)
        self.residual_norm = torch.empty(vocab)
        self.norm = torch.empty(vocab)
        up = torch.tensor(math.inf)
        for start in range(0, vocab, self.BUILD_ROWS):
            rows = slice(start, start + self.BUILD_ROWS)
            w = self.weight[rows].double()
            scale = (w.abs().amax(dim=1) / 127).float()
            # A zero (or subnormal-scaled) row: q = 0, its residual is the row itself.
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            qw = torch.round(w / scale.double()[:, None]).clamp_(-127, 127)
            q[rows] = qw.to(torch.int8)
            self.scale[rows] = scale
            # w - s q is exact in float64 (a float times a 7-bit integer, then a difference of
            # nearby values); norms rounded up to float so the bound never shrinks.
            resid = (w - qw * scale.double()[:, None]).norm(dim=1) * (1 + 2.0**-30)
            self.residual_norm[rows] = torch.nextafter(resid.float(), up)
            self.norm[rows] = torch.nextafter((w.norm(dim=1) * (1 + 2.0**-30)).float(), up)
        # (vocab, hidden); torch._int_mm multiplies by its transposed view, which oneDNN reads
        # as is.
        self.qweight = q

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.contiguous()
        return self.screen(x, *self.kernel.quantize_rows_int8(x))

    def screen(self, x: torch.Tensor, qx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The tokens of rows ``x`` from their quantization (``quantize_rows_int8``)."""
        acc = torch._int_mm(qx, self.qweight.t())  # (N, V) int32, exact
        return self.kernel.screened_argmax_int8(
            acc,
            x,
            self.weight,
            self.scale,
            self.residual_norm,
            self.norm,
            rows,
            MAX_CANDIDATES,
        )

    def own_tensors(self) -> list[torch.Tensor]:
        return [self.qweight, self.scale, self.residual_norm, self.norm]


class MixedGreedyHead(ScreenedGreedyHead):
    """Both screens, for CPUs that have both natively: each row takes the int8 one unless its
    int8 bound would be more than ``WIDTH_LIMIT`` times as wide as the bfloat16 one.

    The int8 screen reads half the bfloat16 screen's bytes: on a single stream, where the
    head's product is bound by reading it, it is the faster one (in full batches the two are
    level). But its bound follows each hidden row's shape: a row whose largest
    element dwarfs the rest (outlier dimensions) gets a coarse scale, and its bound widens with
    it, while the bfloat16 bound stays ~3 * 2^-8 |x| |w_j| whatever the row. Such rows go to
    the bfloat16 screen, so neither screen ends up computing many candidates.
    """

    # int8 bound, per |w_j|: P rho + Q (rho: the head's median |r_j| / |w_j|), against the
    # bfloat16 one, c |x|. Gaussian-like rows: ~1.2x; a row 15x its RMS at its largest: ~3.5x.
    WIDTH_LIMIT = 2.0

    def __init__(self, weight: torch.Tensor, kernel: CpuKernels) -> None:
        super().__init__(weight, kernel)
        self.int8 = Int8GreedyHead(weight, kernel)
        self.bf16 = Bf16GreedyHead(weight, kernel)
        ratio = self.int8.residual_norm / self.int8.norm.clamp(min=torch.finfo().tiny)
        self.rho = float(ratio.median())
        self.limit = self.WIDTH_LIMIT * error_factor(weight.shape[1])

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.contiguous()
        qx, rows = self.kernel.quantize_rows_int8(x)
        # NaN (a non-finite row) compares false: the bfloat16 screen returns -1 for it.
        tight = rows[:, 1] * self.rho + rows[:, 2] <= self.limit * rows[:, 3]
        n_tight = int(tight.sum())
        if n_tight == x.shape[0]:
            return self.int8.screen(x, qx, rows)
        if n_tight == 0:
            return self.bf16(x)
        out = torch.empty(x.shape[0], dtype=torch.long)
        out[tight] = self.int8.screen(x[tight], qx[tight], rows[tight])
        out[~tight] = self.bf16(x[~tight])
        return out

    def own_tensors(self) -> list[torch.Tensor]:
        return self.int8.own_tensors() + self.bf16.own_tensors()


def make_greedy_head(weight: torch.Tensor, kernel: CpuKernels) -> ScreenedGreedyHead | None:
    """The screen for this CPU (:func:`screen_kind`) over ``weight``, or ``None`` where none
    pays. (A head with non-finite values has no int8 scales: it gets no int8 screen.)"""
    kind = screen_kind()
    finite = bool(torch.isfinite(weight).all())
    if kind == "mixed" and finite:
        return MixedGreedyHead(weight, kernel)
    if kind in ("mixed", "bfloat16"):
        return Bf16GreedyHead(weight, kernel)
    if kind == "int8" and finite:
        return Int8GreedyHead(weight, kernel)
    return None
