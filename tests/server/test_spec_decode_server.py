"""Speculative decoding through a real ``convoy serve``: the same greedy tokens as the plain
engine, per-request control in the body, and the ``convoy:spec_decode_*`` metrics.

The server drafts with its own checkpoint (self-draft), so nearly every proposal is accepted,
and with ``adaptive`` off, so every decode drafts ``K`` tokens and the counters always move.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openai import BadRequestError, OpenAI
from openai.types.chat import ChatCompletionMessageParam

from convoy import LLM, RequestOutput, SamplingParams
from tests.server.conftest import (
    MAX_MODEL_LEN,
    SERVED_NAME,
    ServerProcess,
    managed_server,
    parse_metrics,
    wait_idle,
)

K = 3  # num_speculative_tokens
PROMPTS = [
    "def fibonacci(n):",
    "for i in range(10):\n    for j in range(10):\n",
    "class Point:\n    def __init__(self, x, y):",
]
MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Sort a list of numbers."}
]
ATOL = 1e-4
GREEDY: dict[str, Any] = {"temperature": 0, "extra_body": {"ignore_eos": True}}
COUNTERS = ("num_drafts", "num_draft_tokens", "num_accepted_tokens")


@pytest.fixture(scope="module")
def spec_server(
    tmp_path_factory: pytest.TempPathFactory, model_path: str
) -> Iterator[ServerProcess]:
    """The main server's model and sizes, drafting K tokens with itself every decode."""
    spec = {"model": model_path, "num_speculative_tokens": K, "adaptive": False}
    yield from managed_server(
        tmp_path_factory,
        model_path,
        "spec",
        "--served-model-name",
        SERVED_NAME,
        "--num-kv-blocks",
        "512",
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--speculative-config",
        json.dumps(spec),
    )


@pytest.fixture(scope="module")
def client(spec_server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=spec_server.v1, api_key="unused", max_retries=0, timeout=60)


def offline(llm: LLM, prompts: list[str], **params: Any) -> list[RequestOutput]:
    return llm.generate(prompts, SamplingParams(**params), use_tqdm=False)


def token_texts(llm: LLM, token_ids: list[int]) -> list[str]:
    return [str(llm.get_tokenizer().decode([t])) for t in token_ids]


def spec_counters(server: ServerProcess) -> dict[str, float]:
    metrics = wait_idle(server)
    return {c: metrics[f"convoy:spec_decode_{c}_total"] for c in COUNTERS}


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in before}


def assert_matches_offline(choices: list[Any], want: list[RequestOutput], llm: LLM) -> None:
    """Completions choices with logprobs: the offline engine's tokens, text and logprobs."""
    assert len(choices) == len(want)
    for choice, out in zip(choices, want, strict=True):
        comp = out.outputs[0]
        assert choice.text == comp.text
        assert choice.finish_reason == comp.finish_reason
        lp = choice.logprobs
        assert lp is not None and comp.logprobs is not None
        assert lp.tokens == token_texts(llm, comp.token_ids)
        expected = [pos[t].logprob for t, pos in zip(comp.token_ids, comp.logprobs, strict=True)]
        assert lp.token_logprobs == pytest.approx(expected, abs=ATOL)


# -- (a) the same tokens as without speculation ------------------------------------------------
def test_greedy_completions_match_the_plain_engine(
    spec_server: ServerProcess, client: OpenAI, llm: LLM
) -> None:
    before = spec_counters(spec_server)
    max_tokens = 16
    resp = client.completions.create(
        model=SERVED_NAME, prompt=PROMPTS, max_tokens=max_tokens, logprobs=2, **GREEDY
    )
    want = offline(llm, PROMPTS, temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=2)
    assert_matches_offline(resp.choices, want, llm)
    assert resp.usage is not None
    assert resp.usage.completion_tokens == max_tokens * len(PROMPTS)
    # It did speculate.
    moved = delta(before, spec_counters(spec_server))
    assert moved["num_drafts"] > 0 and moved["num_draft_tokens"] >= moved["num_drafts"]


def test_greedy_matches_the_server_without_speculation(
    client: OpenAI, server: ServerProcess
) -> None:
    plain = OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=60)
    kwargs: dict[str, Any] = dict(model=SERVED_NAME, prompt=PROMPTS, max_tokens=20, **GREEDY)
    got = client.completions.create(**kwargs)
    want = plain.completions.create(**kwargs)
    assert [c.text for c in got.choices] == [c.text for c in want.choices]

    chat: dict[str, Any] = dict(model=SERVED_NAME, messages=MESSAGES, max_tokens=20, **GREEDY)
    got_chat = client.chat.completions.create(**chat)
    want_chat = plain.chat.completions.create(**chat)
    assert got_chat.choices[0].message.content == want_chat.choices[0].message.content


