"""convoy.bench: workloads, benchmark arithmetic, roofline numbers, and the CLI end to end.

Expected values are worked out by hand in the comments, not by calling the code under test.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors import safe_open

from convoy.bench import roofline
from convoy.bench.args import result_path, vllm_length_range, workload_from_args
from convoy.bench.metrics import (
    RequestTiming,
    ThroughputResult,
    batch_phase_times,
    compute_latency,
    compute_throughput,
    percentile,
    summarize,
    tpot,
    ttft,
)
from convoy.bench.roofline import Chunk, ModelShape
from convoy.bench.workloads import (
    BenchRequest,
    jsonl_workload,
    random_workload,
    save_jsonl,
    shared_prefix_workload,
)
from convoy.checkpoints import LLAMA_25M, LLAMA_200M
from convoy.cli import build_parser, main

# -- metrics -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 10, 101])
def test_percentile_matches_numpy(n: int) -> None:
    values = list(np.random.default_rng(n).normal(size=n) * 100)
    for q in (0, 1, 25, 50, 75, 90, 99, 99.9, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), abs=1e-9)


def test_percentile_by_hand_and_errors() -> None:
    # Ranks 0..3 hold 10, 20, 30, 40; p50 is rank 1.5 -> 25; p99 is rank 2.97 -> 30 + 0.97*10.
    assert percentile([40, 10, 30, 20], 50) == 25
    assert percentile([40, 10, 30, 20], 99) == pytest.approx(39.7)
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)
    assert summarize([]) is None
    stats = summarize([1.0, 2.0, 6.0])
    assert stats is not None
    assert (stats.mean, stats.median, stats.count) == (3.0, 2.0, 3)
    assert stats.p99 == pytest.approx(5.92)  # rank 1.98: 2 + 0.98 * 4


def _timing(arrival: float, first: float, finish: float, n_in: int, n_out: int) -> RequestTiming:
    return RequestTiming(arrival, first, finish, n_in, n_out)


def test_ttft_and_tpot() -> None:
    t = _timing(100.0, 100.5, 102.5, 7, 5)
    assert ttft(t) == pytest.approx(0.5)
    assert tpot(t) == pytest.approx(0.5)  # 2 s over the 4 tokens after the first
    assert tpot(_timing(100.0, 100.5, 100.5, 7, 1)) is None  # one token: no TPOT


def test_compute_throughput_counts_rates_and_mismatches() -> None:
    timings = [
        _timing(0.0, 0.2, 1.2, 10, 11),  # ttft 0.2, tpot 1.0/10 = 0.1
        _timing(0.0, 0.4, 1.0, 20, 4),  # ttft 0.4, tpot 0.6/3 = 0.2
        _timing(0.0, 0.6, 0.6, 30, 1),  # ttft 0.6, no tpot
    ]
    r = compute_throughput(timings, elapsed_s=2.0, expected_output_lens=[11, 4, 2])
    assert (r.num_requests, r.num_input_tokens, r.num_output_tokens) == (3, 60, 16)
    assert r.requests_per_s == pytest.approx(1.5)
    assert r.input_tokens_per_s == pytest.approx(30.0)
    assert r.output_tokens_per_s == pytest.approx(8.0)
    assert r.total_tokens_per_s == pytest.approx(38.0)
    assert r.ttft_ms is not None and r.tpot_ms is not None and r.e2e_latency_ms is not None
    assert r.ttft_ms.mean == pytest.approx(400.0)
    assert r.ttft_ms.median == pytest.approx(400.0)
    assert r.ttft_ms.p99 == pytest.approx(596.0)  # rank 1.98: 400 + 0.98 * 200
    assert r.tpot_ms.count == 2  # the one-token request is left out
    assert r.tpot_ms.mean == pytest.approx(150.0)
    assert r.e2e_latency_ms.median == pytest.approx(1000.0)
    # The third request asked for 2 tokens and got 1.
    assert (r.num_expected_output_tokens, r.num_mismatched_outputs) == (17, 1)
    assert not r.output_lengths_exact
    d = json.loads(r.to_json())
    assert d["output_lengths_exact"] is False
    assert d["tpot_ms"]["count"] == 2
    assert ThroughputResult.from_dict(d) == r
    table = r.format_table()
    assert "NO (1 differ)" in table and "Total tokens/s" in table and "38.0" in table

    exact = compute_throughput(timings, elapsed_s=2.0, expected_output_lens=[11, 4, 1])
    assert exact.output_lengths_exact and "yes" in exact.format_table()
    with pytest.raises(ValueError):
        compute_throughput(timings, elapsed_s=0.0)


def test_latency_phases_and_medians() -> None:
    # Batch of 2, input 8, output 5. Prefill ends when the last first token arrives.
    it1 = [_timing(10.0, 10.1, 10.5, 8, 5), _timing(10.0, 10.2, 10.6, 8, 5)]
    it2 = [_timing(20.0, 20.4, 21.2, 8, 5), _timing(20.0, 20.4, 21.2, 8, 5)]
    it3 = [_timing(30.0, 30.2, 30.6, 8, 5), _timing(30.0, 30.2, 30.6, 8, 5)]
    prefill, decode, total = batch_phase_times(it1)
    assert prefill == pytest.approx(0.2)
    assert decode == pytest.approx(0.4)
    assert total == pytest.approx(0.6)
    r = compute_latency([it1, it2, it3], batch_size=2, input_len=8, output_len=5)
    # prefill 0.2 / 0.4 / 0.2 s -> 80 / 40 / 80 tok/s (16 tokens); median 80.
    assert r.median_prefill_tokens_per_s == pytest.approx(80.0)
    # decode 0.4 / 0.8 / 0.4 s for 2 * 4 tokens -> 20 / 10 / 20 tok/s; median 20.
    assert r.median_decode_tokens_per_s == pytest.approx(20.0)
    assert r.median_decode_step_ms == pytest.approx(100.0)  # 0.4 s / 4 steps
    assert r.median_latency_s == pytest.approx(0.6)
    assert r.output_lengths_exact
    assert r.to_dict()["num_iters"] == 3

    one = compute_latency([[_timing(0.0, 0.5, 0.5, 8, 1)]], 1, 8, 1)
    assert one.median_decode_tokens_per_s is None and one.decode_s is None
    assert "n/a" in one.format_table()
    short = compute_latency([[_timing(0.0, 0.5, 0.9, 8, 3)]], 1, 8, 5)
    assert short.num_mismatched_outputs == 1


# -- roofline ----------------------------------------------------------------------------------

# Hand-sized: C=8, 2 layers, 2 heads, 1 KV head, head_dim 4, I=16, V=32, untied.
TINY_SHAPE = ModelShape(
    hidden_size=8,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=4,
    intermediate_size=16,
    vocab_size=32,
    tie_word_embeddings=False,
)


def test_roofline_param_and_byte_counts_by_hand() -> None:
    s = TINY_SHAPE
    # q 8*8 + k 8*4 + v 8*4 + o 8*8 = 192; MLP 3*8*16 = 384.
    assert s.layer_matmul_params == 576
    # embed 256 + lm_head 256 + 2 * (576 + 2 norms of 8) + final norm 8.
    assert s.num_params == 1704
    assert roofline.weight_bytes(s, 4) == 6816
    # A step does not read the untied input embedding table: (1704 - 256) * 4.
    assert roofline.weight_bytes_per_step(s, 4) == 5792
    # K and V, 2 layers, 1 head of 4, 4 bytes.
    assert roofline.kv_bytes_per_token(s, 4) == 64
    assert roofline.kv_bytes_read(s, 4, [3, 5]) == 512
    assert roofline.decode_step_bytes(s, 4, [3, 5]) == 5792 + 512


def test_roofline_flops_by_hand() -> None:
    s = TINY_SHAPE
    # 3 new tokens after 2 cached, one LM-head row:
    #   linear 2 * 576 * 2 layers * 3 = 6912
    #   attention: (query, key) pairs 3*2 + (1+2+3) = 12; 4 * 2 layers * 2 heads * 4 * 12 = 768
    #   LM head 2 * 8 * 32 = 512
    assert roofline.forward_flops(s, 3, num_cached=2, num_logits=1) == 8192
    # By default every token gets logits: 2 more rows.
    assert roofline.forward_flops(s, 3, num_cached=2) == 8192 + 1024
    # Decode: batch 2 at context 10, 1 GB/s -> (5792 + 2*10*64) bytes = 7.072 us per 2 tokens.
    assert roofline.decode_tokens_per_s_bound(s, 4, 2, 10, 1.0) == pytest.approx(2 / 7.072e-6)
    # Prefill of 3 tokens: forward_flops(3, 0, 1) = 6912 + 4*2*2*4*6 + 512 = 7808 at 1 GFLOP/s.
    assert roofline.prefill_tokens_per_s_bound(s, 3, 1.0) == pytest.approx(3 / 7.808e-6)


def test_roofline_shape_sources_agree() -> None:
    hf = {
        "hidden_size": 8,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "intermediate_size": 16,
        "vocab_size": 32,
    }
    assert ModelShape.from_dict(hf) == TINY_SHAPE  # head_dim = 8 // 2, untied by default
    # The benchmark sizes' parameter counts, worked out by hand in convoy.checkpoints.
    for cfg, expected in ((LLAMA_25M, 24_877_440), (LLAMA_200M, 200_827_904)):
        shape = ModelShape.from_dict({**cfg, "head_dim": 64})
        assert shape.num_params == expected


@pytest.mark.parametrize("case", ["llama", "qwen2-tied", "qwen3"])
def test_roofline_param_count_matches_checkpoint(
    make_checkpoint: Callable[..., Path], case: str
) -> None:
    from convoy.model.arch import ModelArch

    path = make_checkpoint(case)
    arch = ModelArch.from_config(json.loads((path / "config.json").read_text()))
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        stored = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118
    assert ModelShape.from_arch(arch).num_params == stored


def test_simulate_schedule_by_hand() -> None:
    # Budget 4: step 1 admits r0 (3 tokens, samples) and a 1-token chunk of r1's 2-token
    # prompt; step 2 decodes r0 (its 2nd and last token) and finishes r1's prompt (samples).
    steps = list(roofline.simulate_schedule([(3, 2), (2, 1)], 8, 4))
    assert steps == [
        [Chunk(0, 3, 0, True), Chunk(1, 1, 0, False)],
        [Chunk(0, 1, 3, True), Chunk(1, 1, 1, True)],
    ]
    # One sequence at a time: r1 waits until r0 is done.
    steps = list(roofline.simulate_schedule([(2, 2), (1, 1)], 1, 100))
    assert steps == [[Chunk(0, 2, 0, True)], [Chunk(0, 1, 2, True)], [Chunk(1, 1, 0, True)]]


def test_schedule_bound_by_hand() -> None:
    s = TINY_SHAPE
    # One 1-token request producing 1 token: one step of one chunk.
    #   bytes = 5792 + 1 position * 64 = 5856 -> 5.856 us at 1 GB/s
    #   flops = 2*576*2 + 4*2*2*4*1 + 2*8*32 = 2880 -> 2.88 us at 1 GFLOP/s
    b = roofline.schedule_bound(s, 4, [(1, 1)], 1.0, 1.0, 8, 16)
    assert b.total_s == pytest.approx(5.856e-6)
    assert (b.num_steps, b.num_memory_bound_steps) == (1, 1)
    assert b.prefill_s == pytest.approx(b.total_s) and b.decode_s == pytest.approx(0.0)
    slow = roofline.schedule_bound(s, 4, [(1, 1)], 1.0, 0.001, 8, 16)
    assert slow.total_s == pytest.approx(2.88e-3) and slow.num_memory_bound_steps == 0
    # Output 2: a second (decode) step at context 2, bytes 5792 + 128 = 5920, flops
    # 2304 + 4*2*2*4*2 + 512 = 2944 -> memory-bound 5.92 us, all of it decode.
    two = roofline.schedule_bound(s, 4, [(1, 2)], 1.0, 1.0, 8, 16)
    assert two.prefill_s == pytest.approx(5.856e-6)
    assert two.decode_s == pytest.approx(5.92e-6)


def test_machine_measurements_are_positive() -> None:
    assert roofline.measure_memory_bandwidth(size_mb=8, repeats=2) > 0
    assert roofline.measure_matmul_flops(n=128, repeats=2) > 0


# -- workloads ---------------------------------------------------------------------------------


def test_random_workload_shape_and_determinism() -> None:
    avoid = {0, 1, 2, 3, 4}
    w = random_workload(50, (5, 9), (2, 4), vocab_size=40, seed=3, avoid_ids=avoid)
    assert len(w) == 50
    assert all(5 <= r.input_len <= 9 and 2 <= r.output_len <= 4 for r in w)
    ids = {t for r in w for t in r.prompt_token_ids}
    assert ids <= set(range(5, 40)) and len(ids) > 30  # spread over the allowed ids
    assert {r.input_len for r in w} == set(range(5, 10))  # both ends of the range occur
    assert w == random_workload(50, (5, 9), (2, 4), vocab_size=40, seed=3, avoid_ids=avoid)
    assert w != random_workload(50, (5, 9), (2, 4), vocab_size=40, seed=4, avoid_ids=avoid)
    # Pinned values: saved workloads and peers' harnesses rely on the stream never changing.
    assert random_workload(2, (2, 4), (1, 3), 50, seed=7, avoid_ids={0, 1}) == [
        BenchRequest([29, 39, 42, 12], 3),
        BenchRequest([4, 16, 15], 3),
    ]
    with pytest.raises(ValueError):
        random_workload(1, (5, 4), (1, 1), 10)
    with pytest.raises(ValueError):
        random_workload(1, (1, 1), (1, 1), 2, avoid_ids={0, 1})


def test_shared_prefix_workload() -> None:
    w = shared_prefix_workload(3, 6, 4, 5, 7, vocab_size=100, seed=1, avoid_ids={0})
    assert len(w) == 15 and all(r.input_len == 10 and r.output_len == 7 for r in w)
    groups = [w[i * 5 : (i + 1) * 5] for i in range(3)]
    prefixes = [g[0].prompt_token_ids[:6] for g in groups]
    for g, prefix in zip(groups, prefixes, strict=True):
        assert all(r.prompt_token_ids[:6] == prefix for r in g)
        assert len({tuple(r.prompt_token_ids[6:]) for r in g}) == 5  # own suffixes
    assert len({tuple(p) for p in prefixes}) == 3
    assert all(0 not in r.prompt_token_ids for r in w)
    assert w == shared_prefix_workload(3, 6, 4, 5, 7, vocab_size=100, seed=1, avoid_ids={0})
    assert shared_prefix_workload(2, 3, 2, 2, 5, 20, seed=1, avoid_ids={0})[:2] == [
        BenchRequest([9, 10, 15, 19, 1], 5),
        BenchRequest([9, 10, 15, 3, 16], 5),
    ]


def test_jsonl_workload(tmp_path: Path, tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    path = tmp_path / "prompts.jsonl"
    lines = [
        {"prompt": "def f(x):"},
        {"prompt_token_ids": [5, 6, 7], "output_len": 3},
        {"prompt": "import os", "output_len": 9},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    w = jsonl_workload(path, tok, output_len=4)
    assert w == [
        BenchRequest(tok.encode("def f(x):"), 4),
        BenchRequest([5, 6, 7], 3),
        BenchRequest(tok.encode("import os"), 9),
    ]
    assert w[0].prompt_token_ids[0] == tok.bos_token_id  # encoded like a plain text prompt

    saved = tmp_path / "saved.jsonl"
    save_jsonl(w, saved)
    assert jsonl_workload(saved, None, None) == w

    path.write_text('{"prompt_token_ids": [1]}\n{"text": "x"}\n')
    with pytest.raises(ValueError, match=r"prompts.jsonl:1: .*output_len"):
        jsonl_workload(path, tok, None)
    with pytest.raises(ValueError, match=r"prompts.jsonl:2: .*'prompt'"):
        jsonl_workload(path, tok, 2)


# -- vLLM's flag names -------------------------------------------------------------------------


def test_vllm_length_range_by_hand() -> None:
    assert vllm_length_range(10, 0.0) == (10, 10)
    # floor(100 * 0.75) = 75, ceil(100 * 1.25) = 125.
    assert vllm_length_range(100, 0.25) == (75, 125)
    # floor(10 * 0.75) = floor(7.5) = 7, ceil(12.5) = 13.
    assert vllm_length_range(10, 0.25) == (7, 13)
    # floor(0.5) = 0 is raised to the minimum, as vLLM keeps outputs at 1 token or more.
    assert vllm_length_range(1, 0.5, minimum=1) == (1, 2)
    for ratio in (-0.1, 1.0):
        with pytest.raises(ValueError, match="range-ratio"):
            vllm_length_range(10, ratio)


def _parse(command: str, *paths: str) -> Any:
    """Parse ``convoy bench <command> <paths>``; ``command`` is split on spaces, paths are not."""
    return build_parser().parse_args(["bench", *command.split(), *paths])


def _same_workload(vllm: str, convoy: str, tok: Any) -> None:
    """Both command lines give the same requests and the same recipe."""
    assert workload_from_args(_parse(vllm), tok, None) == workload_from_args(
        _parse(convoy), tok, None
    )


@pytest.mark.parametrize("kind", ["throughput", "serve --base-url http://127.0.0.1:1"])
def test_vllm_flags_give_convoys_workload(kind: str, tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    _same_workload(
        f"{kind} --input-len 32 --output-len 16 --num-prompts 8 --dataset-name random",
        f"{kind} --input-len-min 32 --input-len-max 32 --output-len-min 16 --output-len-max 16"
        " --num-prompts 8 --dataset random",
        tok,
    )
    # Range ratio 0.25: prompts in [75, 125], outputs in [7, 13] (worked out above).
    _same_workload(
        f"{kind} --random-input-len 100 --random-output-len 10 --random-range-ratio 0.25",
        f"{kind} --input-len-min 75 --input-len-max 125 --output-len-min 7 --output-len-max 13",
        tok,
    )
    requests, spec = workload_from_args(_parse(f"{kind} --input-len 32 --num-prompts 3"), tok, None)
    assert [r.input_len for r in requests] == [32, 32, 32]
    assert spec["output_len_range"] == [32, 128]  # convoy's default where no length is given
    assert _parse(f"{kind} --dataset-name custom").dataset == "jsonl"

    bad = [
        "--input-len 8 --input-len-min 4",  # both ways of giving one length
        "--input-len 8 --random-range-ratio 1.0",  # vLLM requires r < 1
        "--input-len-min 4 --random-range-ratio 0.5",  # the ratio needs --input-len
        "--dataset shared-prefix --output-len 4 --random-range-ratio 0.5",
        "--input-len 1 --random-range-ratio 0.5",  # floor(0.5) = 0-token prompts
    ]
    for flags in bad:
        with pytest.raises(ValueError):
            workload_from_args(_parse(f"{kind} {flags}"), tok, None)


def test_vllm_run_and_result_flags(tmp_path: Path) -> None:
    serve = _parse(
        "serve --base-url http://127.0.0.1:1 --num-prompts 8 --max-concurrency 2"
        " --request-rate 4 --save-result --result-filename r.json"
    )
    assert (serve.num_prompts, serve.max_concurrency, serve.request_rate) == (8, 2, 4.0)
    assert result_path(serve) == Path("r.json")
    latency = _parse(
        "latency --input-len 8 --output-len 4 --batch-size 2 --num-iters-warmup 3 --output-json",
        str(tmp_path / "lat.json"),
    )
    assert latency.num_warmup == 3 and result_path(latency) == tmp_path / "lat.json"
    assert result_path(_parse("throughput")) is None
    named = _parse("throughput --result-filename tp.json --result-dir", str(tmp_path))
    assert result_path(named) == tmp_path / "tp.json"  # a file name implies --save-result
    default = result_path(_parse("throughput --save-result"))
    assert default is not None and default.parent == Path(".")
    assert default.name.startswith("convoy-throughput-") and default.suffix == ".json"
    with pytest.raises(ValueError, match="not both"):
        result_path(_parse("throughput --json a.json --result-filename b.json"))


# -- end to end --------------------------------------------------------------------------------


def _run_cli(out: Path, command: str, *paths: str) -> dict[str, Any]:
    """Run ``convoy <command> <paths> --json out`` in process; return the report.

    ``command`` is split on spaces; file paths go in ``paths`` so they are never split.
    """
    assert main([*command.split(), *paths, "--json", str(out)]) == 0
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def test_cli_throughput_end_to_end(
    make_checkpoint: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = str(make_checkpoint("llama"))
    report = _run_cli(
        tmp_path / "tp.json",
        "bench throughput --num-kv-blocks 64 --max-num-batched-tokens 32 --num-prompts 4"
        " --input-len-min 8 --input-len-max 20 --output-len-min 2 --output-len-max 6"
        " --dataset-seed 5 --roofline --roofline-size-mb 16",
        "--model",
        model,
    )
    printed = capsys.readouterr().out
    assert "convoy throughput (random)" in printed and "Roofline" in printed

    assert (report["benchmark"], report["engine"]) == ("throughput", "convoy")
    assert report["engine_config"]["scheduler"]["max_num_batched_tokens"] == 32
    spec = report["workload"]
    assert spec["avoid_ids"] == [0, 1, 2, 3, 4]  # BOS, EOS, PAD and the two chat markers
    # The recipe in the report rebuilds the exact workload without the engine.
    rebuilt = random_workload(
        spec["num_prompts"],
        tuple(spec["input_len_range"]),
        tuple(spec["output_len_range"]),
        spec["vocab_size"],
        spec["seed"],
        spec["avoid_ids"],
    )
    result = report["result"]
    assert result["num_requests"] == 4
    assert result["num_input_tokens"] == sum(r.input_len for r in rebuilt)
    assert result["num_output_tokens"] == sum(r.output_len for r in rebuilt)
    assert result["num_expected_output_tokens"] == result["num_output_tokens"]
    assert result["output_lengths_exact"] is True and result["num_mismatched_outputs"] == 0
    assert result["output_tokens_per_s"] == pytest.approx(
        result["num_output_tokens"] / result["elapsed_s"]
    )
    for rec, r in zip(report["requests"], rebuilt, strict=True):
        assert (rec["input_len"], rec["output_len"]) == (r.input_len, r.output_len)
        assert rec["num_output_tokens"] == r.output_len
        assert 0 < rec["ttft_ms"] <= rec["e2e_latency_ms"]
    assert result["ttft_ms"]["count"] == 4
    # A 32-token budget cannot prefill 4 prompts of 8..20 tokens in one step.
    assert report["engine_steps"] > max(r.output_len for r in rebuilt)

    roof = report["roofline"]
    assert roof["bandwidth_gbs"] > 0 and roof["peak_gflops"] > 0
    assert roof["model_shape"]["num_layers"] == 2
    assert roof["bound"]["num_steps"] >= max(r.output_len for r in rebuilt)
    assert 0 < roof["achieved_fraction"] < 1  # nothing beats the roofline


def test_cli_throughput_with_vllm_flags(
    make_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    model = str(make_checkpoint("llama"))
    argv = "bench throughput --input-len 32 --output-len 16 --num-prompts 8 --num-kv-blocks 64"
    rc = main([*argv.split(), "--model", model, "--save-result", "--result-dir", str(tmp_path)])
    assert rc == 0
    (out,) = tmp_path.glob("convoy-throughput-*.json")
    report = json.loads(out.read_text())
    spec, result = report["workload"], report["result"]
    assert (spec["input_len_range"], spec["output_len_range"]) == ([32, 32], [16, 16])
    assert (result["num_requests"], result["num_input_tokens"]) == (8, 8 * 32)
    assert result["num_output_tokens"] == 8 * 16 and result["output_lengths_exact"] is True


def test_cli_shared_prefix_and_jsonl(make_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    model = str(make_checkpoint("llama"))
    saved = tmp_path / "workload.jsonl"
    base = "bench throughput --num-kv-blocks 64 --no-warmup"
    report = _run_cli(
        tmp_path / "sp.json",
        f"{base} --dataset shared-prefix --num-prompts 4 --num-groups 2 --prefix-len 6"
        " --suffix-len 3 --output-len 3",
        *("--model", model, "--save-workload", str(saved)),
    )
    assert report["workload"]["requests_per_group"] == 2
    assert report["result"]["num_input_tokens"] == 4 * 9
    assert report["result"]["num_output_tokens"] == 4 * 3
    w = jsonl_workload(saved, None, None)
    assert w[0].prompt_token_ids[:6] == w[1].prompt_token_ids[:6]

    again = _run_cli(
        tmp_path / "jsonl.json",
        f"{base} --dataset jsonl",
        *("--model", model, "--dataset-path", str(saved)),
    )
    assert again["result"]["num_input_tokens"] == 36
    assert again["result"]["output_lengths_exact"] is True

    assert main(["bench", "throughput", "--model", model, "--dataset", "jsonl"]) == 2


def test_cli_latency_end_to_end(
    make_checkpoint: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = str(make_checkpoint("llama"))
    report = _run_cli(
        tmp_path / "lat.json",
        "bench latency --num-kv-blocks 64 --input-len 12 --output-len 4 --batch-size 3"
        " --num-iters 2",
        "--model",
        model,
    )
    assert "convoy latency" in capsys.readouterr().out
    r = report["result"]
    assert (r["batch_size"], r["input_len"], r["output_len"], r["num_iters"]) == (3, 12, 4, 2)
    assert len(r["prefill_s"]) == len(r["decode_s"]) == 2
    assert r["output_lengths_exact"] is True
    # The reported medians follow from the per-iteration times.
    assert r["median_prefill_tokens_per_s"] == pytest.approx(
        float(np.median([3 * 12 / p for p in r["prefill_s"]]))
    )
    assert r["median_decode_tokens_per_s"] == pytest.approx(
        float(np.median([3 * 3 / d for d in r["decode_s"]]))
    )
    assert report["roofline"] is None


def test_repeated_throughput_runs_compute_every_prompt_token(
    make_checkpoint: Callable[..., Path],
) -> None:
    """A workload timed twice on one engine must not find its prompts in the prefix cache."""
    from convoy import LLM
    from convoy.bench.throughput import run_throughput

    llm = LLM(model=str(make_checkpoint("llama")), num_kv_blocks=128, block_size=16)
    requests = random_workload(4, (40, 60), (2, 2), 500, seed=3, avoid_ids=[0, 1, 2, 3, 4])
    engine = llm.engine
    for _ in range(2):
        before = engine.num_prompt_tokens_computed
        result, _ = run_throughput(llm, requests, use_tqdm=False, warmup=False)
        assert engine.num_prompt_tokens_computed - before == sum(r.input_len for r in requests)
        assert result.output_lengths_exact
