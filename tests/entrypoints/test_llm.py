"""The offline ``LLM`` API (prompt forms, per-prompt params, order, chat, validation) and the
``convoy generate`` command line built from the same config classes."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from convoy import LLM, RequestOutput, SamplingParams
from convoy.cli import main as cli_main
from convoy.config import CONFIG_CLASSES, CacheConfig
from convoy.entrypoints.llm import reuse_order

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_path(make_checkpoint: Callable[..., Path]) -> str:
    return str(make_checkpoint("llama"))


@pytest.fixture(scope="module")
def llm(model_path: str) -> LLM:
    return LLM(model=model_path, num_kv_blocks=256)


def tokens(outputs: list[RequestOutput]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def assert_clean(llm: LLM) -> None:
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert engine.kv_cache.pool.num_free_blocks == engine.kv_cache.num_blocks
    engine.check_integrity()


# -- prompts and sampling params -------------------------------------------------------------
def test_prompt_forms(llm: LLM) -> None:
    tok = llm.get_tokenizer()
    hello, world = tok.encode("hello"), tok.encode("def world():")

    (one,) = llm.generate("hello", GREEDY, use_tqdm=False)
    assert one.prompt == "hello" and one.prompt_token_ids == hello
    assert len(one.outputs[0].token_ids) == 6

    two = llm.generate(["hello", "def world():"], GREEDY, use_tqdm=False)
    assert [o.prompt for o in two] == ["hello", "def world():"]
    assert [o.prompt_token_ids for o in two] == [hello, world]

    (as_ids,) = llm.generate(hello, GREEDY, use_tqdm=False)  # a list of ints is one prompt
    assert as_ids.prompt is None and as_ids.prompt_token_ids == hello

    lists = llm.generate([hello, world], GREEDY, use_tqdm=False)
    assert [o.prompt_token_ids for o in lists] == [hello, world]

    mixed = llm.generate(["hello", world], GREEDY, use_tqdm=False)
    assert tokens([one]) == tokens([as_ids]) == tokens(two)[:1] == tokens(lists)[:1]
    assert tokens(two) == tokens(lists) == tokens(mixed)

    assert llm.generate([], GREEDY, use_tqdm=False) == []
    with pytest.raises(TypeError):
        llm.generate([hello, 3.5], GREEDY, use_tqdm=False)  # type: ignore[list-item]
    assert_clean(llm)


def test_vllm_prompt_dicts_match_the_plain_forms(llm: LLM) -> None:
    tok = llm.get_tokenizer()
    hello, world = tok.encode("hello"), tok.encode("def world():")
    plain = llm.generate(["hello", "def world():"], GREEDY, use_tqdm=False)

    # One dict alone is one prompt, as a string is.
    (text,) = llm.generate({"prompt": "hello"}, GREEDY, use_tqdm=False)
    assert text.prompt == "hello" and text.prompt_token_ids == hello
    (ids,) = llm.generate({"prompt_token_ids": hello}, GREEDY, use_tqdm=False)
    assert ids.prompt is None and ids.prompt_token_ids == hello
    assert tokens([text]) == tokens([ids]) == tokens(plain)[:1]

    texts = llm.generate([{"prompt": "hello"}, {"prompt": "def world():"}], GREEDY, use_tqdm=False)
    assert [o.prompt for o in texts] == ["hello", "def world():"]
    id_dicts = llm.generate(
        [{"prompt_token_ids": hello}, {"prompt_token_ids": world}], GREEDY, use_tqdm=False
    )
    assert [o.prompt_token_ids for o in id_dicts] == [hello, world]
    assert tokens(texts) == tokens(id_dicts) == tokens(plain)

    # Every form in one batch, in input order.
    mixed = llm.generate(
        ["hello", {"prompt_token_ids": world}, {"prompt": "def world():"}, hello],
        GREEDY,
        use_tqdm=False,
    )
    assert [o.prompt for o in mixed] == ["hello", None, "def world():", None]
    assert tokens(mixed) == tokens(plain) + tokens(plain)[::-1]

    # Ids win over a text beside them, which is only reported back (as in vLLM); a cache salt
    # changes which cached blocks are shared, not what greedy decoding gives.
    (both,) = llm.generate({"prompt": "label", "prompt_token_ids": world}, GREEDY, use_tqdm=False)
    assert both.prompt == "label" and both.prompt_token_ids == world
    assert tokens([both]) == tokens(plain)[1:]
    salted = llm.generate(
        [{"prompt": "hello", "cache_salt": "a"}, {"prompt_token_ids": world, "cache_salt": "b"}],
        GREEDY,
        use_tqdm=False,
    )
    assert tokens(salted) == tokens(plain)
    assert_clean(llm)


@pytest.mark.parametrize(
    ("prompt", "error", "match"),
    [
        ({"text": "hello"}, ValueError, r"prompt 1: unknown prompt keys \['text'\].*'prompt'"),
        (
            {"prompt": "hi", "multi_modal_data": {}},
            ValueError,
            r"unknown prompt keys \['multi_modal_data'\]",
        ),
        ({}, ValueError, r"prompt 1: .*needs 'prompt' \(text\) or 'prompt_token_ids'"),
        ({"cache_salt": "a"}, ValueError, r"'prompt' \(text\) or 'prompt_token_ids'"),
        ({"prompt": [1, 2]}, TypeError, r"prompt 1: 'prompt' must be a string"),
        ({"prompt_token_ids": "hi"}, TypeError, r"'prompt_token_ids' must be a list of ints"),
        ({"prompt_token_ids": [1, 2.5]}, TypeError, r"'prompt_token_ids' must be a list"),
        ({"prompt": "hi", "cache_salt": 3}, TypeError, r"'cache_salt' must be a string"),
    ],
)
def test_bad_prompt_dict(llm: LLM, prompt: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        llm.generate(["hello", prompt], GREEDY, use_tqdm=False)  # type: ignore[list-item]
    assert_clean(llm)


def test_per_prompt_sampling_params(llm: LLM) -> None:
    prompts = ["a = 1", "import os", "class C:"]
    params = [
        GREEDY.clone(max_tokens=2),
        SamplingParams(temperature=1.0, seed=3, max_tokens=9, ignore_eos=True),
        GREEDY.clone(max_tokens=5, n=2),
    ]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [[len(c.token_ids) for c in o.outputs] for o in outs] == [[2], [9], [5, 5]]
    # Each prompt got its own params: the same as running it alone with them.
    for prompt, p, out in zip(prompts, params, outs, strict=True):
        (alone,) = llm.generate([prompt], p, use_tqdm=False)
        assert [c.token_ids for c in out.outputs] == [c.token_ids for c in alone.outputs]

    with pytest.raises(ValueError, match="2 sampling_params for 3 prompts"):
        llm.generate(prompts, params[:2], use_tqdm=False)
    assert_clean(llm)


def test_results_come_back_in_input_order(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    tok = llm.get_tokenizer()
    # Long prompts generate a lot, short ones one token: they finish in reverse order.
    prompts = [tok.encode("x = " * 60), tok.encode("y = " * 20), tok.encode("z"), [5, 6]]
    max_tokens = [40, 20, 3, 1]
    params = [GREEDY.clone(max_tokens=m) for m in max_tokens]

    finish_order: list[list[int]] = []
    real_step = llm.engine.step

    def recording_step(final_only: bool = False) -> list[RequestOutput]:
        outs = real_step(final_only)
        assert final_only and all(o.finished for o in outs)  # generate wants results only
        finish_order.extend(o.prompt_token_ids for o in outs if o.finished)
        return outs

    monkeypatch.setattr(llm.engine, "step", recording_step)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert finish_order != prompts  # they really did finish out of order
    assert sorted(map(tuple, finish_order)) == sorted(map(tuple, prompts))
    assert [o.prompt_token_ids for o in outs] == prompts
    assert [len(o.outputs[0].token_ids) for o in outs] == max_tokens


def test_reuse_order_groups_prompts_by_shared_prefix() -> None:
    a1, a2, a3 = [1, 1, 1, 9, 1], [1, 1, 1, 2, 5], [1, 1, 1, 2, 4]
    b1, b2 = [7, 7, 7, 7, 1], [7, 7, 7, 7, 0]
    lone, short = [3, 3, 3, 3, 3], [1, 1, 1]
    prompts = [b1, a1, lone, short, a2, b2, a3]
    # Groups by first block (3 tokens) in order of first appearance: b, a, lone, short; within
    # a group, sorted by tokens so the longest shared prefixes are neighbours.
    order = reuse_order(prompts, block_size=3)
    assert [prompts[i] for i in order] == [b2, b1, a3, a2, a1, lone, short]
    assert reuse_order([[1, 2], [3, 4], [5]], block_size=4) == [0, 1, 2]  # nothing shared


def test_shared_prefix_batches_reuse_blocks_and_keep_input_order(model_path: str) -> None:
    llm = LLM(model=model_path, num_kv_blocks=256, block_size=16)
    tok = llm.get_tokenizer()
    system = tok.encode("You are a careful Python reviewer. " * 6)  # several blocks
    others = [tok.encode(f"unrelated prompt number {i} " * 4) for i in range(3)]
    prompts = []
    for i in range(6):  # interleave the shared-prefix prompts with unrelated ones
        prompts.append([*system, *tok.encode(f"review file_{i}.py", add_special_tokens=False)])
        if i < 3:
            prompts.append(others[i])
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == prompts
    alone = [llm.generate([p], GREEDY, use_tqdm=False)[0] for p in prompts]
    assert tokens(outs) == tokens(alone)
    shared_blocks = (len(system) // 16) * 16
    # The first prompt of the group computes the shared blocks; the other five reuse them.
    cached = sorted(o.num_cached_tokens for o in outs if o.prompt_token_ids[:50] == system[:50])
    assert cached[0] == 0 and all(c >= shared_blocks for c in cached[1:])


# -- chat ------------------------------------------------------------------------------------
def chat_template_ids(llm: LLM, conversation: list[dict[str, str]]) -> list[int]:
    """transformers' own tokenized chat prompt (a BatchEncoding in transformers 5)."""
    encoded: Any = llm.get_tokenizer().apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True
    )
    if not isinstance(encoded, list):
        encoded = encoded["input_ids"]
    assert all(isinstance(t, int) for t in encoded)
    return list(encoded)


CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You write Python."},
        {"role": "user", "content": "Sort a list."},
        {"role": "assistant", "content": "sorted(xs)"},
        {"role": "user", "content": "In place? 🙂"},
    ],
]


def test_chat_applies_the_template(llm: LLM) -> None:
    expected = [chat_template_ids(llm, c) for c in CONVERSATIONS]
    assert expected[0][:2] == [0, 3]  # one BOS, then <|im_start|>
    assert expected[0][-1] != 4  # ends in the assistant header, not <|im_end|>

    (single,) = llm.chat(CONVERSATIONS[0], GREEDY, use_tqdm=False)
    assert single.prompt_token_ids == expected[0]
    assert len(single.outputs[0].token_ids) == 6

    both = llm.chat(CONVERSATIONS, GREEDY, use_tqdm=False)
    assert [o.prompt_token_ids for o in both] == expected
    assert tokens(both) == tokens(llm.generate(expected, GREEDY, use_tqdm=False))
    assert tokens(both)[0] == single.outputs[0].token_ids
    assert_clean(llm)


# -- validation ------------------------------------------------------------------------------
def test_bad_prompt_in_a_batch_names_its_index_and_leaves_nothing_queued(llm: LLM) -> None:
    cases: list[tuple[list[Any], str]] = [
        (["hello", [5, 10**6], "world"], "prompt 1"),
        (["hello", "world", []], "prompt 2"),
        ([[5, 6], [7] * 2000], "prompt 1"),  # longer than max_model_len
    ]
    for prompts, where in cases:
        with pytest.raises(ValueError, match=where):
            llm.generate(prompts, GREEDY, use_tqdm=False)
        assert_clean(llm)
    # The engine still serves.
    (out,) = llm.generate(["hello"], GREEDY, use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 6


def test_unknown_engine_argument(model_path: str) -> None:
    with pytest.raises(TypeError, match="max_num_sequences"):
        LLM(model=model_path, max_num_sequences=4)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"block_size": 0}, "block_size"),
        ({"dtype": "int3"}, "dtype"),
        ({"device": "tpu"}, "device"),
        ({"num_kv_blocks": 0}, "num_kv_blocks"),
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"max_num_batched_tokens": 0}, "max_num_batched_tokens"),
        ({"kv_cache_memory_gb": -1.0}, "kv_cache_memory_gb"),
    ],
)
def test_invalid_engine_config(model_path: str, kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        LLM(model=model_path, **kwargs)


def test_block_size_defaults_to_the_devices(model_path: str) -> None:
    """Unset, a KV block holds 128 tokens on CPU (the runs the decode attention kernel streams
    fastest) and vLLM's 16 on CUDA; a size the user gives is kept on either."""
    llm = LLM(model=model_path, num_kv_blocks=4)
    engine = llm.engine
    assert engine.config.cache.block_size == 128
    assert engine.kv_cache.block_size == engine.runner.block_size == 128
    assert engine.max_model_len == min(4 * 128, engine.arch.max_position_embeddings)
    out = llm.generate(["a b c"], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3
    assert CacheConfig().for_device("cuda").block_size == 16
    assert CacheConfig(block_size=32).for_device("cpu").block_size == 32
    assert CacheConfig(block_size=32).for_device("cuda").block_size == 32


# -- command line ----------------------------------------------------------------------------
def test_cli_generate_json_matches_the_api(llm: LLM, model_path: str, tmp_path: Path) -> None:
    env = {**os.environ, "CONVOY_CACHE_DIR": str(tmp_path / "cache")}
    # The JSON format writes text with ensure_ascii=False.
    env["PYTHONIOENCODING"] = "utf-8"
    cmd = [sys.executable, "-m", "convoy.cli", "generate", "--model", model_path]
    cmd += ["--temperature", "0", "--max-tokens", "5", "--ignore-eos", "--json"]
    cmd += ["--num-kv-blocks", "64", "hello", "world"]
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["prompt"] for r in records] == ["hello", "world"]

    expected = llm.generate(
        ["hello", "world"],
        SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
        use_tqdm=False,
    )
    assert [r["token_ids"] for r in records] == tokens(expected)
    assert [r["text"] for r in records] == [o.outputs[0].text for o in expected]
    assert {r["finish_reason"] for r in records} == {"length"}
    assert not (tmp_path / "cache").exists()  # --model given: no default model was built


def test_cli_help_lists_every_config_and_sampling_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        cli_main(["generate", "--help"])
    assert excinfo.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--max-num-batched-tokens", "--block-size", "--kv-cache-memory-gb"):
        assert flag in help_text
    for flag in ("--top-p", "--stop-token-ids", "--max-tokens", "--ignore-eos"):
        assert flag in help_text
    for cls in CONFIG_CLASSES:
        for f in dataclasses.fields(cls):
            assert "--" + f.name.replace("_", "-") in help_text, f.name
    for f in dataclasses.fields(SamplingParams):
        if f.name == "logit_bias":
            continue  # a dict: not expressible as a flag
        # The request seed is --sampling-seed: --seed is the engine's.
        flag = "--sampling-seed" if f.name == "seed" else "--" + f.name.replace("_", "-")
        assert flag in help_text, f.name


def test_cli_sampling_seed_reaches_the_request(
    llm: LLM, model_path: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["generate", "--model", model_path, "--num-kv-blocks", "64", "--json"]
    args += ["--temperature", "1.0", "--sampling-seed", "7", "--max-tokens", "8", "--ignore-eos"]
    assert cli_main([*args, "hello"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    (expected,) = llm.generate(["hello"], params, use_tqdm=False)
    assert record["token_ids"] == expected.outputs[0].token_ids


def test_cli_invalid_sampling_value(model_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli_main(["generate", "--model", model_path, "--temperature", "-1", "hello"])
    assert rc != 0
    assert "temperature" in capsys.readouterr().err


def test_cli_invalid_engine_value(model_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli_main(["generate", "--model", model_path, "--block-size", "0", "hello"])
    assert rc != 0
    assert "block_size" in capsys.readouterr().err


def test_reset_prefix_cache_makes_a_repeated_prompt_compute_in_full(model_path: str) -> None:
    llm = LLM(model=model_path, num_kv_blocks=64, block_size=16)
    prompt = list(range(5, 69))  # four full blocks
    engine = llm.engine

    def computed(run: Callable[[], object]) -> int:
        before = engine.num_prompt_tokens_computed
        run()
        return engine.num_prompt_tokens_computed - before

    first = llm.generate([prompt], GREEDY, use_tqdm=False)
    assert computed(lambda: llm.generate([prompt], GREEDY, use_tqdm=False)) < len(prompt)
    llm.reset_prefix_cache()
    again: list[RequestOutput] = []
    assert computed(lambda: again.extend(llm.generate([prompt], GREEDY, use_tqdm=False))) == len(
        prompt
    )
    assert tokens(again) == tokens(first)
