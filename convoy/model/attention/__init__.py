"""Paged attention backends: one interface (:class:`AttentionBackend`), one class each.

- :class:`TorchAttention`: torch ops on contexts gathered from the cache (any device);
- :class:`CpuKernelAttention`: convoy's C++ kernels reading the cache in place (float32 CPU);
- :class:`CudaGraphAttention`: torch ops, decode steps replayed from CUDA graphs.

The runner picks one when it builds the model; each builds its own metadata from the step's
:class:`AttentionBatch`.
"""

from convoy.model.attention.base import AttentionBackend, AttentionMetadata
from convoy.model.attention.batch import AttentionBatch
from convoy.model.attention.cpu import CpuKernelAttention
from convoy.model.attention.cuda import CudaGraphAttention
from convoy.model.attention.torch_ops import TorchAttention

__all__ = [
    "AttentionBackend",
    "AttentionBatch",
    "AttentionMetadata",
    "CpuKernelAttention",
    "CudaGraphAttention",
    "TorchAttention",
]
