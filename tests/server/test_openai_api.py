"""The OpenAI-compatible API through the ``openai`` client against a real ``convoy serve``.

Everything the server generates is compared with the offline ``convoy.LLM`` on the same
checkpoint: greedy and seeded text token for token (through the text and the logprobs'
tokens), logprobs within 1e-4, usage counts from the tokenizer.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openai import OpenAI

from convoy import LLM, RequestOutput, SamplingParams
from tests.server.conftest import (
    DEFAULT_CPU_BLOCK_SIZE,
    MAX_MODEL_LEN,
    SERVED_NAME,
    ServerProcess,
    wait_idle,
)

PROMPTS = [
    "def fibonacci(n):",
    "import os\nimport sys\n",
    "class Point:\n    def __init__(self, x, y):",
    "result = [i * i for i in",
]
MESSAGES = [
    {"role": "system", "content": "You write Python."},
    {"role": "user", "content": "Sort a list of numbers."},
]
ATOL = 1e-4
IGNORE_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=60)


def offline(llm: LLM, prompts: list[str] | list[list[int]], **params: Any) -> list[RequestOutput]:
    return llm.generate(list(prompts), SamplingParams(**params), use_tqdm=False)


def token_texts(llm: LLM, token_ids: list[int]) -> list[str]:
    return [llm.get_tokenizer().decode([t]) for t in token_ids]


def encode(llm: LLM, prompt: str) -> list[int]:
    return list(llm.get_tokenizer().encode(prompt))


# -- plain endpoints ---------------------------------------------------------------------------
def test_health_and_models(server: ServerProcess, client: OpenAI) -> None:
    r = httpx.get(f"{server.base_url}/health", timeout=10)
    assert r.status_code == 200 and r.json() == {"status": "ok"}

    models = client.models.list().data
    assert [m.id for m in models] == [SERVED_NAME]
    assert models[0].object == "model"
    raw = httpx.get(f"{server.v1}/models", timeout=10).json()
    assert raw["object"] == "list"
    assert raw["data"][0]["max_model_len"] == MAX_MODEL_LEN


def test_tokenize_detokenize_round_trip(server: ServerProcess, llm: LLM) -> None:
    text = "def add(a, b):\n    return a + b  # ünïcødé ✓"
    r = httpx.post(f"{server.base_url}/tokenize", json={"prompt": text}, timeout=10).json()
    assert r["tokens"] == encode(llm, text)
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == MAX_MODEL_LEN

    plain = httpx.post(
        f"{server.base_url}/tokenize",
        json={"prompt": text, "add_special_tokens": False, "model": SERVED_NAME},
        timeout=10,
    ).json()
    assert plain["tokens"] == r["tokens"][1:]  # without the BOS the tokenizer prepends
    back = httpx.post(
        f"{server.base_url}/detokenize", json={"tokens": plain["tokens"]}, timeout=10
    ).json()
    assert back == {"prompt": text}

    chat = httpx.post(f"{server.base_url}/tokenize", json={"messages": MESSAGES}, timeout=10)
    assert chat.json()["tokens"] == llm.engine.apply_chat_template(MESSAGES)


# -- completions -------------------------------------------------------------------------------
def test_completions_greedy_match_offline(client: OpenAI, llm: LLM) -> None:
    max_tokens = 12
    resp = client.completions.create(
        model=SERVED_NAME,
        prompt=PROMPTS,
        max_tokens=max_tokens,
        temperature=0,
        logprobs=2,
        extra_body=IGNORE_EOS,
    )
    want = offline(llm, PROMPTS, temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=2)

    assert resp.id.startswith("cmpl-") and resp.object == "text_completion"
    assert resp.model == SERVED_NAME
    assert [c.index for c in resp.choices] == list(range(len(PROMPTS)))
    for choice, out in zip(resp.choices, want, strict=True):
        comp = out.outputs[0]
        assert choice.text == comp.text
        assert choice.finish_reason == "length"
        lp = choice.logprobs
        assert lp is not None and comp.logprobs is not None
        assert lp.tokens == token_texts(llm, comp.token_ids)
        expected = [pos[t].logprob for t, pos in zip(comp.token_ids, comp.logprobs, strict=True)]
        assert lp.token_logprobs == pytest.approx(expected, abs=ATOL)
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == sum(len(encode(llm, p)) for p in PROMPTS)
    assert resp.usage.completion_tokens == max_tokens * len(PROMPTS)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_completion_logprobs_shapes(client: OpenAI) -> None:
    k = 3
    resp = client.completions.create(
        model=SERVED_NAME,
        prompt=PROMPTS[0],
        max_tokens=8,
        temperature=0,
        logprobs=k,
        extra_body=IGNORE_EOS,
    )
    (choice,) = resp.choices
    lp = choice.logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    assert lp.text_offset is not None
    n = resp.usage.completion_tokens if resp.usage else -1
    assert n == 8
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n
    assert len(lp.text_offset) == n
    assert lp.text_offset[0] == 0
    for i in range(1, n):  # each token starts where the previous one ended
        assert lp.text_offset[i] == lp.text_offset[i - 1] + len(lp.tokens[i - 1])
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert logprob is not None and logprob <= 0.0
        # Keyed by token text, so two tokens that decode alike (e.g. to U+FFFD) share a key.
        assert top is not None and 1 <= len(top) <= k
        assert token in top  # greedy: the chosen token is among the most likely
        assert all(v <= 0.0 for v in top.values())


def test_completion_top_logprobs_keep_the_most_likely_of_equal_texts(client: OpenAI) -> None:
    resp = client.completions.create(
        model=SERVED_NAME,
        prompt=PROMPTS[0],
        max_tokens=8,
        temperature=0,
        logprobs=5,
        extra_body=IGNORE_EOS,
    )
    lp = resp.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert top is not None and logprob is not None
        # Greedy: the chosen token is the most likely one, with its own logprob.
        assert top[token] == pytest.approx(logprob, abs=1e-6)
        assert max(top.values()) == pytest.approx(logprob, abs=1e-6)


@pytest.mark.parametrize(
    "echo",
    [
        pytest.param(
            False,
        ),
        pytest.param(
            True,
        ),
    ],
)
def test_streamed_logprobs_equal_non_streamed(client: OpenAI, echo: bool) -> None:
    kwargs: dict[str, Any] = dict(
        model=SERVED_NAME,
        prompt=PROMPTS[1],
        max_tokens=6,
        temperature=0,
        logprobs=1,
        echo=echo,
        extra_body=IGNORE_EOS,
    )
    whole = client.completions.create(**kwargs).choices[0]
    assert whole.logprobs is not None
    text, tokens, token_logprobs, offsets = "", [], [], []
    for chunk in client.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            text += c.text
            if c.logprobs is not None:
                tokens += c.logprobs.tokens or []
                token_logprobs += c.logprobs.token_logprobs or []
                offsets += c.logprobs.text_offset or []
    assert text == whole.text
    assert tokens == whole.logprobs.tokens
    assert token_logprobs == pytest.approx(whole.logprobs.token_logprobs, abs=ATOL)
    assert offsets == whole.logprobs.text_offset


def collect_stream(chunks: Any) -> tuple[list[Any], dict[int, str], dict[int, list[str]]]:
    """All chunks, the text per choice index, and the finish reasons seen per index."""
    all_chunks, texts, finishes = [], defaultdict(str), defaultdict(list)
    for chunk in chunks:
        all_chunks.append(chunk)
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason is not None:
                finishes[c.index].append(c.finish_reason)
    return all_chunks, dict(texts), dict(finishes)


def test_completions_stream_with_usage(client: OpenAI, llm: LLM) -> None:
    max_tokens = 10
    stream = client.completions.create(
        model=SERVED_NAME,
        prompt=PROMPTS[:2],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=IGNORE_EOS,
    )
    chunks, texts, finishes = collect_stream(stream)
    want = offline(llm, PROMPTS[:2], temperature=0, max_tokens=max_tokens, ignore_eos=True)

    assert texts == {i: out.outputs[0].text for i, out in enumerate(want)}
    assert finishes == {0: ["length"], 1: ["length"]}
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("cmpl-")
    # The usage chunk comes last, with no choices; the others carry no usage.
    *body, last = chunks
    assert last.choices == [] and last.usage is not None
    assert all(c.usage is None and c.choices for c in body)
    assert last.usage.prompt_tokens == sum(len(encode(llm, p)) for p in PROMPTS[:2])
    assert last.usage.completion_tokens == 2 * max_tokens
    assert last.usage.total_tokens == last.usage.prompt_tokens + 2 * max_tokens


def test_stream_without_include_usage_has_no_usage_chunk(client: OpenAI) -> None:
    stream = client.completions.create(
        model=SERVED_NAME, prompt=PROMPTS[0], max_tokens=4, temperature=0, stream=True
    )
    chunks, _, finishes = collect_stream(stream)
    assert all(c.usage is None and c.choices for c in chunks)
    assert len(finishes[0]) == 1 and finishes[0][0] in ("length", "stop")


def test_prompt_forms_and_choice_indexes(client: OpenAI, llm: LLM) -> None:
    """A string, strings, token ids and lists of token ids; choice i*n+j = sample j of prompt
    i. Seeded sampling at temperature 1, so the n samples differ and each must land where it
    belongs."""
    n, max_tokens, seed = 2, 6, 11
    prompts = PROMPTS[:3]
    ids = [encode(llm, p) for p in prompts]
    want = offline(
        llm, prompts, n=n, temperature=1.0, seed=seed, max_tokens=max_tokens, ignore_eos=True
    )
    expected = [comp.text for out in want for comp in out.outputs]
    assert expected[0] != expected[1]  # the two samples of a prompt differ

    def texts(prompt: Any) -> list[str]:
        resp = client.completions.create(
            model=SERVED_NAME,
            prompt=prompt,
            n=n,
            max_tokens=max_tokens,
            temperature=1.0,
            seed=seed,
            extra_body=IGNORE_EOS,
        )
        assert [c.index for c in resp.choices] == list(range(len(resp.choices)))
        assert resp.usage is not None
        assert resp.usage.completion_tokens == len(resp.choices) * max_tokens
        return [c.text for c in resp.choices]

    assert texts(prompts[0]) == expected[:n]
    assert texts(ids[0]) == expected[:n]
    assert texts(prompts) == expected
    assert texts(ids) == expected

    stream = client.completions.create(
        model=SERVED_NAME,
        prompt=prompts,
        n=n,
        max_tokens=max_tokens,
        temperature=1.0,
        seed=seed,
        stream=True,
        extra_body=IGNORE_EOS,
    )
    _, streamed, finishes = collect_stream(stream)
    assert streamed == dict(enumerate(expected))
    assert finishes == {i: ["length"] for i in range(len(expected))}


def test_echo(client: OpenAI, llm: LLM) -> None:
    prompt = PROMPTS[1]
    (out,) = offline(llm, [prompt], temperature=0, max_tokens=5, ignore_eos=True)
    for form in (prompt, encode(llm, prompt)):
        resp = client.completions.create(
            model=SERVED_NAME,
            prompt=form,
            max_tokens=5,
            temperature=0,
            echo=True,
            extra_body=IGNORE_EOS,
        )
        echoed = prompt if isinstance(form, str) else llm.get_tokenizer().decode(form)
        assert resp.choices[0].text == echoed + out.outputs[0].text
        assert resp.usage is not None and resp.usage.completion_tokens == 5
        stream = client.completions.create(
            model=SERVED_NAME,
            prompt=form,
            max_tokens=5,
            temperature=0,
            echo=True,
            stream=True,
            extra_body=IGNORE_EOS,
        )
        _, texts, _ = collect_stream(stream)
        assert texts == {0: echoed + out.outputs[0].text}


@pytest.mark.parametrize(
    "form",
    [
        pytest.param(
            "text",
        ),
        "token_ids",
    ],
)
def test_echo_text_offsets_index_the_text(client: OpenAI, llm: LLM, form: str) -> None:
    prompt = "def area(radius):\n    return"
    resp = client.completions.create(
        model=SERVED_NAME,
        prompt=prompt if form == "text" else encode(llm, prompt),
        max_tokens=4,
        temperature=0,
        echo=True,
        logprobs=1,
        extra_body=IGNORE_EOS,
    )
    choice = resp.choices[0]
    lp = choice.logprobs
    assert lp is not None and lp.tokens is not None and lp.text_offset is not None
    assert len(lp.tokens) == len(encode(llm, prompt)) + 4
    specials = set(llm.get_tokenizer().all_special_tokens)
    for token, offset in zip(lp.tokens, lp.text_offset, strict=True):
        # A partial UTF-8 character is not in the text as such, and the text may or may not
        # spell out special tokens; every other token sits at its offset.
        if "\ufffd" not in token and token not in specials:
            assert choice.text[offset : offset + len(token)] == token, (offset, token)


def test_stop_string(client: OpenAI, llm: LLM) -> None:
    # A stop string taken from the middle of a free-running greedy output, so it must trigger.
    def candidates() -> Iterator[tuple[str, str, str]]:
        for prompt in ["x = 1\ny = 2\nprint(", "for i in range(10):", *PROMPTS]:
            (free,) = offline(llm, [prompt], temperature=0, max_tokens=16, ignore_eos=True)
            text = free.outputs[0].text
            for piece in token_texts(llm, free.outputs[0].token_ids)[1:]:
                if piece.strip() and piece.isprintable() and "\ufffd" not in piece:
                    before = text[: text.index(piece)]
                    if before and "\ufffd" not in before:
                        yield prompt, piece, before

    prompt, stop, before = next(candidates())
    (want,) = offline(llm, [prompt], temperature=0, max_tokens=16, ignore_eos=True, stop=[stop])
    assert want.outputs[0].finish_reason == "stop"

    resp = client.completions.create(
        model=SERVED_NAME,
        prompt=prompt,
        max_tokens=16,
        temperature=0,
        stop=[stop],
        extra_body=IGNORE_EOS,
    )
    choice = resp.choices[0]
    assert choice.text == want.outputs[0].text == before
    assert choice.finish_reason == "stop"
    assert choice.model_extra is not None and choice.model_extra["stop_reason"] == stop
    stream = client.completions.create(
        model=SERVED_NAME,
        prompt=prompt,
        max_tokens=16,
        temperature=0,
        stop=[stop],
        stream=True,
        extra_body=IGNORE_EOS,
    )
    _, texts, finishes = collect_stream(stream)
    assert texts == {0: before} and finishes == {0: ["stop"]}
    assert resp.usage is not None
    assert resp.usage.completion_tokens == len(want.outputs[0].token_ids)


def test_eos_finishes_with_stop(client: OpenAI, llm: LLM) -> None:
    """A logit bias on EOS makes the model end at once: finish_reason 'stop'."""
    eos = llm.get_tokenizer().eos_token_id
    assert eos is not None
    (want,) = offline(llm, [PROMPTS[0]], temperature=0, max_tokens=8, logit_bias={eos: 100.0})
    assert want.outputs[0].finish_reason == "stop"
    resp = client.completions.create(
        model=SERVED_NAME,
        prompt=PROMPTS[0],
        max_tokens=8,
        temperature=0,
        logit_bias={str(eos): 100},
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "stop" and choice.text == want.outputs[0].text == ""
    assert resp.usage is not None
    assert resp.usage.completion_tokens == len(want.outputs[0].token_ids)


def test_seed(client: OpenAI, llm: LLM) -> None:
    def sample(seed: int) -> str:
        resp = client.completions.create(
            model=SERVED_NAME,
            prompt=PROMPTS[3],
            max_tokens=12,
            temperature=1.0,
            seed=seed,
            extra_body=IGNORE_EOS,
        )
        return resp.choices[0].text

    a, again, b = sample(1234), sample(1234), sample(4321)
    assert a == again
    assert a != b
    (want,) = offline(llm, [PROMPTS[3]], temperature=1.0, seed=1234, max_tokens=12, ignore_eos=True)
    assert a == want.outputs[0].text  # seeded sampling does not depend on the batch


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_loglikelihood_like_lm_eval(client: OpenAI, llm: LLM, max_tokens: int) -> None:
    """lm-eval's ``local-completions``: token-id prompts, echo, logprobs=1, temperature 0;
    the prompt's token logprobs are the loglikelihood of a continuation."""
    contexts = [encode(llm, PROMPTS[0]) + encode(llm, " return n")[1:], encode(llm, PROMPTS[3])]
    resp = client.completions.create(
        model=SERVED_NAME,
        prompt=contexts,
        max_tokens=max_tokens,
        logprobs=1,
        echo=True,
        temperature=0,
        seed=1234,
    )
    want = offline(llm, contexts, temperature=0, max_tokens=1, prompt_logprobs=1, logprobs=1)
    assert len(resp.choices) == len(contexts)
    for choice, ids, out in zip(resp.choices, contexts, want, strict=True):
        lp = choice.logprobs
        assert lp is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
        assert lp.tokens is not None and lp.text_offset is not None
        assert len(lp.token_logprobs) == len(ids) + max_tokens
        assert (
            len(lp.tokens) == len(lp.top_logprobs) == len(lp.text_offset) == len(ids) + max_tokens
        )
        assert lp.tokens[: len(ids)] == token_texts(llm, ids)
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert out.prompt_logprobs is not None
        expected = [pos[t].logprob for t, pos in zip(ids[1:], out.prompt_logprobs[1:], strict=True)]
        assert lp.token_logprobs[1 : len(ids)] == pytest.approx(expected, abs=ATOL)
        # lm-eval's is_greedy: the top-1 entry of each position vs the actual token.
        for i in range(1, len(ids)):
            top = lp.top_logprobs[i]
            assert top is not None and len(top) == 1
            best = max(out.prompt_logprobs[i].values(), key=lambda x: x.logprob)
            assert next(iter(top.values())) == pytest.approx(best.logprob, abs=ATOL)
        if max_tokens:
            comp = out.outputs[0]
            assert comp.logprobs is not None
            assert lp.tokens[-1] == token_texts(llm, comp.token_ids)[0]
            assert lp.token_logprobs[-1] == pytest.approx(
                comp.logprobs[0][comp.token_ids[0]].logprob, abs=ATOL
            )
        assert choice.finish_reason == "length"
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == sum(len(c) for c in contexts)
    assert resp.usage.completion_tokens == max_tokens * len(contexts)


