"""The device the engines run on, its measured peaks, and the cached random checkpoints."""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convoy.bench import roofline

TOKENIZER_VOCAB = 32000
TOKENIZER_CORPUS_BYTES = 8_000_000


@dataclass(frozen=True)
class Target:
    """Where the engines run: the device and its precision (float32 on the CPU, bfloat16 on a
    GPU unless ``--dtype`` says otherwise)."""

    device: str = "cpu"
    dtype: str = "float32"

    @property
    def label(self) -> str:
        return {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}[self.dtype]

    @property
    def dtype_bytes(self) -> int:
        return 4 if self.dtype == "float32" else 2

    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, self.dtype)

    def synchronize(self) -> None:
        """Wait for the GPU's queued work, so that a clock read after it counts it."""
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()


CPU = Target()


def machine_info() -> dict[str, Any]:
    """CPU model, core count, torch version and threads."""
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "affinity_cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def machine_line(machine: dict[str, Any]) -> str:
    """:func:`machine_info` (and the GPU, when there is one) as the report's first line."""
    return (
        f"CPU: {machine['cpu']} | cores: {machine['cpu_count']} "
        f"(affinity {machine['affinity_cores']}) | torch {machine['torch']}, "
        f"{machine['torch_threads']} threads | Python {machine['python']}"
        + (f" | GPU: {machine['gpu']}" if "gpu" in machine else "")
    )


def measure_peaks(roofline_size_mb: int, target: Target = CPU) -> dict[str, float]:
    """The memory bandwidth and matmul peak (at the engines' dtype) of the device the engines
    run on, now."""
    matmul_n = 2048 if target.device == "cpu" else 8192  # a GPU needs a big product to fill
    return {
        "bandwidth_gbs": roofline.measure_memory_bandwidth(roofline_size_mb, device=target.device),
        "peak_gflops": roofline.measure_matmul_flops(
            matmul_n, device=target.device, dtype=target.torch_dtype()
        ),
    }


def peaks_line(peaks: dict[str, float], target: Target) -> str:
    where = f"{target.device} {target.dtype}"
    return (
        f"roofline: bandwidth {peaks['bandwidth_gbs']:.1f} GB/s, "
        f"{where} matmul peak {peaks['peak_gflops']:.1f} GFLOP/s"
    )


def ensure_model(size: str, cache_dir: Path) -> Path:
    """The cached random-weight Llama checkpoint of ``size`` (``25m``/``200m``), built if needed.

    The 32k tokenizer (:func:`convoy.checkpoints.train_tokenizer` on
    :func:`convoy.checkpoints.python_corpus`) is cached beside it and shared by both sizes.
    """
    from transformers import AutoTokenizer

    from convoy import checkpoints

    preset = {"25m": checkpoints.LLAMA_25M, "200m": checkpoints.LLAMA_200M}[size]
    tok_dir = cache_dir / f"tokenizer-{TOKENIZER_VOCAB // 1000}k"
    model_dir = cache_dir / f"llama-{size}-random"
    if not (tok_dir / "tokenizer.json").is_file():
        print(f"training the {TOKENIZER_VOCAB} tokenizer into {tok_dir} ...", flush=True)
        tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".tok-"))
        checkpoints.train_tokenizer(
            checkpoints.python_corpus(TOKENIZER_CORPUS_BYTES), TOKENIZER_VOCAB, out_dir=tmp
        )
        os.replace(tmp, tok_dir) if not tok_dir.exists() else shutil.rmtree(tmp)
    if not (model_dir / "config.json").is_file():
        print(f"writing the random {size} checkpoint into {model_dir} ...", flush=True)
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
        tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".model-"))
        checkpoints.write_random_checkpoint(
            tmp, "LlamaForCausalLM", **preset, seed=0, tokenizer=tokenizer
        )
        os.replace(tmp, model_dir) if not model_dir.exists() else shutil.rmtree(tmp)
    return model_dir


def token_space(model_dir: Path) -> tuple[int, list[int]]:
    """(vocabulary random prompts draw from, special ids they avoid), as convoy bench does."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    config = json.loads((model_dir / "config.json").read_text())
    vocab = min(int(config["vocab_size"]), len(tok))
    special = set(tok.all_special_ids)
    special.update(i for i, t in tok.added_tokens_decoder.items() if t.special)
    return vocab, sorted(int(i) for i in special)
