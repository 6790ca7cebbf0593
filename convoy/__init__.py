"""convoy: a small, exact, fast engine for serving open-weight LLMs."""

from convoy.entrypoints.llm import LLM
from convoy.outputs import CompletionOutput, Logprob, RequestOutput
from convoy.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "Logprob", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