# -- chat --------------------------------------------------------------------------------------
def test_chat_matches_offline(client: OpenAI, llm: LLM) -> None:
    max_tokens = 10
    (want,) = llm.chat(
        MESSAGES,
        SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
        use_tqdm=False,
    )
    prompt_tokens = len(llm.engine.apply_chat_template(MESSAGES))

    resp = client.chat.completions.create(
        model=SERVED_NAME,
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=max_tokens,
        temperature=0,
        extra_body=IGNORE_EOS,
    )
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion"
    (choice,) = resp.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == want.outputs[0].text
    assert choice.finish_reason == "length"
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == prompt_tokens
    assert resp.usage.completion_tokens == max_tokens
    assert resp.usage.total_tokens == prompt_tokens + max_tokens

    # max_completion_tokens is the newer name of the same limit.
    newer = client.chat.completions.create(
        model=SERVED_NAME,
        messages=MESSAGES,  # type: ignore[arg-type]
        max_completion_tokens=max_tokens,
        temperature=0,
        extra_body=IGNORE_EOS,
    )
    assert newer.choices[0].message.content == want.outputs[0].text

    stream = client.chat.completions.create(
        model=SERVED_NAME,
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=IGNORE_EOS,
    )
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    *body, last = chunks
    text = "".join(c.choices[0].delta.content or "" for c in body)
    assert text == want.outputs[0].text
    finishes = [c.choices[0].finish_reason for c in body if c.choices[0].finish_reason]
    assert finishes == ["length"] and body[-1].choices[0].finish_reason == "length"
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (prompt_tokens, max_tokens)


