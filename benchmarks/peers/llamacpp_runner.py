"""Run a token-id workload on llama.cpp (llama-cpp-python) and write the timing as JSON.

Runs in llama-cpp-python's own virtual environment (it needs nothing from convoy)::

    /work/peer-llamacpp/bin/python benchmarks/peers/llamacpp_runner.py IN.json OUT.json

``IN.json``: ``{"model": "x.gguf", "requests": [{"prompt_token_ids": [...], "output_len": N},
...], "n_threads": 2, "n_batch": 512, "warmup": true}``. ``OUT.json``: ``{"elapsed_s",
"num_output_tokens", "output_lens", "engine_version", "error"}``.

The high-level ``Llama`` object holds one sequence, so requests run one after another
(concurrency 1). Decoding is greedy and ignores EOS: ``Llama.generate`` yields tokens until
the caller stops it, and this runner stops after exactly ``output_len`` tokens.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from runner_io import run_main


def _generate(llm: Any, prompt: list[int], output_len: int) -> int:
    """Greedy-generate ``output_len`` tokens after ``prompt``; returns how many came."""
    llm.reset()  # no prefix reuse between requests: every engine prefills every prompt
    n = 0
    for _ in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, reset=True):
        n += 1
        if n >= output_len:
            break
    return n


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Load the model, warm up, then time every request in order."""
    import llama_cpp

    requests = spec["requests"]
    n_ctx = max(len(r["prompt_token_ids"]) + r["output_len"] for r in requests) + 8
    llm = llama_cpp.Llama(
        model_path=spec["model"],
        n_ctx=n_ctx,
        n_batch=spec.get("n_batch", 512),
        n_ubatch=spec.get("n_batch", 512),
        n_threads=spec.get("n_threads"),
        n_threads_batch=spec.get("n_threads"),
        verbose=False,
    )
    if spec.get("warmup", True):
        _generate(llm, requests[0]["prompt_token_ids"][:16], 2)
    start = time.perf_counter()
    lens = [_generate(llm, r["prompt_token_ids"], r["output_len"]) for r in requests]
    elapsed = time.perf_counter() - start
    return {
        "elapsed_s": elapsed,
        "num_output_tokens": sum(lens),
        "output_lens": lens,
        "engine_version": llama_cpp.__version__,
        "error": None,
    }


if __name__ == "__main__":
    sys.exit(run_main("llamacpp_runner.py", run, sys.argv[1:]))
