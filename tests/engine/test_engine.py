"""LLMEngine driven step by step: aborts, bad requests, admission, model failures, metrics,
stop strings and stop token ids, and the text it streams (never rewritten, no broken UTF-8)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from convoy import LLM, RequestOutput, SamplingParams
from convoy.engine.engine import LLMEngine
from convoy.outputs import CompletionOutput

FFFD = "\ufffd"
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def model_path(make_checkpoint: Callable[..., Path]) -> str:
    return str(make_checkpoint("llama"))


def ids(n: int, salt: int = 0) -> list[int]:
    """A prompt of ``n`` ordinary (non-special) token ids."""
    return [5 + (37 * i + 11 * salt) % 500 for i in range(n)]


def decode(llm: LLM, token_ids: list[int]) -> str:
    text = llm.get_tokenizer().decode(
        token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
    )
    assert isinstance(text, str)
    return text


class Collector:
    """Records every RequestOutput the engine hands out and checks the streaming contract:
    a request finishes exactly once, nothing arrives for it afterwards, and the text of each
    sample only ever grows by extension (never rewritten)."""

    def __init__(self, check_stream: bool = True) -> None:
        self.check_stream = check_stream
        self.finals: dict[str, list[RequestOutput]] = {}
        self.texts: dict[tuple[str, int], list[str]] = {}

    def add(self, outputs: Iterable[RequestOutput]) -> None:
        for out in outputs:
            rid = out.request_id
            assert rid not in self.finals, f"output for {rid!r} after it had finished"
            for comp in out.outputs:
                history = self.texts.setdefault((rid, comp.index), [])
                if history and self.check_stream:
                    assert comp.text.startswith(history[-1]), (
                        f"{rid}[{comp.index}]: text {history[-1]!r} was rewritten as {comp.text!r}"
                    )
                history.append(comp.text)
            if out.finished:
                assert all(c.finish_reason is not None for c in out.outputs)
                self.finals.setdefault(rid, []).append(out)
            else:
                assert any(c.finish_reason is None for c in out.outputs)

    def drain(self, engine: LLMEngine, max_steps: int = 2000) -> None:
        for _ in range(max_steps):
            if not engine.has_unfinished_requests():
                return
            self.add(engine.step())
        raise AssertionError("the engine did not finish its requests")

    def final(self, rid: str) -> RequestOutput:
        assert len(self.finals.get(rid, [])) == 1, f"{rid!r} finished {self.finals.get(rid)}"
        return self.finals[rid][0]


def assert_idle_and_clean(engine: LLMEngine) -> None:
    assert not engine.has_unfinished_requests()
    assert engine.kv_cache.pool.num_free_blocks == engine.kv_cache.num_blocks
    engine.check_integrity()


def run_alone(model_path: str, prompt: str | list[int], params: SamplingParams) -> RequestOutput:
    llm = LLM(model=model_path, num_kv_blocks=64)
    return llm.generate([prompt], params, use_tqdm=False)[0]


def token_ids_of(out: RequestOutput) -> list[list[int]]:
    return [c.token_ids for c in out.outputs]


# -- aborts ----------------------------------------------------------------------------------
def test_abort_at_any_time_every_request_ends_exactly_once(model_path: str) -> None:
    # An 8-token budget makes the 40-token prompt take many steps to prefill.
    llm = LLM(model=model_path, num_kv_blocks=256, max_num_batched_tokens=8, max_model_len=256)
    engine = llm.engine
    seeded_pair = SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True)
    requests: dict[str, tuple[list[int], SamplingParams]] = {
        "short": (ids(3, 1), GREEDY),
        "pair": (ids(4, 2), GREEDY.clone(n=2)),  # aborted mid-decode
        "quick": (ids(2, 3), GREEDY.clone(max_tokens=2)),  # finishes, then is aborted
        "pair2": (ids(5, 4), seeded_pair),
        "long": (ids(40, 5), GREEDY),  # aborted mid-prefill
        "late": (ids(30, 6), GREEDY),  # aborted while still waiting
    }
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    collector = Collector()
    sched = engine.scheduler

    def mid_prefill() -> bool:
        r = sched.requests["long"]
        return 0 < r.num_computed_tokens < r.num_prompt_tokens

    def mid_decode() -> bool:
        pair = [sched.requests.get(f"{i}_pair") for i in range(2)]
        return all(r is not None and 0 < r.num_output_tokens < 12 for r in pair)

    for _ in range(40):
        collector.add(engine.step())
        if mid_prefill() and mid_decode():
            break
    else:
        raise AssertionError("never saw 'long' mid-prefill while 'pair' was mid-decode")
    assert sched.requests["late"].num_computed_tokens == 0  # still waiting
    assert "quick" in collector.finals  # already done

    aborted = engine.abort_request(["long", "pair", "late", "no-such-request", "quick"])
    collector.add(aborted)
    assert sorted(o.request_id for o in aborted) == ["late", "long", "pair"]
    assert engine.abort_request("no-such-request") == []
    engine.check_integrity()

    collector.drain(engine)
    # Aborting finished requests is a no-op: no second final output.
    assert engine.abort_request(list(requests)) == []

    assert set(collector.finals) == set(requests)
    for rid, (_, params) in requests.items():
        out = collector.final(rid)
        assert len(out.outputs) == params.n
        reasons = {c.finish_reason for c in out.outputs}
        if rid in ("long", "pair", "late"):
            assert reasons == {"abort"}, rid
        else:
            assert reasons == {"length"}, rid
    assert token_ids_of(collector.final("long")) == [[]]
    assert token_ids_of(collector.final("late")) == [[]]
    assert all(0 < len(t) < 12 for t in token_ids_of(collector.final("pair")))
    assert_idle_and_clean(engine)

    # The survivors were not disturbed by the aborts around them.
    for rid in ("short", "quick", "pair2"):
        prompt, params = requests[rid]
        ref = run_alone(model_path, prompt, params)
        assert token_ids_of(collector.final(rid)) == token_ids_of(ref), rid


# -- validation ------------------------------------------------------------------------------
def test_bad_requests_fail_alone(model_path: str) -> None:
    llm = LLM(model=model_path, num_kv_blocks=256, max_model_len=64)
    engine = llm.engine
    good_prompt = ids(6, 7)
    engine.add_request("good-1", good_prompt, GREEDY)
    collector = Collector()
    collector.add(engine.step())

    bad: list[tuple[str, list[int], SamplingParams, list[str]]] = [
        ("empty", [], GREEDY, ["empty"]),
        ("huge-id", [5, 10**6, 6], GREEDY, ["1000000", "512"]),
        ("negative-id", [5, -1, 6], GREEDY, ["-1"]),
        ("too-long", ids(70), GREEDY.clone(max_tokens=1), ["70", "64"]),
        ("too-long-with-output", ids(50), GREEDY.clone(max_tokens=20), ["50", "20", "64"]),
        ("good-1", good_prompt, GREEDY, ["good-1"]),  # duplicate id
    ]
    for rid, prompt, params, words in bad:
        with pytest.raises(ValueError) as excinfo:
            engine.add_request(rid, prompt, params)
        for word in words:
            assert word in str(excinfo.value), (rid, str(excinfo.value))
        # Nothing of the refused request stayed behind.
        assert engine.num_unfinished_requests == 1
        assert set(engine.scheduler.requests) == {"good-1"}
        engine.check_integrity()

    # At the limit exactly is fine, and max_tokens=None fills the context.
    engine.add_request("fits-exactly", ids(54, 8), GREEDY.clone(max_tokens=10))
    engine.add_request("fills-context", ids(60, 9), GREEDY.clone(max_tokens=None))
    engine.add_request("good-2", good_prompt, GREEDY)
    collector.drain(engine)

    ref = run_alone(model_path, good_prompt, GREEDY)
    for rid in ("good-1", "good-2"):
        assert token_ids_of(collector.final(rid)) == token_ids_of(ref), rid
    assert len(collector.final("fits-exactly").outputs[0].token_ids) == 10
    fills = collector.final("fills-context").outputs[0]
    assert (len(fills.token_ids), fills.finish_reason) == (4, "length")
    assert set(collector.finals) == {"good-1", "good-2", "fits-exactly", "fills-context"}
    assert_idle_and_clean(engine)


def test_request_id_colliding_with_a_sample_id_is_refused_cleanly(model_path: str) -> None:
    llm = LLM(model=model_path, num_kv_blocks=64)
    engine = llm.engine
    engine.add_request("0_x", ids(4), GREEDY.clone(max_tokens=3))
    try:
        engine.add_request("x", ids(4), GREEDY.clone(n=2, max_tokens=3))
    except ValueError:
        # Refusing it is fine, but then nothing of it may stay behind.
        assert engine.num_unfinished_requests == 1
    collector = Collector()
    collector.drain(engine, max_steps=50)
    assert "0_x" in collector.finals
    assert collector.final("0_x").outputs[0].finish_reason == "length"
    assert_idle_and_clean(engine)


def test_request_that_cannot_fit_the_pool_is_refused_at_admission(model_path: str) -> None:
    llm = LLM(model=model_path, num_kv_blocks=4, block_size=16)
    engine = llm.engine
    assert engine.max_model_len == 64  # 4 blocks of 16, below the model's 1024
    with pytest.raises(ValueError, match="70"):
        engine.add_request("too-big", ids(70), GREEDY.clone(max_tokens=1))
    assert not engine.has_unfinished_requests()

    # 40 + 20 tokens fit (in all 4 blocks).
    params = GREEDY.clone(max_tokens=20)
    engine.add_request("fits", ids(40, 1), params)
    collector = Collector()
    collector.drain(engine)
    out = collector.final("fits").outputs[0]
    assert (len(out.token_ids), out.finish_reason) == (20, "length")
    assert out.token_ids == run_alone(model_path, ids(40, 1), params).outputs[0].token_ids
    assert_idle_and_clean(engine)

    # Two 20 + 40 token requests start together but cannot both grow to 60 tokens: the
    # younger is preempted and recomputed, and both still finish with the right tokens.
    params = GREEDY.clone(max_tokens=40)
    engine.add_request("a", ids(20, 2), params)
    engine.add_request("b", ids(20, 3), params)
    collector.drain(engine)
    assert engine.scheduler.num_preemptions > 0
    for rid, salt in (("a", 2), ("b", 3)):
        out = collector.final(rid).outputs[0]
        assert (len(out.token_ids), out.finish_reason) == (40, "length")
        assert out.token_ids == run_alone(model_path, ids(20, salt), params).outputs[0].token_ids
    assert_idle_and_clean(engine)


# -- failures --------------------------------------------------------------------------------
def test_model_failure_fails_only_that_steps_requests(
    model_path: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    llm = LLM(model=model_path, num_kv_blocks=64, max_num_seqs=2)
    engine = llm.engine
    seeded = SamplingParams(temperature=1.0, seed=11, max_tokens=10, ignore_eos=True)
    engine.add_request("a", ids(20, 1), seeded)
    # max_num_seqs=2: "a" and b's first sample run; b's second sample and "c" wait, so "c"
    # is not in the failing step (b's waiting sample fails with its parent).
    engine.add_request("b", ids(5, 2), GREEDY.clone(n=2))
    engine.add_request("c", ids(7, 3), GREEDY)
    collector = Collector()
    collector.add(engine.step())
    assert engine.kv_cache.pool.num_free_blocks < engine.kv_cache.num_blocks

    real_execute = engine.runner.execute
    calls = 0

    def fail_once(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("injected model failure")
        return real_execute(*args, **kwargs)

    monkeypatch.setattr(engine.runner, "execute", fail_once)
    failed = engine.step()
    collector.add(failed)
    assert "injected model failure" in caplog.text

    assert sorted(o.request_id for o in failed) == ["a", "b"]
    for out in failed:
        assert out.finished
        assert {c.finish_reason for c in out.outputs} == {"error"}
    # "a" may have been mid-prefill or decoding; either way its blocks are back.
    assert engine.num_unfinished_requests == 1
    assert engine.scheduler.requests["c"].num_computed_tokens == 0
    assert engine.kv_cache.pool.num_free_blocks == engine.kv_cache.num_blocks
    engine.check_integrity()

    # The engine goes on serving, correctly.
    engine.add_request("a-again", ids(20, 1), seeded)
    engine.add_request("b-again", ids(5, 2), GREEDY.clone(n=2))
    collector.drain(engine)
    assert calls > 1
    assert token_ids_of(collector.final("c")) == token_ids_of(
        run_alone(model_path, ids(7, 3), GREEDY)
    )
    assert token_ids_of(collector.final("a-again")) == token_ids_of(
        run_alone(model_path, ids(20, 1), seeded)
    )
    assert token_ids_of(collector.final("b-again")) == token_ids_of(
        run_alone(model_path, ids(5, 2), GREEDY.clone(n=2))
    )
    assert_idle_and_clean(engine)


# -- metrics ---------------------------------------------------------------------------------
def test_metrics_are_ordered(model_path: str) -> None:
    llm = LLM(model=model_path, num_kv_blocks=64, max_num_seqs=2)
    engine = llm.engine
    arrival = time.time() - 5.0
    engine.add_request("given-arrival", ids(9, 1), GREEDY, arrival_time=arrival)
    engine.add_request("b", ids(30, 2), GREEDY.clone(n=2))
    # max_num_seqs=2 and three samples ahead of it: not scheduled before it is aborted.
    engine.add_request("waiting", ids(3, 3), GREEDY)
    collector = Collector()
    collector.add(engine.step())
    collector.add(engine.abort_request("waiting"))
    collector.drain(engine)

    for rid in ("given-arrival", "b"):
        m = collector.final(rid).metrics
        assert m.first_scheduled_time is not None
        assert m.first_token_time is not None
        assert m.finish_time is not None
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finish_time
    assert collector.final("given-arrival").metrics.arrival_time == arrival
    m = collector.final("waiting").metrics
    assert m.first_scheduled_time is None and m.first_token_time is None
    assert m.finish_time is not None and m.arrival_time <= m.finish_time


# -- stop strings and stop token ids ---------------------------------------------------------
STOP_PROMPT = "def fibonacci(n):\n    return"


def generate_one(
    llm: LLM, prompt: str, params: SamplingParams, check_stream: bool = True
) -> CompletionOutput:
    engine = llm.engine
    rid = engine.new_request_id()
    engine.add_request(rid, prompt, params)
    collector = Collector(check_stream)
    collector.drain(engine)
    (comp,) = collector.final(rid).outputs
    return comp


def token_spans(llm: LLM, token_ids: list[int]) -> list[tuple[int, int] | None]:
    """The characters each token contributes to decode(token_ids), where that is clear (None
    for a token that ends or continues an incomplete UTF-8 character)."""
    full = decode(llm, token_ids)
    ends: list[int | None] = [0]
    for k in range(1, len(token_ids) + 1):
        prefix = decode(llm, token_ids[:k])
        clean = full.startswith(prefix) and not prefix.endswith(FFFD)
        ends.append(len(prefix) if clean else None)
    spans: list[tuple[int, int] | None] = []
    for k in range(len(token_ids)):
        start, end = ends[k], ends[k + 1]
        spans.append((start, end) if start is not None and end is not None else None)
    return spans


def find_straddling_stop(text: str, spans: list[tuple[int, int] | None]) -> tuple[str, int, int]:
    """(stop, its start, the index of the token completing it): a stop string that starts
    strictly inside token k and ends inside token k + 1, and first occurs there."""
    for k in range(len(spans) - 1):
        here, after = spans[k], spans[k + 1]
        if here is None or after is None or after[1] - after[0] < 1:
            continue
        for i in range(here[0] + 1, here[1]):
            stop = text[i : after[0] + 1]
            if FFFD not in stop and text.find(stop) == i:
                return stop, i, k + 1
    raise AssertionError(f"no stop string straddling two tokens in {text!r}")


def test_stop_string_straddling_tokens(model_path: str) -> None:
    llm = LLM(model=model_path, num_kv_blocks=64)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    base = generate_one(llm, STOP_PROMPT, params)
    assert len(base.token_ids) == 40
    assert base.text == decode(llm, base.token_ids)
    spans = token_spans(llm, base.token_ids)
    stop, start, last = find_straddling_stop(base.text, spans)
    # It really straddles: it starts inside one token and ends inside the next.
    first_span, last_span = spans[last - 1], spans[last]
    assert first_span is not None and last_span is not None
    assert first_span[0] < start < first_span[1] <= start + len(stop) - 1 < last_span[1]

    for include in (False, True):
        stopped = generate_one(
            llm, STOP_PROMPT, params.clone(stop=[stop], include_stop_str_in_output=include)
        )
        expected = base.text[: start + len(stop)] if include else base.text[:start]
        assert stopped.text == expected, include
        assert (stopped.finish_reason, stopped.stop_reason) == ("stop", stop)
        # Generation ends with the token that completed the stop string.
        assert stopped.token_ids == base.token_ids[: last + 1]


def test_streamed_text_is_never_rewritten_with_stop_strings(model_path: str) -> None:
    llm = LLM(model=model_path, num_kv_blocks=64)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    base = generate_one(llm, STOP_PROMPT, params)
    spans = token_spans(llm, base.token_ids)
    # A stop that begins exactly where token k begins and ends one character into token k+1:
    # after token k the text already shows the stop's first characters.
    for k in range(len(spans) - 1):
        here, after = spans[k], spans[k + 1]
        if here is None or after is None or here[1] - here[0] < 1:
            continue
        stop = base.text[here[0] : after[0] + 1]
        if FFFD not in stop and base.text.find(stop) == here[0]:
            break
    else:
        raise AssertionError("no suitable stop string")
    # generate_one streams through a Collector, which asserts text is only ever extended.
    stopped = generate_one(llm, STOP_PROMPT, params.clone(stop=[stop]))
    assert stopped.text == base.text[: here[0]]


def test_stop_token_id(model_path: str) -> None:
    llm = LLM(model=model_path, num_kv_blocks=64)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    base = generate_one(llm, STOP_PROMPT, params)
    stop_id = base.token_ids[4]
    first = base.token_ids.index(stop_id)
    stopped = generate_one(llm, STOP_PROMPT, params.clone(stop_token_ids=[stop_id]))
    assert stopped.token_ids == base.token_ids[: first + 1]
    assert (stopped.finish_reason, stopped.stop_reason) == ("stop", stop_id)
    assert stopped.text == decode(llm, base.token_ids[:first])


# -- text -----------------------------------------------------------------------------------
WORDS = ["def", " return", " x", " = ", "(", ")", ":", "\n", " é", "日本", " 🙂", " naïve", "ß"]


def test_text_is_the_decode_of_the_tokens(model_path: str) -> None:
    llm = LLM(model=model_path, num_kv_blocks=256)
    engine = llm.engine
    rng = random.Random(0)
    for i in range(8):
        prompt = "".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 12)))
        params = SamplingParams(temperature=1.0, seed=i, max_tokens=48, n=1 + i % 2)
        engine.add_request(f"r{i}", prompt, params)
    collector = Collector()
    collector.drain(engine)

    byte_tokens = 0
    for i in range(8):
        for comp in collector.final(f"r{i}").outputs:
            assert comp.finish_reason in ("length", "stop")
            full = decode(llm, comp.token_ids)
            # Lossless whichever way it ended (EOS is special, so skipped by both).
            assert comp.text == full, (i, comp.index)
            for text in collector.texts[(f"r{i}", comp.index)]:
                assert FFFD not in text or FFFD in full
            byte_tokens += sum(decode(llm, [t]) == FFFD for t in comp.token_ids)
    # The point of the test: random weights emit bytes that split UTF-8 characters.
    assert byte_tokens > 0


def test_final_only_steps_give_the_same_results_and_nothing_else(model_path: str) -> None:
    """``step(final_only=True)`` (what ``LLM.generate`` uses) hands out each request once, when
    it ends, with the same tokens, text and finish reasons as streaming every step."""
    llm = LLM(model=model_path, num_kv_blocks=256)
    engine = llm.engine
    rng = random.Random(1)

    def submit() -> None:
        for i in range(6):
            prompt = "".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 12)))
            params = SamplingParams(
                temperature=1.0, seed=i, max_tokens=40, n=1 + i % 2, stop=["e"] if i % 3 else []
            )
            engine.add_request(f"r{i}", prompt, params)

    state = rng.getstate()
    submit()
    streamed = Collector()
    streamed.drain(engine)
    rng.setstate(state)
    submit()
    finals: dict[str, RequestOutput] = {}
    while engine.has_unfinished_requests():
        for out in engine.step(final_only=True):
            assert out.finished and out.request_id not in finals
            finals[out.request_id] = out
    assert_idle_and_clean(engine)
    assert sorted(finals) == [f"r{i}" for i in range(6)]
    for rid, out in finals.items():
        want = streamed.final(rid).outputs
        assert [(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in out.outputs] == [
            (c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in want
        ]


def test_utf8_split_across_prompt_and_output_never_streams_broken_text(model_path: str) -> None:
    llm = LLM(model=model_path, num_kv_blocks=256)
    engine = llm.engine
    tok = llm.get_tokenizer()
    emoji = tok.encode("🙂", add_special_tokens=False)
    assert len(emoji) > 1  # byte-level BPE: one token per byte here
    multibyte = tok.encode("é日本🙂ß", add_special_tokens=False)
    prompts = {
        "half-emoji": [*tok.encode("I feel "), *emoji[:2]],
        "one-byte-short": [*tok.encode("x = "), *emoji[:-1]],
        "clean": tok.encode("print("),
    }
    # Pull the model towards the bytes of multi-byte characters.
    bias = {t: 4.0 for t in multibyte}
    for name, prompt in prompts.items():
        for seed in range(3):
            params = SamplingParams(temperature=1.0, seed=seed, max_tokens=24, logit_bias=bias)
            engine.add_request(f"{name}-{seed}", prompt, params)
    collector = Collector()  # asserts each step's text extends the previous one
    collector.drain(engine)

    completed = 0  # multi-byte characters put together from byte tokens across steps
    for name, prompt in prompts.items():
        prompt_text = decode(llm, prompt)
        for seed in range(3):
            (comp,) = collector.final(f"{name}-{seed}").outputs
            full = decode(llm, prompt + comp.token_ids)
            # The output is the decode of prompt + output past the prompt's own text.
            assert comp.text == full[len(prompt_text) :], (name, seed)
            for text in collector.texts[(f"{name}-{seed}", 0)]:
                assert full[len(prompt_text) :].startswith(text)
                assert FFFD not in text or FFFD in comp.text
            completed += sum(ord(c) > 127 and c != FFFD for c in comp.text)
    assert completed > 0
    assert_idle_and_clean(engine)