def test_streamed_and_stopped_outputs_match(client: OpenAI, llm: LLM) -> None:
    prompt = PROMPTS[1]
    full = offline(llm, [prompt], temperature=0, max_tokens=24, ignore_eos=True)[0].outputs[0]
    # Several tokens arrive per step; the stream still adds up to the offline text.
    chunks = client.completions.create(
        model=SERVED_NAME, prompt=prompt, max_tokens=24, stream=True, **GREEDY
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.text

    # A stop string completed inside a step's accepted tokens: the tokens after it are
    # dropped, in the text, the logprobs and the usage alike.
    half = len(full.text) // 2
    stop = next(
        full.text[i : i + 2]
        for i in range(half, len(full.text) - 1)
        if full.text[i : i + 2].strip() == full.text[i : i + 2]
    )
    want = offline(
        llm, [prompt], temperature=0, max_tokens=24, ignore_eos=True, stop=[stop], logprobs=1
    )[0]
    assert want.outputs[0].finish_reason == "stop"
    resp = client.completions.create(
        model=SERVED_NAME, prompt=prompt, max_tokens=24, stop=[stop], logprobs=1, **GREEDY
    )
    assert_matches_offline(resp.choices, [want], llm)
    assert resp.usage is not None
    assert resp.usage.completion_tokens == len(want.outputs[0].token_ids)
    chunks = client.completions.create(
        model=SERVED_NAME, prompt=prompt, max_tokens=24, stop=[stop], stream=True, **GREEDY
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.outputs[0].text


# -- (b) per-request control -------------------------------------------------------------------
def test_speculation_off_for_one_request(
    spec_server: ServerProcess, client: OpenAI, llm: LLM
) -> None:
    before = spec_counters(spec_server)
    resp = client.completions.create(
        model=SERVED_NAME,
        prompt=PROMPTS[0],
        max_tokens=12,
        temperature=0,
        logprobs=1,
        extra_body={"ignore_eos": True, "speculative": False},
    )
    want = offline(llm, PROMPTS[:1], temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
    assert_matches_offline(resp.choices, want, llm)
    assert delta(before, spec_counters(spec_server)) == dict.fromkeys(COUNTERS, 0.0)


@pytest.mark.parametrize("cap", [0, 1])
def test_max_speculative_tokens_caps_the_drafts(
    spec_server: ServerProcess, client: OpenAI, llm: LLM, cap: int
) -> None:
    before = spec_counters(spec_server)
    resp = client.completions.create(
        model=SERVED_NAME,
        prompt=PROMPTS[2],
        max_tokens=12,
        temperature=0,
        logprobs=1,
        extra_body={"ignore_eos": True, "max_speculative_tokens": cap},
    )
    want = offline(llm, PROMPTS[2:], temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
    assert_matches_offline(resp.choices, want, llm)
    moved = delta(before, spec_counters(spec_server))
    if cap == 0:
        assert moved == dict.fromkeys(COUNTERS, 0.0)
    else:
        assert moved["num_drafts"] > 0
        assert moved["num_draft_tokens"] == cap * moved["num_drafts"]
        assert moved["num_accepted_tokens"] <= moved["num_draft_tokens"]

    chat = client.chat.completions.create(
        model=SERVED_NAME,
        messages=MESSAGES,
        max_tokens=8,
        temperature=0,
        extra_body={"max_speculative_tokens": cap, "speculative": True},
    )
    assert chat.choices[0].message.content is not None


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"max_speculative_tokens": -1}, "max_speculative_tokens"),
        ({"max_speculative_tokens": 1.5}, "max_speculative_tokens"),
        ({"max_speculative_tokens": "many"}, "max_speculative_tokens"),
        ({"speculative": "maybe"}, "speculative"),
    ],
)
@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_bad_speculation_fields_are_400(
    spec_server: ServerProcess, client: OpenAI, extra: dict[str, Any], param: str, endpoint: str
) -> None:
    with pytest.raises(BadRequestError) as info:
        if endpoint == "completions":
            client.completions.create(model=SERVED_NAME, prompt="x", max_tokens=2, extra_body=extra)
        else:
            client.chat.completions.create(
                model=SERVED_NAME, messages=MESSAGES, max_tokens=2, extra_body=extra
            )
    assert info.value.status_code == 400
    body = info.value.response.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    assert err["message"]
    wait_idle(spec_server)


