"""Shared fixtures: a small locally trained tokenizer and tiny random checkpoints.

Nothing is downloaded: the tokenizer is trained on the Python standard library's sources and
the checkpoints get random weights from transformers' own model classes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# Every engine built in the tests checks the KV pool's integrity after every step.
os.environ["CONVOY_CHECK_INTEGRITY"] = "1"

from convoy.checkpoints import python_corpus, train_tokenizer, write_random_checkpoint
from convoy.model import cpu_kernels


def pytest_configure(config: pytest.Config) -> None:
    # Build convoy's C++ kernels once, up front: a `convoy serve` subprocess started by a test
    # then loads the cached build instead of spending its startup deadline compiling.
    cpu_kernels.load()


TOKENIZER_VOCAB = 512

# Tiny shapes: GQA (4 heads over 2 kv heads) unless a case says otherwise.
TINY: dict[str, Any] = dict(
    vocab_size=TOKENIZER_VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    max_position_embeddings=1024,
    # Wider than the usual 0.02 so logits are well separated: greedy ties that float32
    # rounding could flip become vanishingly rare.
    init_std=0.1,
)

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

# name -> (architecture, overrides). Covers tied/untied, GQA/MQA, Llama 3 rope scaling,
# Mistral's sliding window (short enough that 300-token prompts slide), Qwen2's qkv bias
# and Qwen3's q/k norm.
ARCH_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaForCausalLM", {}),
    "llama3-tied-mqa": (
        "LlamaForCausalLM",
        {"tie_word_embeddings": True, "num_kv_heads": 1, "rope_scaling": LLAMA3_ROPE},
    ),
    "mistral-sliding": ("MistralForCausalLM", {"extra_config": {"sliding_window": 48}}),
    "qwen2-tied": ("Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3ForCausalLM", {"head_dim": 32}),
}


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(python_corpus(300_000), TOKENIZER_VOCAB, out)
    return out


@pytest.fixture(scope="session")
def make_checkpoint(
    tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path
) -> Callable[..., Path]:
    """``make_checkpoint(name)`` for a case of ARCH_CASES, or with explicit overrides; cached."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    cache: dict[str, Path] = {}

    def make(name: str, **overrides: Any) -> Path:
        key = f"{name}-{sorted(overrides.items())!r}"
        if key not in cache:
            arch, case = ARCH_CASES[name]
            kwargs = {**TINY, **case, **overrides}
            out = tmp_path_factory.mktemp(name)
            write_random_checkpoint(out, arch, tokenizer=tokenizer, **kwargs)
            cache[key] = out
        return cache[key]

    return make
