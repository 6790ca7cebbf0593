"""convoy: a small, exact, fast engine for serving open-weight LLMs."""

import os

# Back torch's large CPU allocations (weights, the KV cache) with transparent huge pages:
# fewer TLB misses when decode streams every weight from memory each step. Read by torch at
# its first large allocation, so it must be set before that; a user's own setting wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from convoy.entrypoints.llm import LLM
from convoy.outputs import CompletionOutput, Logprob, RequestOutput
from convoy.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "Logprob", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
