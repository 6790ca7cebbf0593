"""convoy's C++ kernels for the CPU, compiled on first use with torch's extension builder.

The build needs a C++ compiler and the Python headers (both on any machine that can
``pip install`` packages with C extensions); it runs once and is cached under
``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``). Where it cannot be built,
:func:`load` returns ``None``, says why once, and callers keep to the pure-torch path, which
gives the same results, only slower.

:class:`CpuKernels` is the typed interface of the compiled module: the runner loads it once
and hands it to the layers, the attention backend and the sampler when it builds them.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Protocol, cast

import torch

logger = logging.getLogger(__name__)

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = [
    _CSRC / "bindings.cpp",
    _CSRC / "elementwise_cpu.cpp",
    _CSRC / "greedy_head_cpu.cpp",
    _CSRC / "paged_attention_cpu.cpp",
    _CSRC / "prefill_attention_cpu.cpp",
    _CSRC / "skinny_linear_cpu.cpp",
]
# Every file the build reads: the sources above and the headers they include (an install
# must ship all of them; tests/test_packaging.py checks the wheel against this list).
HEADERS = [_CSRC / "vec.h", _CSRC / "attention_cpu.h"]
_lock = threading.Lock()
_module: CpuKernels | None = None
_failed: str | None = None

# Set CONVOY_CPU_KERNELS=0 to never build or use them (e.g. to compare against pure torch).
ENV_SWITCH = "CONVOY_CPU_KERNELS"


class CpuKernels(Protocol):
    """The compiled module's functions (bindings.cpp documents each); float32 CPU tensors."""

    def paged_decode_attention(
        self,
        out: torch.Tensor,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        block_size: int,
        scale: float,
        window: int,
    ) -> None: ...
    def paged_prefill_attention(
        self,
        out: torch.Tensor,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        query_starts: torch.Tensor,
        positions: torch.Tensor,
        num_queries: torch.Tensor,
        block_size: int,
        scale: float,
        window: int,
    ) -> None: ...
    def write_kv(
        self,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None: ...
    def skinny_linear(
        self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor: ...
    def skinny_linear_ordered(
        self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, k_block: int
    ) -> torch.Tensor: ...
    def ordered_weight_blocks(self, w: torch.Tensor) -> torch.Tensor: ...
    def skinny_linear_ordered_blocks(
        self,
        x: torch.Tensor,
        w_blocks: torch.Tensor,
        bias: torch.Tensor | None,
        k_block: int,
        out_features: int,
    ) -> torch.Tensor: ...
    def skinny_linear_int8(
        self, x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor: ...
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor: ...
    def fused_add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> None: ...
    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor: ...
    def rotary_embedding(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> None: ...
    def argmax_rows(self, x: torch.Tensor) -> torch.Tensor: ...
    def screened_argmax(
        self,
        approx: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor,
        row_bound: torch.Tensor,
        max_candidates: int,
    ) -> torch.Tensor: ...
    def quantize_rows_int8(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...
    def screened_argmax_int8(
        self,
        acc: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor,
        w_scale: torch.Tensor,
        u: torch.Tensor,
        v: torch.Tensor,
        rows: torch.Tensor,
        max_candidates: int,
    ) -> torch.Tensor: ...


def load() -> CpuKernels | None:
    """The compiled kernels, building them on first call; ``None`` if they cannot be built."""
    global _module, _failed
    if _module is not None or _failed is not None:
        return _module
    with _lock:
        if _module is not None or _failed is not None:
            return _module
        if os.environ.get(ENV_SWITCH, "1") == "0":
            _failed = f"disabled by {ENV_SWITCH}=0"
            return None
        try:
            # Imported only to build: it pulls in setuptools, which a GPU model never needs.
            from torch.utils import cpp_extension

            logger.info("loading convoy's CPU kernels (the first time builds them)")
            module = cpp_extension.load(
                name="convoy_cpu_kernels",
                sources=[str(s) for s in _SOURCES],
                # -fopenmp: at::parallel_for is inline OpenMP, serial without it.
                # -fno-math-errno lets exp vectorize; no reassociation beyond `omp simd`.
                extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno"],
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
            _module = cast(CpuKernels, module)
        except Exception as e:  # compiler missing, headers missing, build error
            _failed = f"{type(e).__name__}: {e}"
            # One line a user reads, however long the compiler's output was.
            logger.warning(
                "convoy's CPU kernels could not be built (%s); running torch ops instead, "
                "several times slower on float32 CPU models (see docs/performance). "
                "Set %s=0 to silence this.",
                _failed.splitlines()[0][:300],
                ENV_SWITCH,
            )
        return _module


def unavailable_reason() -> str | None:
    """Why :func:`load` returned ``None`` (after it was called), else ``None``."""
    return _failed
