"""What a model computes with, chosen once by the runner and passed to the model's
constructor: every layer takes its part of it when it is built, so nothing is attached to a
built model afterwards."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from convoy.model.attention.base import AttentionBackend
from convoy.model.cpu_kernels import CpuKernels
from convoy.model.linear import LinearMethod


@dataclass(frozen=True)
class ModelOps:
    attention: AttentionBackend[Any, Any]
    linear: LinearMethod
    # convoy's fused CPU kernels for norms, rotary embedding and the MLP activation (float32
    # CPU models); None: torch ops.
    kernels: CpuKernels | None = None

    def describe(self) -> dict[str, str]:
        """Which backend runs each part: for the startup log and metrics."""
        return {
            "attention": self.attention.name,
            "linear": self.linear.name,
            "elementwise": "cpu-kernels" if self.kernels is not None else "torch",
        }
