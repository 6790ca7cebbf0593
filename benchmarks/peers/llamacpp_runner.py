"""Run a token-id workload on llama.cpp (llama-cpp-python) and write the timing as JSON.

Runs in llama-cpp-python's own virtual environment (it needs nothing from convoy)::

    "$CONVOY_LLAMACPP_PYTHON" benchmarks/peers/llamacpp_runner.py IN.json OUT.json

``IN.json``: ``{"model": "x.gguf", "requests": [{"prompt_token_ids": [...], "output_len": N},
...], "n_threads": 2, "n_batch": 512, "n_ubatch": 512, "n_parallel": 64, "mode": "batched",
"warmup": true, "return_tokens": false}``. ``OUT.json``: ``{"elapsed_s",
"num_output_tokens", "output_lens", "engine_version", "n_ctx", "n_ctx_seq", "error"}`` (and
``"tokens"``, the generated ids per request, with ``return_tokens``).

``mode: "batched"`` (the default) drives llama.cpp's C API (``llama_cpp.llama_*``) as
llama.cpp's own server does: one context with ``n_seq_max = n_parallel`` sequences (a KV
slot of ``n_ctx_seq`` >= the longest prompt + output each, not unified), continuous batching
with a budget of ``n_batch`` tokens per ``llama_decode``: first one token of every decoding
sequence, then prompt chunks of the admitted requests (a prompt longer than what is left of
the budget continues in the next step). A finished sequence's KV is removed
(``llama_memory_seq_rm``) and the next waiting request takes its slot. The next token of a
sequence is the argmax of its last token's logits (greedy); EOS is never checked, so every
request gets exactly ``output_len`` tokens. The Python loop that builds the batches and picks
the tokens is inside the timed part (it is how this engine is driven from Python).

``mode: "sequential"``: the high-level ``Llama`` object, which holds one sequence, runs the
requests one after another (greedy, ``Llama.generate`` stopped after ``output_len`` tokens).
Kept as the reference the batched mode is checked against (same greedy tokens).
"""

from __future__ import annotations

import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from runner_io import run_main

CTX_PAD = 256  # llama.cpp pads n_ctx and n_ctx_seq to multiples of 256


def _pad(n: int, to: int = CTX_PAD) -> int:
    return -(-n // to) * to


# ---------------------------------------------------------------------------------------------
# Sequential: the high-level Llama API, one request at a time
# ---------------------------------------------------------------------------------------------


def _generate(llm: Any, prompt: list[int], output_len: int) -> list[int]:
    """Greedy-generate ``output_len`` tokens after ``prompt``."""
    llm.reset()  # no prefix reuse between requests: every engine prefills every prompt
    out: list[int] = []
    for tok in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, reset=True):
        out.append(int(tok))
        if len(out) >= output_len:
            break
    return out


def run_sequential(spec: dict[str, Any]) -> dict[str, Any]:
    """Load the model, warm up, then time every request in order."""
    import llama_cpp

    requests = spec["requests"]
    n_batch = int(spec.get("n_batch", 512))
    n_ctx = max(len(r["prompt_token_ids"]) + r["output_len"] for r in requests) + 8
    llm = llama_cpp.Llama(
        model_path=spec["model"],
        n_ctx=n_ctx,
        n_batch=n_batch,
        n_ubatch=int(spec.get("n_ubatch", n_batch)),
        n_threads=spec.get("n_threads"),
        n_threads_batch=spec.get("n_threads"),
        verbose=False,
    )
    if spec.get("warmup", True):
        _generate(llm, requests[0]["prompt_token_ids"][:16], 2)
    start = time.perf_counter()
    tokens = [_generate(llm, r["prompt_token_ids"], r["output_len"]) for r in requests]
    elapsed = time.perf_counter() - start
    return _result(elapsed, tokens, spec, llama_cpp.__version__, n_ctx, n_ctx)


# ---------------------------------------------------------------------------------------------
# Batched: the C API, continuous batching over n_parallel sequences
# ---------------------------------------------------------------------------------------------


@dataclass
class _Slot:
    """One in-flight request in KV sequence ``seq``."""

    index: int  # into the request list
    prompt: list[int]
    output_len: int
    fed: int = 0  # prompt tokens already decoded
    out: list[int] = field(default_factory=list)

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.prompt)


