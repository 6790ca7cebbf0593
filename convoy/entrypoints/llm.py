"""``convoy.LLM``: offline batch generation, shaped like vLLM's ``LLM``."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, TypedDict, TypeGuard

from transformers import PreTrainedTokenizerBase

from convoy.config import EngineConfig
from convoy.engine.engine import LLMEngine
from convoy.outputs import RequestOutput
from convoy.sampling_params import SamplingParams


class TextPrompt(TypedDict, total=False):
    """vLLM's ``TextPrompt``: ``{"prompt": "..."}``, tokenized by the engine."""

    prompt: str
    cache_salt: str


class TokensPrompt(TypedDict, total=False):
    """vLLM's ``TokensPrompt``: ``{"prompt_token_ids": [...]}``, served as given. A ``prompt``
    beside the ids is only reported back (``RequestOutput.prompt``), as in vLLM."""

    prompt_token_ids: list[int]
    prompt: str
    cache_salt: str


# A string, a list of token ids, or one of vLLM's prompt dicts.
Prompt = str | list[int] | TextPrompt | TokensPrompt
Message = dict[str, Any]
# The keys a prompt dict may have; ``cache_salt`` namespaces the request's cached KV blocks.
PROMPT_KEYS = ("prompt", "prompt_token_ids", "cache_salt")


