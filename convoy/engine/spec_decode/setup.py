"""Building the speculator an engine's config asks for: the draft model checked and loaded."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from convoy.config import ModelConfig, SpeculativeConfig
from convoy.engine.spec_decode.speculator import Speculator
from convoy.model.arch import ModelArch
from convoy.model.loader import read_config, resolve_model_path
from convoy.worker.draft_runner import DraftRunner
from convoy.worker.runner import ModelRunner


@dataclasses.dataclass(frozen=True)
class DraftModel:
    path: Path
    arch: ModelArch


def find_draft(spec: SpeculativeConfig | None, target: ModelArch) -> DraftModel | None:
    """The draft model ``spec`` names, if any; a draft must share the target's vocabulary."""
    if spec is None or not spec.uses_draft_model:
        return None
    assert spec.model is not None
    path = resolve_model_path(spec.model, None)
    arch = ModelArch.from_config(read_config(path))
    if arch.vocab_size != target.vocab_size:
        raise ValueError(
            f"the draft model's vocabulary ({arch.vocab_size} tokens) differs from the "
            f"target's ({target.vocab_size}); a draft must share the tokenizer"
        )
    return DraftModel(path, arch)


def make_speculator(
    spec: SpeculativeConfig,
    draft: DraftModel | None,
    model_config: ModelConfig,
    target: ModelArch,
    block_size: int,
    max_model_len: int,
    num_blocks: int,
    max_num_seqs: int,
) -> Speculator:
    """The speculator, its draft model loaded with its own KV cache under the target's block
    ids (``num_blocks`` of ``block_size``)."""
    runner = None
    if draft is not None:
        runner = DraftRunner(
            ModelRunner(
                # A draft's head is small: the full product beats the greedy screen's setup,
                # which pays off only for a large vocabulary projection.
                dataclasses.replace(model_config, greedy_screening=False),
                block_size,
                draft.arch,
                str(draft.path),
                max_model_len,
                num_blocks,
                max_num_seqs,
            )
        )
    return Speculator(spec, runner, target.vocab_size)
