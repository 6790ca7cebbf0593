"""convoy's C++ kernels for the CPU, compiled on first use with torch's extension builder.

The build needs a C++ compiler and the Python headers (both on any machine that can
``pip install`` packages with C extensions); it takes about a minute once and is cached
under ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``). Where it cannot be
built, :func:`load` returns ``None`` and callers keep to the pure-torch path, which gives the
same results, only slower.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from types import ModuleType

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
_lock = threading.Lock()
_module: ModuleType | None = None
_failed: str | None = None

# Set CONVOY_CPU_KERNELS=0 to never build or use them (e.g. to compare against pure torch).
ENV_SWITCH = "CONVOY_CPU_KERNELS"


def load() -> ModuleType | None:
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
            from torch.utils import cpp_extension

            logger.info("loading convoy's CPU kernels (the first time builds them, ~1 min)")
            _module = cpp_extension.load(
                name="convoy_cpu_kernels",
                sources=[str(s) for s in _SOURCES],
                # -fopenmp: at::parallel_for is inline OpenMP, serial without it.
                # -fno-math-errno lets exp vectorize; no reassociation beyond `omp simd`.
                extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno"],
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
        except Exception as e:  # compiler missing, headers missing, build error
            _failed = f"{type(e).__name__}: {e}"
            logger.warning("convoy's CPU kernels could not be built; using torch ops (%s)", _failed)
        return _module


def unavailable_reason() -> str | None:
    """Why :func:`load` returned ``None`` (after it was called), else ``None``."""
    return _failed
