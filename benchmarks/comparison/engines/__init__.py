"""One adapter per engine, each behind :class:`.base.PeerAdapter`.

In this process: :mod:`.convoy_inproc` (convoy), :mod:`.hf_static` and :mod:`.hf_cb`
(transformers). In their own interpreters, through the runner scripts in
``benchmarks/peers/``: :mod:`.convoy_baseline` (convoy from another checkout),
:mod:`.llamacpp` (llama-cpp-python and llama-batched-bench) and :mod:`.vllm_cpu`.
"""
