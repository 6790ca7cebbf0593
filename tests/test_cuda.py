"""The CUDA path: float32 exactly as on the CPU, and a bfloat16 engine as accurate as
transformers' own bfloat16.

The GPU tests skip where torch sees no CUDA device, as in CI (``make test`` runs this file
after the CPU suite). On CUDA convoy runs torch ops only (its C++ kernels are for the CPU):
attention gathers each step's KV into padded batches, and decode steps replay CUDA graphs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from convoy import LLM, SamplingParams
from convoy.model.attention.cuda import BATCH_SIZES, batch_buckets
from tests.conftest import ARCH_CASES
from tests.test_fidelity import (
    NEW_TOKENS,
    PARAMS,
    SAMPLED_ONLY,
    check_against,
    fidelity_prompts,
    hf_reference,
    poison_kv_cache,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_graph_batch_sizes_cover_every_batch_up_to_the_largest() -> None:
    assert batch_buckets(1) == [1]
    assert batch_buckets(3) == [1, 2, 4]
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert batch_buckets(65) == [1, 2, 4, 8, 16, 32, 48, 64, 80]
    # Past the largest size, graphs stop there and bigger batches run eagerly.
    assert batch_buckets(4096)[-1] == BATCH_SIZES[-1] == 512


# mode -> engine arguments, as in test_fidelity
CUDA_MODES = {
    "batched": {},
    "eager": {"enforce_eager": True},
    "chunked": {"max_num_batched_tokens": 16},
    "preempting": {"num_kv_blocks": 24, "block_size": 16},
}


def check_no_tf32() -> None:
    # float32 means float32: TF32 matmuls (10-bit mantissas) would be a different model.
    assert not torch.backends.cuda.matmul.allow_tf32


@needs_cuda
@pytest.mark.parametrize("case", sorted(ARCH_CASES))
def test_cuda_float32_matches_transformers(case: str, make_checkpoint: Callable[..., Path]) -> None:
    check_no_tf32()
    path = make_checkpoint(case)
    prompts = fidelity_prompts()
    refs = hf_reference(path, prompts)  # on the CPU: the reference every device must meet
    for mode, kwargs in CUDA_MODES.items():
        llm = LLM(model=str(path), max_model_len=512, device="cuda", dtype="float32", **kwargs)
        assert llm.engine.runner.device.type == "cuda"
        poison_kv_cache(llm)
        check_against(llm.generate(prompts, PARAMS, use_tqdm=False), refs, f"cuda {mode}")
        outputs = llm.generate(prompts, SAMPLED_ONLY, use_tqdm=False)
        check_against(outputs, refs, f"cuda {mode}, sampled rows", prompt_logprobs=False)
        if mode == "preempting":
            assert llm.engine.scheduler.num_preemptions > 0
        graphs = llm.engine.runner.decode_graphs
        assert (graphs is None) == (mode == "eager")
        assert graphs is None or graphs.replays > 0
        assert llm.engine.kv_cache.pool.num_free_blocks == llm.engine.kv_cache.num_blocks


@needs_cuda
def test_cuda_graphs_follow_a_shrinking_batch(make_checkpoint: Callable[..., Path]) -> None:
    """Requests ending at different steps: each step replays the graph of its padded batch
    size, and padding rows left over from bigger steps must write no request's KV."""
    check_no_tf32()
    path = make_checkpoint("llama")
    prompts = fidelity_prompts()
    refs = hf_reference(path, prompts)
    llm = LLM(model=str(path), max_model_len=512, device="cuda", dtype="float32")
    poison_kv_cache(llm)
    lengths = [min(4 + 2 * i, NEW_TOKENS) for i in range(len(prompts))]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for i, (out, ref, n) in enumerate(zip(outputs, refs, lengths, strict=True)):
        assert out.outputs[0].token_ids == ref["tokens"][:n], f"prompt {i}"
    graphs = llm.engine.runner.decode_graphs
    assert graphs is not None and graphs.replays > 0
    assert len({b for b, _ in graphs.graphs}) > 2  # several batch sizes were replayed
    assert llm.engine.kv_cache.pool.num_free_blocks == llm.engine.kv_cache.num_blocks


def _prompt_logprobs_error(lps: list[list[float]], ref: list[list[float]]) -> float:
    """Mean |difference| of two sets of prompt logprobs."""
    diffs = [abs(a - b) for x, y in zip(lps, ref, strict=True) for a, b in zip(x, y, strict=True)]
    return sum(diffs) / len(diffs)


@needs_cuda
def test_cuda_bfloat16_is_as_accurate_as_transformers(
    make_checkpoint: Callable[..., Path],
) -> None:
    """bfloat16 rounds differently in every engine, so tokens cannot be compared exactly: the
    check is that convoy's prompt logprobs stray from the float32 reference no further than
    transformers' own bfloat16 ones do."""
    path = make_checkpoint("llama")
    prompts = [p for p in fidelity_prompts() if len(p) > 1]
    refs = hf_reference(path, prompts)
    ref_lps = [r["prompt_logprobs"] for r in refs]

    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).cuda().eval()
    hf_lps = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p], device="cuda")
            lp = torch.log_softmax(hf(ids).logits[0].float(), -1)
            hf_lps.append([float(lp[i, p[i + 1]]) for i in range(len(p) - 1)])

    llm = LLM(model=str(path), max_model_len=512)  # auto: CUDA and bfloat16
    assert llm.engine.runner.dtype == torch.bfloat16
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, prompt_logprobs=0)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    convoy_lps = []
    for out in outputs:
        assert out.outputs[0].finish_reason == "length"
        assert len(out.outputs[0].token_ids) == 8
        assert out.prompt_logprobs is not None
        pairs = zip(out.prompt_logprobs[1:], out.prompt_token_ids[1:], strict=True)
        convoy_lps.append([pl[t].logprob for pl, t in pairs])
    assert llm.engine.kv_cache.pool.num_free_blocks == llm.engine.kv_cache.num_blocks

    hf_err = _prompt_logprobs_error(hf_lps, ref_lps)
    convoy_err = _prompt_logprobs_error(convoy_lps, ref_lps)
    print(f"mean |prompt logprob - float32|: convoy {convoy_err:.4f}, transformers {hf_err:.4f}")
    assert 0 < convoy_err <= 1.5 * hf_err


@needs_cuda
def test_cuda_seeded_sampling_is_reproducible(make_checkpoint: Callable[..., Path]) -> None:
    """A seeded request samples the same tokens alone or in a batch (per-request generators
    on the GPU)."""
    path = make_checkpoint("llama")
    prompts = fidelity_prompts()[:6]
    llm = LLM(model=str(path), max_model_len=512, device="cuda", dtype="float32")
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, ignore_eos=True, seed=7)
    batched = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    alone = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    assert batched == alone
