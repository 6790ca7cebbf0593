"""Engine configuration: one dataclass per concern.

Every field has a default and a one-line ``help``; the CLI is generated from these classes
(see ``convoy.cli``) and ``LLM(**kwargs)`` routes each keyword to the class that owns it, so
the Python API and the CLI never drift apart.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

LINEAR_BACKENDS = ("auto", "packed", "plain", "torch")


@dataclass
class ModelConfig:
    """What to load and in which precision."""

    model: str | None = field(
        default=None,
        metadata={"help": "Local checkpoint directory or Hub id (default: the built-in model)."},
    )
    tokenizer: str | None = field(
        default=None, metadata={"help": "Tokenizer directory or Hub id (default: the model's)."}
    )
    revision: str | None = field(
        default=None, metadata={"help": "Hub revision (branch, tag or commit) to load."}
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16, float16."},
    )
    device: str = field(
        default="auto", metadata={"help": "auto (CUDA when available, else CPU), cpu or cuda."}
    )
    max_model_len: int | None = field(
        default=None,
        metadata={"help": "Longest prompt + output (default: the model's, capped by the KV pool)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the engine's shared generator."})
    quantization: str | None = field(
        default=None,
        metadata={
            "help": "int8: weight-only int8 linear layers (CPU; faster bandwidth-bound decode, "
            "outputs change slightly). Default: none, exact."
        },
    )
    attention_backend: str = field(
        default="auto",
        metadata={
            "help": "auto (convoy's C++ paged-attention kernel on a float32 CPU model when it "
            "builds, else torch ops) or torch (torch ops only)."
        },
    )
    linear_backend: str = field(
        default="auto",
        metadata={
            "help": "float32 CPU linear layers: packed (oneDNN, weights reordered once; for "
            "batches), plain (convoy's kernel up to 4 rows, oneDNN above), torch, or auto "
            "(packed when max_num_seqs > 4, else plain)."
        },
    )
    enforce_eager: bool = field(
        default=False,
        metadata={
            "help": "CUDA: run every step eagerly, without CUDA graphs (by default decode "
            "steps replay graphs captured on first use)."
        },
    )
    greedy_screening: bool = field(
        default=True,
        metadata={
            "help": "float32 CPU models on CPUs with AVX512-BF16, AMX or VNNI: greedy rows get "
            "the exact float32 argmax from a bfloat16/int8 screen of the head. Off: full head."
        },
    )


@dataclass
class CacheConfig:
    """The paged KV cache."""

    block_size: int | None = field(
        default=None,
        metadata={
            "help": "Tokens per KV cache block (default: 128 on CPU, 16 on CUDA). Prefixes are "
            "shared in whole blocks; on CPU, longer blocks let decode attention stream the cache."
        },
    )
    num_kv_blocks: int | None = field(
        default=None, metadata={"help": "Number of KV blocks (overrides kv_cache_memory_gb)."}
    )
    kv_cache_memory_gb: float = field(
        default=2.0, metadata={"help": "Memory given to the KV cache, in GiB."}
    )
    enable_prefix_caching: bool = field(
        default=True,
        metadata={"help": "Reuse the KV of prompt prefixes computed before (shared by hash)."},
    )

    def for_device(self, device_type: str) -> CacheConfig:
        """This config with ``block_size`` filled in for the device when it was left unset.

        CPU gets 128-token blocks, like vLLM's CPU backend: decode attention reads a block's
        keys and values as one run, and the memory system streams long runs much faster than
        short scattered ones (docs/performance). CUDA keeps vLLM's 16, which shares prefixes
        at a finer grain.
        """
        if self.block_size is not None:
            return self
        return dataclasses.replace(self, block_size=128 if device_type == "cpu" else 16)


@dataclass
class SchedulerConfig:
    """Continuous batching policy."""

    max_num_seqs: int = field(default=128, metadata={"help": "Most sequences running in one step."})
    max_num_batched_tokens: int = field(
        default=2048, metadata={"help": "Token budget of one step (decodes first, then prompts)."}
    )


@dataclass
class ServerConfig:
    """The OpenAI-compatible HTTP server (``convoy serve``)."""

    host: str = field(default="127.0.0.1", metadata={"help": "Address to listen on."})
    port: int = field(default=8000, metadata={"help": "Port to listen on."})
    api_key: str | None = field(
        default=None, metadata={"help": "Require 'Authorization: Bearer KEY' on /v1 routes."}
    )
    served_model_name: str | None = field(
        default=None, metadata={"help": "Model name clients use (default: the --model value)."}
    )
    chat_template: str | None = field(
        default=None,
        metadata={"help": "Jinja chat template, or a file holding one (default: the model's)."},
    )
    max_concurrent_requests: int | None = field(
        default=None,
        metadata={"help": "Requests handed to the engine at once; more wait in the queue."},
    )
    max_queued_requests: int | None = field(
        default=None,
        metadata={"help": "Requests waiting for a slot before new ones get 429 (default: none)."},
    )
    max_request_body_bytes: int = field(
        default=16 * 2**20, metadata={"help": "Larger request bodies get 413."}
    )
    shutdown_grace_s: float = field(
        default=30.0,
        metadata={"help": "On SIGTERM, time in-flight requests get to finish before abort."},
    )


SPECULATIVE_METHODS = ("draft_model", "ngram", "hybrid", "auto", "oracle")


@dataclass
class SpeculativeConfig:
    """Speculative decoding, in the shape of vLLM's ``speculative_config``.

    ``{"model": DRAFT, "num_speculative_tokens": 4}`` drafts with a small model sharing the
    target's tokenizer; ``{"method": "ngram", "prompt_lookup_min": 2, "prompt_lookup_max":
    4}`` copies the tokens that followed the last n-gram's earlier occurrence; ``hybrid``
    tries the n-gram first and falls back to the draft; ``auto`` is hybrid when a draft model
    is given, else n-gram. ``oracle`` (benchmarks) proposes a known continuation with a
    chosen share of wrong tokens. Outputs never change: the target verifies every token.
    """

    method: str | None = None  # None: draft_model if a model is given
    model: str | None = None
    num_speculative_tokens: int = 4
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 4
    # The controller picks each request's draft length (0 .. num_speculative_tokens) every
    # step from measured step costs and acceptance; off: always num_speculative_tokens.
    adaptive: bool = True
    # oracle only: the chance that each proposed token is wrong.
    oracle_error_rate: float = 0.0
    oracle_seed: int = 0

    def __post_init__(self) -> None:
        if self.method is None:
            if self.model is None:
                raise ValueError(
                    "speculative_config needs a draft 'model' or a 'method' "
                    f"({', '.join(SPECULATIVE_METHODS)})"
                )
            self.method = "draft_model"
        if self.method == "auto":
            self.method = "hybrid" if self.model is not None else "ngram"
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(
                f"speculative method must be one of {', '.join(SPECULATIVE_METHODS)}, "
                f"got {self.method!r}"
            )
        if self.method in ("draft_model", "hybrid") and self.model is None:
            raise ValueError(f"speculative method {self.method!r} needs a draft 'model'")
        if not isinstance(self.num_speculative_tokens, int) or self.num_speculative_tokens < 1:
            raise ValueError(
                "num_speculative_tokens must be an integer >= 1, "
                f"got {self.num_speculative_tokens!r}"
            )
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(
                "need 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                f"{self.prompt_lookup_min} and {self.prompt_lookup_max}"
            )
        if not 0.0 <= self.oracle_error_rate <= 1.0:
            raise ValueError(f"oracle_error_rate must be in [0, 1], got {self.oracle_error_rate}")

    @property
    def uses_draft_model(self) -> bool:
        return self.method in ("draft_model", "hybrid")


def parse_speculative_config(
    value: str | dict[str, Any] | SpeculativeConfig | None, default_draft: str | None
) -> SpeculativeConfig | None:
    """The speculative config from what a user gave: a dict, its JSON text, ``"none"``, or
    ``"default"`` (speculate with ``default_draft`` when there is one, else not)."""
    if value is None or isinstance(value, SpeculativeConfig):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("", "none", "off", "null"):
            return None
        if text == "default":
            # auto: the n-gram where it hits (free), else the draft where it pays.
            if default_draft is None:
                return None
            return SpeculativeConfig(method="auto", model=default_draft)
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"speculative_config is not valid JSON: {e}") from None
        if value is None:
            return None
    if not isinstance(value, dict):
        raise ValueError(f"speculative_config must be a JSON object, got {value!r}")
    known = {f.name for f in dataclasses.fields(SpeculativeConfig)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"unknown speculative_config key(s) {unknown}; known: {sorted(known)}")
    return SpeculativeConfig(**value)


@dataclass
class SpeculationConfig:
    """Speculative decoding (the CLI's and ``LLM``'s one knob)."""

    speculative_config: str | dict[str, Any] | None = field(
        default="default",
        metadata={
            "help": 'JSON like vLLM\'s, e.g. \'{"model": DRAFT, "num_speculative_tokens": '
            '4}\' or \'{"method": "ngram"}\'; none: off. Default: the built-in draft when '
            "no --model is given (method auto), else off."
        },
    )
    batch_invariant: str = field(
        default="auto",
        metadata={
            "help": "on: a row's float32 result never depends on the other rows of a step "
            "(what keeps speculative outputs exact); off; auto: on with speculation."
        },
    )


CONFIG_CLASSES: tuple[type, ...] = (
    ModelConfig,
    CacheConfig,
    SchedulerConfig,
    SpeculationConfig,
)


@dataclass
class EngineConfig:
    """All of the engine's configuration."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    speculation: SpeculationConfig = field(default_factory=SpeculationConfig)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        """Build from flat keywords (``LLM(model=..., block_size=...)``); unknown ones raise."""
        parts: dict[str, Any] = {}
        remaining = dict(kwargs)
        for name, klass in (
            ("model", ModelConfig),
            ("cache", CacheConfig),
            ("scheduler", SchedulerConfig),
            ("speculation", SpeculationConfig),
        ):
            names = {f.name for f in dataclasses.fields(klass)}
            parts[name] = klass(**{k: remaining.pop(k) for k in list(remaining) if k in names})
        if remaining:
            known = sorted(f.name for k in CONFIG_CLASSES for f in dataclasses.fields(k))
            raise TypeError(f"unknown engine argument(s) {sorted(remaining)}; known: {known}")
        config = cls(**parts)
        config.validate()
        return config

    def validate(self) -> None:
        c, s, m = self.cache, self.scheduler, self.model
        if c.block_size is not None and c.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {c.block_size}")
        if c.num_kv_blocks is not None and c.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {c.num_kv_blocks}")
        if c.kv_cache_memory_gb <= 0:
            raise ValueError(f"kv_cache_memory_gb must be > 0, got {c.kv_cache_memory_gb}")
        if s.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {s.max_num_seqs}")
        if s.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {s.max_num_batched_tokens}")
        if m.max_model_len is not None and m.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {m.max_model_len}")
        if m.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {m.dtype!r}")
        if m.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {m.device!r}")
        if m.quantization not in (None, "int8"):
            raise ValueError(f"quantization must be int8 or unset, got {m.quantization!r}")
        if m.attention_backend not in ("auto", "torch"):
            raise ValueError(
                f"attention_backend must be auto or torch, got {m.attention_backend!r}"
            )
        parse_speculative_config(self.speculation.speculative_config, None)
        if self.speculation.batch_invariant not in ("auto", "on", "off"):
            raise ValueError(
                f"batch_invariant must be auto, on or off, got {self.speculation.batch_invariant!r}"
            )
        if m.linear_backend not in LINEAR_BACKENDS:
            raise ValueError(
                f"linear_backend must be one of {', '.join(LINEAR_BACKENDS)}, "
                f"got {m.linear_backend!r}"
            )
