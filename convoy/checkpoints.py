"""Deterministic local tokenizers, random-weight checkpoints, and the built-in models.

convoy has to work with no network: tests need tiny checkpoints of every supported
architecture, benchmarks need realistically sized ones, and ``convoy generate`` needs a model
on a fresh machine (the trained ``convoy-tiny`` family shipped in ``convoy/assets``, see
``scripts/train_convoy_tiny.py``). Everything else is built locally from two deterministic
ingredients:

* a byte-level BPE tokenizer trained on the Python standard library's own sources (every
  Python install carries them, so no data has to be downloaded), and
* weights drawn from a seeded generator and written with transformers' own
  ``save_pretrained``, so the checkpoints are exactly what a Hub checkpoint looks like and load
  back into transformers, which stays the reference convoy is compared against.
"""

from __future__ import annotations

import inspect
import os
import sysconfig
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

__all__ = [
    "ASSETS_DIR",
    "BOS_TOKEN",
    "CHAT_TEMPLATE",
    "DEFAULT_MODEL_NAME",
    "DRAFT_MODEL_NAME",
    "EOS_TOKEN",
    "IM_END_TOKEN",
    "IM_START_TOKEN",
    "LLAMA_25M",
    "LLAMA_200M",
    "PAD_TOKEN",
    "SUPPORTED_ARCHITECTURES",
    "default_model_path",
    "draft_model_path",
    "python_corpus",
    "python_corpus_files",
    "train_tokenizer",
    "write_random_checkpoint",
]

# ---------------------------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------------------------

# Directory names under the stdlib whose files are left out of the corpus: installed third-party
# code is not part of "the Python install" (and differs between machines), and the test suites
# are huge, repetitive and full of deliberately odd code and encodings. ``idle_test`` covers
# ``idlelib/idle_test``; ``tests`` covers ``lib2to3/tests``.
_CORPUS_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})


