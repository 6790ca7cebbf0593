"""Per-request sampling parameters, validated at construction.

The field names and semantics follow vLLM's ``SamplingParams`` (and, through it, the OpenAI
API), so code written against vLLM ports by changing an import.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# Below this temperature sampling is greedy; dividing logits by ~0 would overflow anyway.
_GREEDY_EPS = 1e-5


class InvalidParamError(ValueError):
    """A request field has a bad value; ``param`` names the field (OpenAI's error ``param``)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    """How to pick the tokens of one request; bad values raise ``ValueError`` naming the field."""

    n: int = field(default=1, metadata={"help": "Number of completions to return per prompt."})
    temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature; 0 means greedy decoding."}
    )
    top_p: float = field(
        default=1.0, metadata={"help": "Nucleus sampling: keep the smallest set with this mass."}
    )
    top_k: int = field(
        default=0, metadata={"help": "Keep only the k most likely tokens (0 or -1: all)."}
    )
    min_p: float = field(
        default=0.0,
        metadata={"help": "Drop tokens less likely than min_p times the most likely one."},
    )
    repetition_penalty: float = field(
        default=1.0,
        metadata={"help": "Penalize tokens seen in prompt or output (>1 discourages repeats)."},
    )
    presence_penalty: float = field(
        default=0.0, metadata={"help": "Subtract this from logits of tokens already generated."}
    )
    frequency_penalty: float = field(
        default=0.0,
        metadata={"help": "Subtract this times the count of each already generated token."},
    )
    max_tokens: int | None = field(
        default=16,
        metadata={"help": "Maximum number of tokens to generate (None: up to max_model_len)."},
    )
    min_tokens: int = field(
        default=0, metadata={"help": "Generate at least this many tokens before EOS or stop."}
    )
    stop: list[str] = field(
        default_factory=list, metadata={"help": "Strings that end generation when produced."}
    )
    stop_token_ids: list[int] = field(
        default_factory=list, metadata={"help": "Token ids that end generation when sampled."}
    )
    include_stop_str_in_output: bool = field(
        default=False, metadata={"help": "Keep the matched stop string in the output text."}
    )
    ignore_eos: bool = field(
        default=False, metadata={"help": "Keep generating after the EOS token."}
    )
    seed: int | None = field(
        default=None, metadata={"help": "Seed of this request's own random generator."}
    )
    logprobs: int | None = field(
        default=None,
        metadata={
            "help": "Return the log-probability of each sampled token and this many top ones."
        },
    )
    prompt_logprobs: int | None = field(
        default=None,
        metadata={
            "help": "Return the log-probability of each prompt token and this many top ones."
        },
    )
    skip_special_tokens: bool = field(
        default=True, metadata={"help": "Leave special tokens out of the output text."}
    )
    logit_bias: dict[int, float] = field(
        default_factory=dict, metadata={"help": "Token id -> value added to its logit."}
    )

    speculative: bool = field(
        default=True,
        metadata={"help": "Let the engine speculate for this request (outputs never change)."},
    )
    max_speculative_tokens: int | None = field(
        default=None,
        metadata={"help": "Most proposed tokens verified per step (None: the engine's setting)."},
    )

    def __post_init__(self) -> None:
        # Accept a single stop string or stop token id like vLLM and the OpenAI API do.
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = {int(k): float(v) for k, v in (self.logit_bias or {}).items()}
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, why: str) -> InvalidParamError:
            return InvalidParamError(name, f"{name} {why}, got {getattr(self, name)!r}")

        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", "must be an integer >= 1")
        if self.temperature < 0.0:
            raise bad("temperature", "must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if self.top_k < 0:
            raise bad("top_k", "must be -1 (disable), 0 (disable) or a positive integer")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be in [0, 1]")
        if self.repetition_penalty <= 0.0:
            raise bad("repetition_penalty", "must be > 0")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", "must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", "must be in [-2, 2]")
        if self.max_tokens is not None and self.max_tokens < 0:
            raise bad("max_tokens", "must be >= 0 (0 is only useful with prompt_logprobs)")
        if self.min_tokens < 0:
            raise bad("min_tokens", "must be >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise bad("stop", "must be a list of non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be a list of non-negative integers")
        if self.logprobs is not None and self.logprobs < 0:
            raise bad("logprobs", "must be >= 0")
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            raise bad("prompt_logprobs", "must be >= 0")
        if self.max_speculative_tokens is not None and (
            not isinstance(self.max_speculative_tokens, int) or self.max_speculative_tokens < 0
        ):
            raise bad("max_speculative_tokens", "must be an integer >= 0")
        if self.seed is not None and (
            not isinstance(self.seed, int) or not -(2**63) <= self.seed < 2**64
        ):
            raise bad("seed", "must be an integer that fits in 64 bits")

    @property
    def greedy(self) -> bool:
        """True when the sampler takes the argmax (temperature ~0)."""
        return self.temperature < _GREEDY_EPS

    def clone(self, **changes: object) -> SamplingParams:
        """A copy with some fields replaced (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]