def test_chat_n_seeded_matches_offline(client: OpenAI, llm: LLM) -> None:
    n, seed = 2, 5
    params = SamplingParams(n=n, temperature=1.0, seed=seed, max_tokens=8, ignore_eos=True)
    (want,) = llm.chat(MESSAGES, params, use_tqdm=False)
    expected = [c.text for c in want.outputs]
    assert expected[0] != expected[1]

    resp = client.chat.completions.create(
        model=SERVED_NAME,
        messages=MESSAGES,  # type: ignore[arg-type]
        n=n,
        max_tokens=8,
        temperature=1.0,
        seed=seed,
        extra_body=IGNORE_EOS,
    )
    assert [c.index for c in resp.choices] == [0, 1]
    assert [c.message.content for c in resp.choices] == expected
    assert resp.usage is not None and resp.usage.completion_tokens == 2 * 8

    stream = client.chat.completions.create(
        model=SERVED_NAME,
        messages=MESSAGES,  # type: ignore[arg-type]
        n=n,
        max_tokens=8,
        temperature=1.0,
        seed=seed,
        stream=True,
        extra_body=IGNORE_EOS,
    )
    texts: dict[int, str] = defaultdict(str)
    roles: dict[int, int] = defaultdict(int)
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            roles[c.index] += c.delta.role == "assistant"
    assert dict(texts) == {0: expected[0], 1: expected[1]}
    assert dict(roles) == {0: 1, 1: 1}  # one role chunk per choice