def python_corpus_files() -> list[tuple[str, str]]:
    """``(relative path, text)`` of every standard-library ``.py`` file, sorted by path.

    The result depends only on the Python install. ``site-packages`` and test directories are
    skipped, as are empty files and files that cannot be read or are not valid UTF-8. Paths are
    POSIX strings relative to the stdlib root, so they can be recorded (e.g. a training split).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune skipped directories instead of filtering afterwards: site-packages can be far
        # bigger than the stdlib itself.
        dirnames[:] = [d for d in dirnames if d not in _CORPUS_SKIP_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath, name)
                found.append((path.relative_to(root).as_posix(), path))
    # Sort on the relative POSIX path string, so the order does not depend on the directory
    # listing order or the platform's path comparison rules.
    found.sort()
    files: list[tuple[str, str]] = []
    for rel, path in found:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text:
            files.append((rel, text))
    return files


def python_corpus(max_bytes: int) -> list[str]:
    """Texts of the standard library's ``.py`` files, at most ``max_bytes`` UTF-8 bytes in all.

    Files come from :func:`python_corpus_files`, in its order. The file that would overflow the
    budget is cut at its last line break that fits, so the total is always ``<= max_bytes`` and
    even a small budget gives some text.
    """
    if max_bytes <= 0:
        return []
    texts: list[str] = []
    total = 0
    for _, text in python_corpus_files():
        data = text.encode("utf-8")
        if total + len(data) > max_bytes:
            head = data[: max_bytes - total]
            cut = head.rfind(b"\n")
            if cut >= 0:
                texts.append(head[: cut + 1].decode("utf-8"))
            break
        texts.append(text)
        total += len(data)
    return texts


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
# The trainer gives special tokens the first ids in this order: <s>=0, </s>=1, <pad>=2,
# <|im_start|>=3, <|im_end|>=4.
_SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IM_START_TOKEN, IM_END_TOKEN]

# ChatML. The template starts with the BOS token because, as for Llama 3, transformers renders
# a chat template and then tokenizes it *without* adding special tokens; with BOS in the
# template a chat prompt starts with BOS just like a plain prompt encoded with the default
# post-processor. ``'\\n'`` is a Jinja string escape, so the template stays on one line.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, out_dir: Path | None = None
) -> PreTrainedTokenizerFast:
    """Train a deterministic byte-level BPE tokenizer on ``texts``.

    Byte-level (GPT-2 style) BPE has no unknown token: every string, emoji included, encodes
    and decodes back exactly. Encoding prepends ``<s>`` as Llama's tokenizer does; ``</s>`` is
    EOS, ``<pad>`` the padding token, and the ChatML tokens drive :data:`CHAT_TEMPLATE`.

    The vocabulary has ``vocab_size`` entries unless the corpus runs out of pairs to merge
    first. If ``out_dir`` is given the tokenizer is also saved there, in the layout
    ``AutoTokenizer.from_pretrained(out_dir)`` loads (chat template included).
    """
    min_size = len(_SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < min_size:
        raise ValueError(f"vocab_size must be at least {min_size} (specials + 256 bytes)")

    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: "def f" and " def f" must stay different token sequences, and
    # decoding must not invent a leading space, or text would not round-trip.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIAL_TOKENS,
        # All 256 byte symbols are in the vocabulary whatever the corpus holds, so any input
        # (e.g. emoji absent from the stdlib) is encodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The tokenizers BPE trainer is deterministic: ties between equally frequent pairs are
    # broken on token ids, not on hash-map order (checked across processes).
    tok.train_from_iterator(texts, trainer=trainer)

    bos_id = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
        # Cleanup would rewrite " ." to "." etc. on decode and break the exact round trip.
        clean_up_tokenization_spaces=False,
    )
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


# ---------------------------------------------------------------------------------------------
# Random-weight checkpoints
# ---------------------------------------------------------------------------------------------

# Architecture string (as in config.json) -> transformers config class name. The model class
# has the architecture's own name.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "LlamaConfig",
    "MistralForCausalLM": "MistralConfig",
    "Qwen2ForCausalLM": "Qwen2Config",
    "Qwen3ForCausalLM": "Qwen3Config",
}

# Benchmark sizes: Llama layout with a 32k vocabulary and head_dim 64.
# Parameters = embed (+ lm_head if untied) + layers * (attention + MLP + 2 norms) + final norm.
#   25M : 32000*384 (tied)                          = 12,288,000
#         8 * (384*384*2 + 384*128*2 + 3*384*1024 + 2*384) = 8 * 1,573,632 = 12,589,056
#         + 384                                   -> 24,877,440 parameters (~99.5 MB in fp32)
LLAMA_25M: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 384,
    "intermediate_size": 1024,
    "num_layers": 8,
    "num_heads": 6,
    "num_kv_heads": 2,
    "tie_word_embeddings": True,
}
#   200M: 2 * 32000*1024 (untied)                   = 65,536,000
#         12 * (1024*1024*2 + 1024*256*2 + 3*1024*2816 + 2*1024) = 12 * 11,274,240
#                                                   = 135,290,880
#         + 1024                                  -> 200,827,904 parameters (~803 MB in fp32)
LLAMA_200M: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_layers": 12,
    "num_heads": 16,
    "num_kv_heads": 4,
    "tie_word_embeddings": False,
}


def write_random_checkpoint(
    out_dir: Path,
    architecture: str,
    *,
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int | None = None,
    tie_word_embeddings: bool = False,
    rope_scaling: dict[str, Any] | None = None,
    max_position_embeddings: int = 2048,
    init_std: float = 0.02,
    seed: int = 0,
    extra_config: dict[str, Any] | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
) -> Path:
    """Write a random-weight Hugging Face checkpoint of ``architecture`` to ``out_dir``.

    The checkpoint is produced by transformers itself (config class + ``save_pretrained``), so
    it has exactly the layout and config.json of a real one: ``model.safetensors`` (or shards
    plus ``model.safetensors.index.json`` when ``max_shard_size`` is given), ``config.json``,
    ``generation_config.json`` and, if ``tokenizer`` is given, the tokenizer files, whose
    BOS/EOS/PAD ids then go into the config.

    Weights are a pure function of the arguments and ``seed``: every parameter is redrawn in
    ``named_parameters()`` order from one seeded generator, ``normal(0, init_std)`` for matrices
    and biases and ``normal(1, init_std)`` for norm scales (not all ones, so a wrong or missing
    norm changes the output and tests notice).

    ``rope_scaling`` takes the classic dict form, e.g. Llama 3's ``{"rope_type": "llama3",
    "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192}``; transformers 5 stores it (with ``rope_theta``)
    as ``rope_parameters``. ``extra_config`` passes other config fields through, e.g.
    ``rope_theta``, ``sliding_window``, ``attention_bias``, ``rms_norm_eps``. Returns ``out_dir``.

    Note: transformers 5's ``AutoTokenizer`` loads the tokenizer of a ``qwen2`` checkpoint as
    ``Qwen2Tokenizer`` whatever tokenizer_config.json says, and that class replaces the
    pre-tokenizer with Qwen's split regex; token ids can then differ from ``tokenizer``'s
    (text still round-trips). Compare against the tokenizer loaded from ``out_dir``.
    """
    if architecture not in SUPPORTED_ARCHITECTURES:
        supported = sorted(SUPPORTED_ARCHITECTURES)
        raise ValueError(f"unsupported architecture {architecture!r}; choose from {supported}")
    if tokenizer is not None and len(tokenizer) > vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but vocab_size is {vocab_size}")
    out_dir = Path(out_dir)

    config_cls = getattr(transformers, SUPPORTED_ARCHITECTURES[architecture])
    model_cls = getattr(transformers, architecture)
    config_kwargs: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        # Explicit, because the classes disagree on the default (Qwen3 uses 128, not
        # hidden_size // num_heads).
        "head_dim": head_dim if head_dim is not None else hidden_size // num_heads,
        "tie_word_embeddings": tie_word_embeddings,
        "max_position_embeddings": max_position_embeddings,
        "initializer_range": init_std,
    }
    if rope_scaling is not None:
        # The legacy ``rope_scaling``/``rope_theta`` keywords are accepted by transformers 4.x
        # and converted to ``rope_parameters`` by 5.x. Copy: the config mutates the dict.
        config_kwargs["rope_scaling"] = dict(rope_scaling)
    config_kwargs.update(extra_config or {})
    if tokenizer is not None:
        config_kwargs["bos_token_id"] = tokenizer.bos_token_id
        config_kwargs["eos_token_id"] = tokenizer.eos_token_id
        config_kwargs["pad_token_id"] = tokenizer.pad_token_id
    config = config_cls(**config_kwargs)

    # Seeding the global RNG as well makes whatever transformers draws while building the
    # model reproducible too, although every parameter is overwritten below.
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32)
    _reinit_parameters(model, init_std=init_std, seed=seed)
    model.to(dtype)
    model.eval()

    save_kwargs: dict[str, Any] = {}
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    # transformers 4.x needs to be asked for safetensors; 5.x only writes safetensors and has
    # dropped the keyword.
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        save_kwargs["safe_serialization"] = True
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), **save_kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    return out_dir


def _reinit_parameters(model: torch.nn.Module, *, init_std: float, seed: int) -> None:
    """Redraw every parameter from a generator seeded with ``seed`` (see write_random_checkpoint).

    A private generator, rather than the global RNG, keeps the weights independent of anything
    else that draws random numbers (including transformers' own init). Tied weights appear
    once in ``named_parameters()``, so they are drawn once.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, init_std, generator=gen)
            elif param.ndim == 1:
                # In these architectures the only 1-D weights are RMSNorm scales (layer norms,
                # final norm, Qwen3's q_norm/k_norm).
                param.normal_(1.0, init_std, generator=gen)
            else:
                param.normal_(0.0, init_std, generator=gen)


# ---------------------------------------------------------------------------------------------
# Built-in default model
# ---------------------------------------------------------------------------------------------

# The convoy-tiny family: small Llama checkpoints trained on the Python standard library by
# scripts/train_convoy_tiny.py and shipped inside the package, so every command has a model
# that makes sense offline. The smaller draft shares the target's tokenizer, so it can serve
# as a speculative-decoding draft once convoy implements that (it does not yet).
DEFAULT_MODEL_NAME = "convoy-tiny"
DRAFT_MODEL_NAME = "convoy-tiny-draft"
ASSETS_DIR = Path(__file__).resolve().parent / "assets"


def default_model_path() -> Path:
    """Path of the built-in default model, :data:`DEFAULT_MODEL_NAME`."""
    return _shipped(DEFAULT_MODEL_NAME)


def draft_model_path() -> Path:
    """Path of the default model's draft, :data:`DRAFT_MODEL_NAME` (same tokenizer)."""
    return _shipped(DRAFT_MODEL_NAME)


def _shipped(name: str) -> Path:
    path = ASSETS_DIR / name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"the built-in model {name!r} is missing from {path}; reinstall convoy, or train it "
            f"with: python scripts/train_convoy_tiny.py --out {ASSETS_DIR}"
        )
    return path
