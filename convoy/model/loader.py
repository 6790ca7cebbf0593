"""Find a checkpoint (local directory or Hugging Face Hub id) and load its safetensors weights."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError
from safetensors import safe_open

from convoy.model.arch import ModelArch
from convoy.model.decoder import PACKED_MODULES, Attention, DecoderForCausalLM
from convoy.model.linear import Linear
from convoy.model.ops import ModelOps

logger = logging.getLogger(__name__)

# What a Hub download needs; optimizer states, .bin/.pt/.gguf copies are skipped.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.txt"]


class CheckpointError(ValueError):
    """The checkpoint cannot be found or does not hold what its config promises."""


def resolve_model_path(model: str, revision: str | None = None) -> Path:
    """A local directory as is; anything else is a Hub id fetched (or found in the HF cache)
    through huggingface_hub, which honours HF_HOME, HF_HUB_OFFLINE and HF_TOKEN."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"model path {model!r} is a file; expected a checkpoint directory")
    try:
        return Path(snapshot_download(model, revision=revision, allow_patterns=_HUB_PATTERNS))
    except HFValidationError as e:
        raise CheckpointError(
            f"model {model!r} is neither a local directory nor a valid Hub id: {e}"
        ) from e
    except Exception as e:  # network down, unknown repo, gated model, ...
        try:
            # A snapshot already in the cache still serves. (huggingface_hub 1.x, offline,
            # asks the Hub for a commit's file list instead of reading its cached snapshot.)
            cached = snapshot_download(
                model, revision=revision, allow_patterns=_HUB_PATTERNS, local_files_only=True
            )
            return Path(cached)
        except Exception:
            pass
        raise CheckpointError(
            f"could not find model {model!r} locally or on the Hugging Face Hub: {e}"
        ) from e


def read_config(path: Path) -> dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} has no config.json")
    with config_file.open() as f:
        config: dict[str, Any] = json.load(f)
    return config


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        with index.open() as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        others = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf")]
        hint = f" (found {others}; convert them to safetensors)" if others else ""
        raise CheckpointError(f"no *.safetensors weights in {path}{hint}")
    return files


def load_model(
    path: Path,
    arch: ModelArch,
    max_positions: int,
    device: torch.device,
    dtype: torch.dtype,
    ops: ModelOps,
    keep_plain_head: bool = False,
) -> DecoderForCausalLM:
    """Build the model without initialising it, fill every parameter from the checkpoint,
    then let each linear layer's method process its weight (pack, quantize).

    ``keep_plain_head``: the head keeps its plain weight beside whatever its method makes of
    it (the greedy screen reads it). Fails if a weight the model needs is missing or a
    checkpoint tensor has no place to go.
    """
    with torch.device("meta"):
        model = DecoderForCausalLM(arch, max_positions, ops)
    model = model.to_empty(device=device).to(dtype)
    # to_empty makes new Parameters, which breaks the tie set up in __init__; restore it.
    if arch.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary.build(device)  # rotary tables are computed, not loaded

    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                target = _place(model, params, name, arch)
                if target is None:
                    continue
                param_name, rows = target
                param = params[param_name]
                tensor = f.get_tensor(name)
                dest = param.data if rows is None else param.data.narrow(0, *rows)
                if dest.shape != tensor.shape:
                    raise CheckpointError(
                        f"{file.name}: {name} has shape {tuple(tensor.shape)}, "
                        f"the model expects {tuple(dest.shape)}"
                    )
                dest.copy_(tensor.to(dtype))
                loaded.add(name)

    missing = sorted(_expected_checkpoint_names(model, arch) - loaded)
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks weights: {missing[:8]}")
    _process_linear_weights(model, keep_plain_head)
    return model.eval()


def _process_linear_weights(model: DecoderForCausalLM, keep_plain_head: bool) -> None:
    # A weight another module reads too (a head tied to the embedding table) keeps its plain
    # layout for that module.
    shared = {
        p.data_ptr()
        for m in model.modules()
        if not isinstance(m, Linear)
        for p in m.parameters(recurse=False)
    }
    for module in model.modules():
        if isinstance(module, Linear):
            keep_plain = module.weight.data_ptr() in shared or (
                keep_plain_head and module is model.lm_head
            )
            module.method.process_weights_after_loading(module, keep_plain)


def _place(
    model: DecoderForCausalLM, params: dict[str, torch.nn.Parameter], name: str, arch: ModelArch
) -> tuple[str, tuple[int, int] | None] | None:
    """Where checkpoint tensor ``name`` goes: (parameter, rows of it or None for all)."""
    if "rotary_emb" in name:
        return None  # some checkpoints store inv_freq; we compute it
    if name == "lm_head.weight" and arch.tie_word_embeddings:
        return None  # tied: the embedding is the head
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in PACKED_MODULES:
            fused, shard = PACKED_MODULES[part]
            param_name = ".".join([*parts[:i], fused, *parts[i + 1 :]])
            if param_name not in params:
                break
            module = model.get_submodule(".".join(parts[:i]))
            if isinstance(module, Attention):
                offset, size = module.shard_sizes()[shard]
            else:
                size = params[param_name].shape[0] // 2
                offset = 0 if shard == "gate" else size
            return param_name, (offset, size)
    if name in params:
        return name, None
    raise CheckpointError(f"checkpoint tensor {name!r} does not belong to {arch.architecture}")


def _expected_checkpoint_names(model: DecoderForCausalLM, arch: ModelArch) -> set[str]:
    """The checkpoint tensor names the model needs (fused parameters by their parts' names)."""
    parts_of: dict[str, list[str]] = {}
    for part, (fused, _) in PACKED_MODULES.items():
        parts_of.setdefault(fused, []).append(part)
    expected: set[str] = set()
    for name, _ in model.named_parameters():
        if name == "lm_head.weight" and arch.tie_word_embeddings:
            continue
        *path, module, suffix = name.split(".")
        for part in parts_of.get(module, [module]):
            expected.add(".".join([*path, part, suffix]))
    return expected
