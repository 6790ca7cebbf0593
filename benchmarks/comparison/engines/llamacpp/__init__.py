"""llama.cpp, two ways, both reported as the engine ``llama.cpp`` (for each GGUF weight type):
llama-cpp-python driving the C API with continuous batching (:mod:`.python_batched`), and
llama.cpp's own ``llama-batched-bench`` binary (:mod:`.batched_bench`). :mod:`.gguf` converts
the checkpoint with llama.cpp's own converter."""

NAME = "llama.cpp"
LLAMACPP_N_BATCH = 512  # llama-cpp-python runner: tokens per llama_decode (and n_ubatch)