def test_chat_logprobs(client: OpenAI, llm: LLM) -> None:
    k, max_tokens = 2, 6
    (want,) = llm.chat(
        MESSAGES,
        SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=k),
        use_tqdm=False,
    )
    comp = want.outputs[0]
    assert comp.logprobs is not None

    def check(content: list[Any]) -> None:
        assert len(content) == max_tokens
        assert [c.token for c in content] == token_texts(llm, comp.token_ids)
        for c, tid, pos in zip(content, comp.token_ids, comp.logprobs or [], strict=True):
            assert c.logprob == pytest.approx(pos[tid].logprob, abs=ATOL)
            assert c.bytes == list(c.token.encode())
            assert len(c.top_logprobs) == k
            assert c.top_logprobs[0].logprob == pytest.approx(c.logprob, abs=1e-6)  # greedy
            assert c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob

    resp = client.chat.completions.create(
        model=SERVED_NAME,
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=max_tokens,
        temperature=0,
        logprobs=True,
        top_logprobs=k,
        extra_body=IGNORE_EOS,
    )
    logprobs = resp.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    check(logprobs.content)

    stream = client.chat.completions.create(
        model=SERVED_NAME,
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=max_tokens,
        temperature=0,
        logprobs=True,
        top_logprobs=k,
        stream=True,
        extra_body=IGNORE_EOS,
    )
    streamed = [
        entry
        for chunk in stream
        for c in chunk.choices
        if c.logprobs is not None
        for entry in c.logprobs.content or []
    ]
    check(streamed)

    plain = client.chat.completions.create(
        model=SERVED_NAME,
        messages=MESSAGES,
        max_tokens=2,
        temperature=0,  # type: ignore[arg-type]
    )
    assert plain.choices[0].logprobs is None