class LLM:
    """Load a model once, then generate for many prompts at once.

    >>> llm = LLM(model="path/or/hub-id", max_num_seqs=64)
    >>> outs = llm.generate(["Hello", "def f(x):"], SamplingParams(max_tokens=32))

    Keyword arguments are the fields of :class:`~convoy.config.ModelConfig`,
    :class:`~convoy.config.CacheConfig` and :class:`~convoy.config.SchedulerConfig`.
    """

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        self.engine = LLMEngine(EngineConfig.from_kwargs(model=model, **kwargs))

    def get_tokenizer(self) -> PreTrainedTokenizerBase:
        return self.engine.tokenizer

    def reset_prefix_cache(self) -> None:
        """Forget every cached prompt block, so the next requests compute their prompts in full
        (benchmarks repeating a workload; vLLM's ``LLM.reset_prefix_cache``)."""
        self.engine.reset_prefix_cache()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt; results in input order.

        A prompt is a string, a list of token ids, or one of vLLM's prompt dicts:
        ``{"prompt": "..."}`` (:class:`TextPrompt`) or ``{"prompt_token_ids": [...]}``
        (:class:`TokensPrompt`), either with an optional ``"cache_salt"``. ``prompts`` is one
        prompt or a sequence of them, forms mixed freely.

        All prompts are validated before any runs: a prompt that cannot be served raises
        ``ValueError`` naming its index, and nothing is left queued.
        """
        prompt_list = _as_prompt_list(prompts)
        if sampling_params is None:
            params_list = [SamplingParams()] * len(prompt_list)
        elif isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompt_list)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise ValueError(
                    f"got {len(params_list)} sampling_params for {len(prompt_list)} prompts"
                )
        return self._run(prompt_list, params_list, use_tqdm)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Apply the checkpoint's chat template (or ``chat_template``) to each conversation."""
        conversations: list[list[Message]]
        if messages and isinstance(messages[0], dict):
            conversations = [messages]  # one conversation
        else:
            conversations = messages  # type: ignore[assignment]
        prompts: list[Prompt] = [
            self.engine.apply_chat_template(conv, chat_template, add_generation_prompt)
            for conv in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(
        self, prompts: list[_Parsed], params: list[SamplingParams], use_tqdm: bool
    ) -> list[RequestOutput]:
        engine = self.engine
        ids = [engine.new_request_id() for _ in prompts]
        token_ids = [
            p.token_ids if p.token_ids is not None else engine.tokenize(p.text or "")
            for p in prompts
        ]
        if engine.config.cache.enable_prefix_caching:
            order = reuse_order(token_ids, engine.kv_cache.block_size)
        else:
            order = list(range(len(prompts)))
        added: list[str] = []
        try:
            for i in order:
                try:
                    p = prompts[i]
                    engine.add_request(
                        ids[i],
                        p.text if p.text is not None else token_ids[i],
                        params[i],
                        cache_salt=p.cache_salt,
                        prompt_token_ids=token_ids[i],
                    )
                except ValueError as e:
                    raise ValueError(f"prompt {i}: {e}") from e
                added.append(ids[i])
        except BaseException:
            engine.abort_request(added)
            raise

        results: dict[str, RequestOutput] = {}
        bar = _progress(len(prompts)) if use_tqdm else None
        start = time.perf_counter()
        try:
            while len(results) < len(ids):
                for out in engine.step(final_only=True):  # finished requests only
                    results[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
                if bar is not None:
                    elapsed = max(time.perf_counter() - start, 1e-9)
                    bar.set_postfix_str(
                        f"in {engine.num_prompt_tokens_computed / elapsed:.0f} tok/s, "
                        f"out {engine.num_generated_tokens / elapsed:.0f} tok/s",
                        refresh=False,
                    )
        except BaseException:
            # Ctrl-C or a crash: leave the engine clean for the next call.
            engine.abort_request([rid for rid in ids if rid not in results])
            raise
        finally:
            if bar is not None:
                bar.close()
        return [results[rid] for rid in ids]


def reuse_order(prompts: Sequence[Sequence[int]], block_size: int) -> list[int]:
    """The order to run ``prompts`` in so that shared prefixes are computed once (BatchLLM).

    Prompts whose first KV block is the same form a group, placed where its first member was;
    within a group, prompts are sorted by their tokens, so those sharing the longest prefixes
    are neighbours. The scheduler admits in this order, so a group runs together: its shared
    blocks are computed by the first member and reused by the rest while they are still
    cached, instead of being evicted by unrelated prompts in between. Prompts that share no
    full block with any other keep their input order.
    """
    groups: dict[tuple[int, ...] | int, list[int]] = {}
    for i, p in enumerate(prompts):
        key: tuple[int, ...] | int = tuple(p[:block_size]) if len(p) > block_size else i
        groups.setdefault(key, []).append(i)
    order: list[int] = []
    for members in groups.values():
        order.extend(sorted(members, key=lambda i: (tuple(prompts[i]), i)))
    return order


class _Parsed(NamedTuple):
    """One prompt, whatever its form: the text (reported back; tokenized unless ``token_ids``
    are given), the token ids, and the cache salt. ``text`` or ``token_ids`` is set."""

    text: str | None
    token_ids: list[int] | None
    cache_salt: str | None = None


def _is_token_ids(p: object) -> TypeGuard[list[int]]:
    return isinstance(p, list) and all(isinstance(t, int) for t in p)


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[_Parsed]:
    if isinstance(prompts, str | Mapping):
        items: list[Any] = [prompts]
    else:
        items = list(prompts)
        if items and all(isinstance(t, int) for t in items):
            items = [items]  # one prompt given as token ids
    parsed = []
    for i, p in enumerate(items):
        try:
            parsed.append(_parse_prompt(p))
        except (TypeError, ValueError) as e:
            raise type(e)(f"prompt {i}: {e}") from e
    return parsed


def _parse_prompt(p: object) -> _Parsed:
    if isinstance(p, str):
        return _Parsed(p, None)
    if _is_token_ids(p):
        return _Parsed(None, list(p))
    if not isinstance(p, Mapping):
        raise TypeError(
            "a prompt must be a string, a list of token ids, or a dict with 'prompt' or "
            f"'prompt_token_ids', got {type(p)}"
        )
    unknown = [k for k in p if k not in PROMPT_KEYS]
    if unknown:
        allowed = ", ".join(map(repr, PROMPT_KEYS))
        raise ValueError(f"unknown prompt keys {unknown}: a prompt dict takes {allowed}")
    if "prompt" not in p and "prompt_token_ids" not in p:
        raise ValueError(
            f"a prompt dict needs 'prompt' (text) or 'prompt_token_ids', got keys {list(p)}"
        )
    text = p.get("prompt")
    if text is not None and not isinstance(text, str):
        raise TypeError(f"'prompt' must be a string, got {type(text)}")
    token_ids = p.get("prompt_token_ids")
    if token_ids is not None and not _is_token_ids(token_ids):
        raise TypeError(f"'prompt_token_ids' must be a list of ints, got {token_ids!r:.80}")
    salt = p.get("cache_salt")
    if salt is not None and not isinstance(salt, str):
        raise TypeError(f"'cache_salt' must be a string, got {type(salt)}")
    return _Parsed(text, token_ids, salt)


def _progress(total: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="generating", unit="req", dynamic_ncols=True)