class BatchedLlama:
    """A llama.cpp context with ``n_parallel`` KV sequences, driven through the C API."""

    def __init__(
        self,
        model_path: str,
        n_parallel: int,
        n_ctx_seq: int,
        n_batch: int,
        n_ubatch: int,
        n_threads: int | None,
    ) -> None:
        import llama_cpp as lc

        self.lc = lc
        lc.llama_backend_init()
        mparams = lc.llama_model_default_params()
        self.model = lc.llama_model_load_from_file(model_path.encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama_model_load_from_file failed for {model_path}")
        self.n_parallel = n_parallel
        # Every decoding sequence feeds one token per step: the budget must hold them all.
        self.n_batch = max(n_batch, n_parallel)
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = n_parallel * _pad(n_ctx_seq)
        cparams.n_batch = self.n_batch
        cparams.n_ubatch = min(n_ubatch, self.n_batch)
        cparams.n_seq_max = n_parallel
        cparams.kv_unified = False
        cparams.no_perf = True
        if n_threads:
            cparams.n_threads = n_threads
            cparams.n_threads_batch = n_threads
        self.ctx = lc.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise RuntimeError("llama_init_from_model failed")
        self.n_ctx = int(lc.llama_n_ctx(self.ctx))
        self.n_ctx_seq = int(lc.llama_n_ctx_seq(self.ctx))
        if self.n_ctx_seq < n_ctx_seq:
            raise RuntimeError(f"n_ctx_seq {self.n_ctx_seq} < the {n_ctx_seq} tokens needed")
        self.mem = lc.llama_get_memory(self.ctx)
        self.n_vocab = int(lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model)))
        self.batch = lc.llama_batch_init(self.n_batch, 0, 1)

    def close(self) -> None:
        lc = self.lc
        lc.llama_batch_free(self.batch)
        lc.llama_free(self.ctx)
        lc.llama_model_free(self.model)

    def generate(self, requests: list[dict[str, Any]]) -> list[list[int]]:
        """Greedy-generate every request's ``output_len`` tokens; ids per request, in order."""
        import numpy as np

        lc, batch, n_batch, n_vocab = self.lc, self.batch, self.n_batch, self.n_vocab
        lc.llama_memory_clear(self.mem, True)
        waiting = deque(range(len(requests)))
        slots: list[_Slot | None] = [None] * self.n_parallel
        results: list[list[int]] = [[] for _ in requests]
        for i, r in enumerate(requests):
            if r["output_len"] <= 0:
                waiting.remove(i)
        while waiting or any(s is not None for s in slots):
            for seq in range(self.n_parallel):
                if slots[seq] is None and waiting:
                    i = waiting.popleft()
                    r = requests[i]
                    slots[seq] = _Slot(i, list(r["prompt_token_ids"]), int(r["output_len"]))
            n = 0
            outputs: list[int] = []  # sequence of each logits row, in batch order

            def add(tok: int, pos: int, seq: int, logits: bool) -> None:
                nonlocal n
                batch.token[n] = tok
                batch.pos[n] = pos
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq
                batch.logits[n] = logits
                n += 1

            for seq, s in enumerate(slots):  # one token of every decoding sequence
                if s is not None and not s.prefilling:
                    add(s.out[-1], len(s.prompt) + len(s.out) - 1, seq, True)
                    outputs.append(seq)
            for seq, s in enumerate(slots):  # then prompt chunks, as the budget allows
                if s is None or not s.prefilling or n >= n_batch:
                    continue
                take = min(n_batch - n, len(s.prompt) - s.fed)
                for p in range(s.fed, s.fed + take):
                    add(s.prompt[p], p, seq, p == len(s.prompt) - 1)
                s.fed += take
                if not s.prefilling:
                    outputs.append(seq)
            batch.n_tokens = n
            rc = lc.llama_decode(self.ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc} ({n} tokens)")
            if not outputs:
                continue
            logits = np.ctypeslib.as_array(lc.llama_get_logits(self.ctx), (len(outputs), n_vocab))
            for seq, tok in zip(outputs, logits.argmax(axis=1).tolist(), strict=True):
                s = slots[seq]
                assert s is not None
                s.out.append(int(tok))
                if len(s.out) >= s.output_len:
                    results[s.index] = s.out
                    lc.llama_memory_seq_rm(self.mem, seq, -1, -1)
                    slots[seq] = None
        return results


def run_batched(spec: dict[str, Any]) -> dict[str, Any]:
    """Load the model, warm up, then time one continuous-batching pass over every request."""
    import llama_cpp

    requests = spec["requests"]
    n_parallel = max(1, min(int(spec.get("n_parallel", len(requests))), len(requests)))
    n_batch = int(spec.get("n_batch", 512))
    need = max(len(r["prompt_token_ids"]) + r["output_len"] for r in requests)
    llm = BatchedLlama(
        spec["model"],
        n_parallel,
        need,
        n_batch,
        int(spec.get("n_ubatch", n_batch)),
        spec.get("n_threads"),
    )
    try:
        if spec.get("warmup", True):
            llm.generate(
                [{"prompt_token_ids": requests[0]["prompt_token_ids"][:16], "output_len": 2}]
            )
        start = time.perf_counter()
        tokens = llm.generate(requests)
        elapsed = time.perf_counter() - start
    finally:
        llm.close()
    return _result(elapsed, tokens, spec, llama_cpp.__version__, llm.n_ctx, llm.n_ctx_seq)


def _result(
    elapsed: float,
    tokens: list[list[int]],
    spec: dict[str, Any],
    version: str,
    n_ctx: int,
    n_ctx_seq: int,
) -> dict[str, Any]:
    lens = [len(t) for t in tokens]
    out: dict[str, Any] = {
        "elapsed_s": elapsed,
        "num_output_tokens": sum(lens),
        "output_lens": lens,
        "engine_version": version,
        "n_ctx": n_ctx,
        "n_ctx_seq": n_ctx_seq,
        "error": None,
    }
    if spec.get("return_tokens"):
        out["tokens"] = tokens
    return out


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Dispatch on ``spec["mode"]``."""
    mode = spec.get("mode", "batched")
    if mode == "batched":
        return run_batched(spec)
    if mode == "sequential":
        return run_sequential(spec)
    raise ValueError(f"unknown mode {mode!r} (batched, sequential)")


if __name__ == "__main__":
    sys.exit(run_main("llamacpp_runner.py", run, sys.argv[1:]))