def test_metrics_count_a_request(server: ServerProcess, client: OpenAI, llm: LLM) -> None:
    r = httpx.get(f"{server.base_url}/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    before = wait_idle(server)
    prompt, max_tokens = PROMPTS[2], 7
    client.completions.create(
        model=SERVED_NAME, prompt=prompt, max_tokens=max_tokens, extra_body=IGNORE_EOS
    )
    after = wait_idle(server)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("convoy:prompt_tokens_total") == len(encode(llm, prompt))
    assert delta("convoy:generation_tokens_total") == max_tokens
    assert delta('convoy:request_success_total{finished_reason="length"}') == 1
    for histogram in (
        "time_to_first_token_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
    ):
        assert delta(f"convoy:{histogram}_count") == 1, histogram
    assert delta("convoy:inter_token_latency_seconds_count") == max_tokens - 1


def test_metrics_name_the_backends_in_use(server: ServerProcess, llm: LLM) -> None:
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    info = [line for line in text.splitlines() if line.startswith("convoy:backend_info{")]
    assert len(info) == 1 and info[0].endswith(" 1.0")
    for part in ("attention", "linear", "elementwise", "greedy_screen"):
        assert f"{part}=" in info[0], part
    # The same model on the same machine: the same kernels as the offline engine.
    for part in ("attention", "elementwise"):
        assert f'{part}="{llm.engine.backends[part]}"' in info[0], part


def test_prefix_cache_reports_cached_tokens_per_salt(
    server: ServerProcess, client: OpenAI, llm: LLM
) -> None:
    # A prompt no other test sends, a few KV blocks long.
    prompt = "def prefix_cache_probe(alpha, beta, gamma):\n" + "    total = alpha + beta\n" * 20
    n = len(encode(llm, prompt))
    block = DEFAULT_CPU_BLOCK_SIZE
    assert n > 2 * block
    before = wait_idle(server)

    def complete(**extra: Any) -> Any:
        return client.completions.create(
            model=SERVED_NAME, prompt=prompt, max_tokens=3, temperature=0, extra_body=extra
        )

    first, second, salted = complete(), complete(), complete(cache_salt="tenant-b")
    cached = [
        r.usage.prompt_tokens_details.cached_tokens
        if r.usage and r.usage.prompt_tokens_details
        else None
        for r in (first, second, salted)
    ]
    # The repeat reuses every full block but the one holding the last token; another salt
    # shares nothing.
    assert cached == [0, (n - 1) // block * block, 0]
    assert first.choices[0].text == second.choices[0].text == salted.choices[0].text
    after = wait_idle(server)
    assert (
        after["convoy:prefix_cache_queries_total"]
        - before.get("convoy:prefix_cache_queries_total", 0)
        == 3 * n
    )
    assert (
        after["convoy:prefix_cache_hits_total"] - before.get("convoy:prefix_cache_hits_total", 0)
        == cached[1]
    )
