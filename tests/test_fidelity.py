"""Greedy output must equal Hugging Face transformers', token for token, in float32.

For every supported architecture the same 16 prompts (1 to 300 tokens) are generated
(a) one request at a time, (b) all at once, (c) with a 16-token step budget that forces
chunked prefill, (d) with a KV pool so small that requests get preempted, (e) with each
choice of CPU linear and attention path, (f) without logprobs, so that greedy rows go through
the bfloat16 screen of the head where the CPU has one, (g) without prompt logprobs, so that
the last layer computes only the rows that sample. Token ids must be
identical to ``transformers.generate``; token and prompt logprobs within 1e-4.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from convoy import LLM, RequestOutput, SamplingParams
from convoy.model import cpu_kernels
from convoy.model.attention import CpuKernelAttention
from tests.conftest import ARCH_CASES, TOKENIZER_VOCAB

NEW_TOKENS = 32
PROMPT_LENS = [1, 2, 3, 5, 8, 13, 16, 17, 31, 33, 64, 100, 127, 200, 256, 300]
TOL = 1e-4


def fidelity_prompts() -> list[list[int]]:
    rng = random.Random(1234)
    # Ids from 5 up: 0..4 are the tokenizer's special tokens.
    return [[rng.randrange(5, TOKENIZER_VOCAB) for _ in range(n)] for n in PROMPT_LENS]


def hf_reference(path: Path, prompts: list[list[int]]) -> list[dict[str, Any]]:
    """transformers' greedy generate, one prompt at a time (no padding), plus logprobs."""
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    # Generate exactly NEW_TOKENS: convoy runs with ignore_eos, so transformers must not stop.
    model.generation_config.eos_token_id = None
    refs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            gen = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=0,
            )
            tokens = gen.sequences[0, len(prompt) :].tolist()
            step_lp = [torch.log_softmax(lg[0].float(), -1) for lg in gen.logits]
            token_lps = [float(lp[t]) for lp, t in zip(step_lp, tokens, strict=True)]
            prompt_lp = torch.log_softmax(model(ids).logits[0].float(), -1)
            prompt_lps = [float(prompt_lp[i, prompt[i + 1]]) for i in range(len(prompt) - 1)]
            refs.append({"tokens": tokens, "logprobs": token_lps, "prompt_logprobs": prompt_lps})
    return refs


def check_against(
    outputs: list[RequestOutput],
    refs: list[dict[str, Any]],
    mode: str,
    prompt_logprobs: bool = True,
) -> None:
    for i, (out, ref) in enumerate(zip(outputs, refs, strict=True)):
        comp = out.outputs[0]
        assert comp.token_ids == ref["tokens"], f"{mode}: prompt {i} tokens differ"
        assert comp.finish_reason == "length"
        assert comp.logprobs is not None
        got = [comp.logprobs[j][t].logprob for j, t in enumerate(comp.token_ids)]
        assert max(abs(a - b) for a, b in zip(got, ref["logprobs"], strict=True)) < TOL, mode
        if not prompt_logprobs:
            continue
        assert out.prompt_logprobs is not None
        assert out.prompt_logprobs[0] is None
        got_p = [
            pl[t].logprob
            for pl, t in zip(out.prompt_logprobs[1:], out.prompt_token_ids[1:], strict=True)
        ]
        assert len(got_p) == len(ref["prompt_logprobs"]), mode
        if got_p:
            diff = max(abs(a - b) for a, b in zip(got_p, ref["prompt_logprobs"], strict=True))
            assert diff < TOL, f"{mode}: prompt {i} prompt logprobs off by {diff}"


def poison_kv_cache(llm: LLM) -> None:
    """Fill never-written KV memory with NaN, as fresh memory may hold: no read may touch it."""
    runner = llm.engine.runner
    runner.kv_cache[:, :, : runner.pad_slot].fill_(float("nan"))