def test_the_plain_server_takes_the_fields_too(server: ServerProcess) -> None:
    """A server that does not speculate accepts (and ignores) them, and still validates."""
    body = {"model": SERVED_NAME, "prompt": "x", "max_tokens": 2}
    ok = httpx.post(
        f"{server.v1}/completions",
        json={**body, "speculative": False, "max_speculative_tokens": 2},
        timeout=60,
    )
    assert ok.status_code == 200, ok.text
    bad = httpx.post(
        f"{server.v1}/completions", json={**body, "max_speculative_tokens": -1}, timeout=60
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_speculative_tokens"


# -- (c) metrics -------------------------------------------------------------------------------
def test_metrics_count_drafts_and_acceptance(
    spec_server: ServerProcess, client: OpenAI, model_path: str
) -> None:
    h = "convoy:spec_decode_acceptance_length"
    bucket_keys = [f'{h}_bucket{{le="{float(a)}"}}' for a in range(K + 1)]
    start = wait_idle(spec_server)
    before = {c: start[f"convoy:spec_decode_{c}_total"] for c in COUNTERS}
    # After the prefill's token each prompt verifies twice (drafting K each time), then
    # decodes its last token without a draft (no room left before max_tokens).
    client.completions.create(
        model=SERVED_NAME, prompt=PROMPTS, max_tokens=2 + 2 * (K + 1), **GREEDY
    )
    wait_idle(spec_server)
    text = httpx.get(f"{spec_server.base_url}/metrics", timeout=10).text
    m = parse_metrics(text)

    # The exposed names, exactly (CounterMetricFamily adds "_total" once).
    for c in COUNTERS:
        assert f"# TYPE convoy:spec_decode_{c}_total counter" in text
        assert f"convoy:spec_decode_{c}_total" in m
        assert f"convoy:spec_decode_{c}_total_total" not in text
    drafts = m["convoy:spec_decode_num_drafts_total"]
    drafted = m["convoy:spec_decode_num_draft_tokens_total"]
    accepted = m["convoy:spec_decode_num_accepted_tokens_total"]
    assert drafts > before["num_drafts"] and drafted > before["num_draft_tokens"]
    assert 0 < accepted <= drafted <= K * drafts
    # Self-draft: the draft is the target, so nearly every proposal is accepted.
    assert accepted >= 0.8 * drafted, (accepted, drafted)

    # The histogram of accepted lengths: buckets 0..K, cumulative, count = drafts, sum =
    # accepted tokens.
    assert "# TYPE convoy:spec_decode_acceptance_length histogram" in text
    buckets = [m[key] for key in bucket_keys]
    assert buckets == sorted(buckets)
    assert buckets[-1] == m[f'{h}_bucket{{le="+Inf"}}'] == m[f"{h}_count"] == drafts
    assert m[f"{h}_sum"] == accepted
    assert f'{h}_bucket{{le="{float(K + 1)}"}}' not in m
    # This request's verifies: mostly all K accepted, with a self-draft.
    moved = [m[key] - start[key] for key in bucket_keys]
    counts = [b - a for a, b in zip([0.0, *moved], moved, strict=False)]
    assert sum(counts) == m["convoy:spec_decode_num_drafts_total"] - before["num_drafts"]
    assert counts[K] == max(counts) > 0, counts

    assert "# TYPE convoy:spec_decode_draft_length gauge" in text
    assert 0.0 <= m["convoy:spec_decode_draft_length"] <= K

    info = [line for line in text.splitlines() if line.startswith("convoy:spec_decode_info{")]
    assert len(info) == 1 and info[0].endswith(" 1.0"), info
    for label in ('method="draft_model"', f'num_speculative_tokens="{K}"', 'adaptive="false"'):
        assert label in info[0], info[0]
    assert f'draft_model="{model_path}"' in info[0], info[0]


def test_draft_length_gauge_follows_the_latest_step(
    spec_server: ServerProcess, client: OpenAI
) -> None:
    """With adaptive off a request drafts K, fewer only where max_tokens leaves no room."""
    before = spec_counters(spec_server)
    # The prefill's token, then two steps of K + 1 when every proposal is accepted: the
    # last step still had room for K.
    client.completions.create(
        model=SERVED_NAME, prompt=PROMPTS[0], max_tokens=1 + 2 * (K + 1), **GREEDY
    )
    m = wait_idle(spec_server)
    moved = delta(before, {c: m[f"convoy:spec_decode_{c}_total"] for c in COUNTERS})
    if moved["num_accepted_tokens"] == moved["num_draft_tokens"]:
        assert moved["num_drafts"] == 2
        assert m["convoy:spec_decode_draft_length"] == K
    else:
        assert 0 <= m["convoy:spec_decode_draft_length"] <= K
    client.completions.create(
        model=SERVED_NAME,
        prompt=PROMPTS[0],
        max_tokens=2,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    # Two tokens: the prefill makes the first, the one decode may not draft past max_tokens.
    m = wait_idle(spec_server)
    assert m["convoy:spec_decode_draft_length"] == 0.0


# -- (d) no speculation, no series -------------------------------------------------------------
def test_plain_server_has_no_spec_decode_series(server: ServerProcess) -> None:
    httpx.post(
        f"{server.v1}/completions",
        json={"model": SERVED_NAME, "prompt": "x", "max_tokens": 3},
        timeout=60,
    ).raise_for_status()
    wait_idle(server)
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    assert "convoy:backend_info{" in text
    assert "spec_decode" not in text
