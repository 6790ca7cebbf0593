"""Where and in what precision the model runs, and how much KV cache fits."""

from __future__ import annotations

import torch

from convoy.config import CacheConfig, ModelConfig
from convoy.model.arch import ModelArch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(config: ModelConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is available")
    return torch.device(config.device)


def resolve_dtype(config: ModelConfig, device: torch.device) -> torch.dtype:
    if config.dtype == "auto":
        # float32 on the CPU: exact against transformers, and where the CPU kernels apply.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[config.dtype]


def kv_block_bytes(arch: ModelArch, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one KV block takes across all layers (keys and values)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * arch.num_layers * block_size * arch.num_kv_heads * arch.head_dim * itemsize


def num_kv_blocks_for(
    cache: CacheConfig,
    block_size: int,
    arch: ModelArch,
    dtype: torch.dtype,
    draft: ModelArch | None = None,
) -> int:
    """``num_kv_blocks`` if set, else as many ``block_size``-token blocks as
    ``kv_cache_memory_gb`` holds (with a draft model, the draft's share of each block too:
    it keeps its own keys and values under the same block ids)."""
    if cache.num_kv_blocks is not None:
        return cache.num_kv_blocks
    per_block = kv_block_bytes(arch, block_size, dtype)
    if draft is not None:
        per_block += kv_block_bytes(draft, block_size, dtype)
    return max(1, int(cache.kv_cache_memory_gb * 2**30) // per_block)
