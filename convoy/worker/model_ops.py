"""Choose, once per engine, what the model computes with (see :class:`ModelOps`): the
attention backend, the linear method, and convoy's fused CPU kernels where they apply."""

from __future__ import annotations

from typing import Any

import torch

from convoy.config import ModelConfig
from convoy.model import cpu_kernels
from convoy.model.arch import ModelArch
from convoy.model.attention import (
    AttentionBackend,
    CpuKernelAttention,
    CudaGraphAttention,
    TorchAttention,
)
from convoy.model.cpu_kernels import CpuKernels
from convoy.model.linear import (
    SKINNY_MAX_ROWS,
    CpuLinear,
    LinearMethod,
    TorchLinear,
    onednn_available,
)
from convoy.model.ops import ModelOps
from convoy.model.quantization import Int8Linear


def _cpu_float32(device: torch.device, dtype: torch.dtype) -> bool:
    # convoy's C++ kernels are float32 CPU kernels.
    return device.type == "cpu" and dtype == torch.float32


def choose_linear(
    config: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    max_num_seqs: int,
    batch_invariant: bool = False,
) -> LinearMethod:
    """``batch_invariant``: float32 CPU layers give a row bitwise the same result whatever
    the number of rows (:class:`CpuLinear`); other methods are left as they are."""
    backend = config.linear_backend
    cpu_float32 = _cpu_float32(device, dtype)
    if config.quantization == "int8":
        if device.type != "cpu":
            raise ValueError("quantization='int8' runs on the CPU only")
        return Int8Linear(cpu_kernels.load() if backend != "torch" and cpu_float32 else None)
    if backend == "torch" or not cpu_float32:
        return TorchLinear()
    if backend == "auto":
        # Packing drops the plain layout the matrix-vector kernel reads: worth it only when
        # batches can outgrow what that kernel takes.
        backend = "packed" if max_num_seqs > SKINNY_MAX_ROWS else "plain"
    return CpuLinear(
        cpu_kernels.load(),
        onednn_available(),
        pack=backend == "packed",
        batch_invariant=batch_invariant,
    )


def greedy_screen_kernels(config: ModelConfig, linear: LinearMethod) -> CpuKernels | None:
    """The kernels the greedy screen of the head runs on, when it applies: float32 CPU
    models on oneDNN with convoy's kernels loaded, screening not turned off."""
    if (
        config.greedy_screening
        and isinstance(linear, CpuLinear)
        and linear.onednn
        and linear.skinny is not None
    ):
        return linear.skinny
    return None


def choose_attention(
    config: ModelConfig,
    arch: ModelArch,
    device: torch.device,
    dtype: torch.dtype,
    block_size: int,
    pad_slot: int,
    max_num_seqs: int,
    max_model_len: int,
) -> AttentionBackend[Any, Any]:
    if device.type == "cuda" and not config.enforce_eager:
        return CudaGraphAttention(block_size, pad_slot, device, max_num_seqs, max_model_len)
    kernels = cpu_kernels.load() if _cpu_float32(device, dtype) else None
    if (
        config.attention_backend == "auto"
        and kernels is not None
        and CpuKernelAttention.supports(arch.head_dim, dtype, device)
    ):
        return CpuKernelAttention(block_size, pad_slot, device, kernels)
    # The kernels' KV write still serves the torch ops' attention.
    return TorchAttention(block_size, pad_slot, device, kv_writer=kernels)


def choose_model_ops(
    config: ModelConfig,
    arch: ModelArch,
    device: torch.device,
    dtype: torch.dtype,
    block_size: int,
    pad_slot: int,
    max_num_seqs: int,
    max_model_len: int,
    batch_invariant: bool = False,
) -> ModelOps:
    """``batch_invariant``: every row's float32 result is the same whatever else is in the
    step (speculative decoding relies on it)."""
    attention = choose_attention(
        config, arch, device, dtype, block_size, pad_slot, max_num_seqs, max_model_len
    )
    # Shared-prefix decode sums a group's attention in another order than a lone row's.
    attention.share_prefixes = not batch_invariant
    return ModelOps(
        attention=attention,
        linear=choose_linear(config, device, dtype, max_num_seqs, batch_invariant),
        kernels=cpu_kernels.load() if _cpu_float32(device, dtype) else None,
    )