PARAMS = SamplingParams(
    temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0, prompt_logprobs=0
)
TOKENS_ONLY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
# No prompt logprobs: the last layer computes the sampled rows only (output_rows).
SAMPLED_ONLY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)

# mode -> engine arguments
MODES: dict[str, dict[str, Any]] = {
    "batched": {},
    "chunked": {"max_num_batched_tokens": 16},
    # 24 blocks of 16 = 384 tokens: the longest request (332) fits alone, all 16 do not.
    "preempting": {"num_kv_blocks": 24, "block_size": 16},
    # The CPU fast paths must not change outputs either: the default packs linear weights for
    # oneDNN and uses convoy's attention and elementwise kernels; these are the alternatives
    # ("torch ops only" also detaches the elementwise kernels: see torch_ops_only).
    "plain linears": {"linear_backend": "plain"},
    "torch ops only": {"linear_backend": "torch", "attention_backend": "torch"},
}


def count_output_row_steps(llm: LLM) -> dict[str, int]:
    """Count the steps whose last layer computes fewer rows than the batch has (from now on)."""
    model = llm.engine.runner.model
    forward = model.forward
    seen = {"steps": 0}

    def counting(input_ids: torch.Tensor, *args: Any) -> torch.Tensor:
        hidden = forward(input_ids, *args)
        seen["steps"] += hidden.shape[0] < input_ids.shape[0]
        return hidden

    model.forward = counting  # type: ignore[method-assign]
    return seen


def torch_ops_only(path: Path, **kwargs: Any) -> LLM:
    """A CPU model built without convoy's fused norm/rotary/activation kernels and argmax, so
    it runs the torch ops a CUDA or bfloat16 model runs (no engine option selects them: the
    kernels are chosen once, when the model is built)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_kernels, "load", lambda: None)
        llm = LLM(model=str(path), **kwargs)
    assert set(llm.engine.runner.backends().values()) <= {"torch", "none"}
    return llm


@pytest.mark.parametrize("case", sorted(ARCH_CASES))
def test_greedy_matches_transformers(case: str, make_checkpoint: Callable[..., Path]) -> None:
    path = make_checkpoint(case)
    prompts = fidelity_prompts()
    refs = hf_reference(path, prompts)

    llm = LLM(model=str(path), max_model_len=512)
    one_by_one = [llm.generate([p], PARAMS, use_tqdm=False)[0] for p in prompts]
    check_against(one_by_one, refs, "one at a time")

    for mode, kwargs in MODES.items():
        if mode == "torch ops only":
            llm = torch_ops_only(path, max_model_len=512, **kwargs)
        else:
            llm = LLM(model=str(path), max_model_len=512, **kwargs)
            # convoy's paged attention kernels (decode and prompt chunks) are what ran.
            assert isinstance(llm.engine.runner.ops.attention, CpuKernelAttention)
        poison_kv_cache(llm)
        outputs = llm.generate(prompts, PARAMS, use_tqdm=False)
        check_against(outputs, refs, mode)
        if mode == "preempting":
            assert llm.engine.scheduler.num_preemptions > 0
        assert llm.engine.kv_cache.pool.num_free_blocks == llm.engine.kv_cache.num_blocks
        if mode in ("batched", "chunked", "preempting", "torch ops only"):
            # Prompt logprobs need every row's hidden state; without them the last layer
            # computes only the rows that sample, chunks stopping short of a prompt's end
            # none: the same tokens and logprobs.
            pruned = count_output_row_steps(llm)
            outputs = llm.generate(prompts, SAMPLED_ONLY, use_tqdm=False)
            check_against(outputs, refs, f"{mode}, sampled rows only", prompt_logprobs=False)
            assert pruned["steps"] > 0

    # Greedy rows asking for no logprobs take their token from the bfloat16 screen of the head
    # where the CPU multiplies bfloat16 natively (convoy.model.greedy_head): the same tokens.
    llm = LLM(model=str(path), max_model_len=512)
    outputs = llm.generate(prompts, TOKENS_ONLY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [r["tokens"] for r in refs], "screened"
