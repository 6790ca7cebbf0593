"""Batch-invariant float32 CPU linear layers: which summation order oneDNN uses, found once.

Speculative decoding needs a row's logits to be bitwise the same whatever other rows share the
step. oneDNN on a packed weight gives a row the same result for any number of rows above one,
computing each output as a chain of fused multiply-adds over the inputs within consecutive
blocks of ``k_block`` of them, the blocks' sums added in order, then the bias. Its heuristics
pick ``k_block`` from ``in_features`` (on an AVX-512 Xeon: all of K up to 512, 512 up to 1024,
1024 above) and may pick otherwise on another CPU, so :func:`calibrate` tries candidates on
random data and keeps the one with which convoy's ordered matrix-vector kernel
(``skinny_linear_ordered``) reproduces oneDNN bitwise. A single row is the exception: oneDNN
then sums with a different order above K = 1024 (blocks of 512, or split over threads where
the output is narrow), which is why a layer never gives oneDNN fewer than
``SKINNY_MAX_ROWS + 1`` rows in this mode: the kernel takes them, or they are padded.

``F.linear`` (MKL on x86) is not row-count invariant: one row and two rows already differ.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch

from convoy.model.cpu_kernels import CpuKernels

logger = logging.getLogger(__name__)

# Row counts at which oneDNN's results are checked (it serves more rows than the kernel takes,
# up to prefill chunks): every row of each must equal the kernel's, or one reference's.
PROBE_ROWS = (5, 8, 17, 64, 65, 130)
# Output features of the probe's random weight.
PROBE_OUTPUTS = 256


@dataclass(frozen=True)
class Calibration:
    """What makes layers of one ``in_features`` batch-invariant.

    ``k_block``: with it the ordered kernel equals packed oneDNN bitwise at every probed row
    count; ``None`` if no candidate did. ``onednn_invariant``: packed oneDNN gives every row
    the same result at all probed row counts (of five rows and more)."""

    in_features: int
    k_block: int | None
    onednn_invariant: bool


_lock = threading.Lock()
_cache: dict[tuple[int, int, bool], Calibration] = {}


def onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x W^T + b`` by oneDNN on ``packed`` (from ``torch.ops.mkldnn._reorder_linear_weight``)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def k_block_candidates(in_features: int) -> list[int]:
    """Block sizes to try, likeliest first: all of K, oneDNN's usual sizes, then every
    multiple of 64 below K."""
    named = [in_features, 512, 1024, 256, 2048, 128, 768, 384, 1536, 4096, 64]
    tried = [k for k in named if k <= in_features]
    tried += range(64, in_features, 64)
    return list(dict.fromkeys(tried))


def _probe_data(in_features: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(in_features)  # leaves the global generator alone
    w = torch.randn(PROBE_OUTPUTS, in_features, generator=gen)
    bias = torch.randn(PROBE_OUTPUTS, generator=gen)
    x = torch.randn(max(PROBE_ROWS), in_features, generator=gen)
    return x, w, bias


def calibrate(kernels: CpuKernels | None, in_features: int, pack_rows: int) -> Calibration:
    """The :class:`Calibration` for layers of ``in_features`` inputs (oneDNN available),
    probed once per ``in_features`` and torch thread count (oneDNN may split the work, and so
    the sums, otherwise on more threads). ``pack_rows``: the row count the weight is packed
    for. Says once, per ``in_features``, what a layer gives up where no ``k_block`` fits."""
    key = (in_features, torch.get_num_threads(), kernels is not None)
    with _lock:
        found = _cache.get(key)
        if found is None:
            found = _cache[key] = _probe(kernels, in_features, pack_rows)
            if found.k_block is None:
                logger.info(
                    "batch-invariant linear, in_features=%d: %s",
                    in_features,
                    _fallback(kernels is not None, found.onednn_invariant),
                )
        return found


def _fallback(have_kernels: bool, onednn_invariant: bool) -> str:
    if have_kernels and onednn_invariant:
        return (
            "no k_block of the ordered kernel reproduces oneDNN on this CPU; these layers run "
            "oneDNN at every row count (slower for 1-4 rows)"
        )
    if have_kernels:
        return (
            "oneDNN is not row-count invariant on this CPU; the ordered kernel takes every "
            "row count (slower for many rows)"
        )
    if onednn_invariant:
        return "convoy's kernels are not built; oneDNN takes every row count"
    return (
        "oneDNN is not row-count invariant on this CPU and convoy's kernels are not built: "
        "these layers are NOT batch-invariant"
    )


def _probe(kernels: CpuKernels | None, in_features: int, pack_rows: int) -> Calibration:
    x, w, bias = _probe_data(in_features)
    packed = torch.ops.mkldnn._reorder_linear_weight(w, pack_rows)
    with torch.inference_mode():
        # With and without the bias, which must come after the sums, as the kernel adds it.
        def onednn(rows: int, with_bias: bool) -> torch.Tensor:
            return onednn_linear(x[:rows], packed, bias if with_bias else None)

        reference = {b: onednn(len(x), b) for b in (False, True)}
        got = [(m, i % 2 == 1, onednn(m, i % 2 == 1)) for i, m in enumerate(PROBE_ROWS)]
        onednn_invariant = all(torch.equal(y, reference[b][:m]) for m, b, y in got)
        got += [(len(x), b, reference[b]) for b in (False, True)]
        if kernels is None:
            return Calibration(in_features, None, onednn_invariant)
        blocks = kernels.ordered_weight_blocks(w)

        def ordered(rows: int, with_bias: bool, k_block: int) -> torch.Tensor:
            return kernels.skinny_linear_ordered_blocks(
                x[:rows], blocks, bias if with_bias else None, k_block, PROBE_OUTPUTS
            )

        for k_block in k_block_candidates(in_features):
            first = got[0]  # a cheap look first: most candidates fail on any row
            if not torch.equal(ordered(first[0], first[1], k_block), first[2]):
                continue
            full = {b: ordered(len(x), b, k_block) for b in (False, True)}
            if all(torch.equal(y, full[b][:m]) for m, b, y in got):
                return Calibration(in_features, k_block, onednn_invariant)
    return Calibration(in_features, None, onednn_invariant)


_disagreed: set[tuple[int, int]] = set()


def layer_agrees(
    kernels: CpuKernels,
    weight: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor | None,
    k_block: int,
) -> bool:
    """Whether the ordered kernel with ``k_block`` equals oneDNN bitwise on this layer's own
    weight (``packed``: its oneDNN copy), on random rows: the check :func:`calibrate` made for
    its in_features, repeated on the layer's out_features (a heuristic could look at them
    too). Says once per shape when it does not."""
    gen = torch.Generator().manual_seed(weight.shape[1])
    x = torch.randn(PROBE_ROWS[0], weight.shape[1], generator=gen)
    with torch.inference_mode():
        ordered = kernels.skinny_linear_ordered(x, weight.contiguous(), bias, k_block)
        agrees = torch.equal(ordered, onednn_linear(x, packed, bias))
    shape = (weight.shape[1], weight.shape[0])
    if not agrees and shape not in _disagreed:
        _disagreed.add(shape)
        logger.info(
            "batch-invariant linear, in_features=%d, out_features=%d: the ordered kernel "
            "does not reproduce oneDNN on this layer; it runs oneDNN at every row count",
            *shape,
        )
    return agrees
