"""Convert a Hugging Face checkpoint to GGUF with llama.cpp's own ``convert_hf_to_gguf.py``.

::

    python benchmarks/peers/convert_gguf.py LLAMA_CPP_DIR MODEL_DIR OUT.gguf {f32,f16,q8_0}

``LLAMA_CPP_DIR`` is ``vendor/llama.cpp`` of llama-cpp-python's sdist (``pip download
--no-binary :all: --no-deps llama-cpp-python``); it provides the converter and ``gguf-py``.
Run it with a Python that has torch, numpy and PyYAML (convoy's venv does).

One patch: the converter identifies a BPE tokenizer's pre-tokenizer by hashing how it
encodes a test string and refuses unknown hashes. convoy's benchmark tokenizer (trained
locally by ``convoy.checkpoints.train_tokenizer``) is a byte-level BPE with GPT-2's split
rule, so an unknown hash is mapped to ``"gpt-2"``. The benchmark feeds token ids, so the
GGUF's tokenizer only has to load, never to encode.

If ``sentencepiece`` is not installed, an empty stand-in module is registered: the Llama
converter imports it before looking for ``tokenizer.model``, finds none (these checkpoints
ship a BPE ``tokenizer.json``) and falls back to the BPE path, never calling it.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from typing import Any


def main(argv: list[str]) -> int:
    """Patch the pre-tokenizer check and run the converter's ``main``."""
    if len(argv) != 4:
        print("usage: convert_gguf.py LLAMA_CPP_DIR MODEL_DIR OUT.gguf OUTTYPE", file=sys.stderr)
        return 2
    llama_dir, model_dir, out, outtype = argv
    sys.path[:0] = [str(Path(llama_dir)), str(Path(llama_dir, "gguf-py"))]
    import convert_hf_to_gguf
    from conversion.base import TextModel

    # After the imports: transformers probes for sentencepiece with find_spec at import.
    if importlib.util.find_spec("sentencepiece") is None:
        stub = types.ModuleType("sentencepiece")

        class SentencePieceProcessor:  # never instantiated: no tokenizer.model exists
            def __init__(self) -> None:
                raise ImportError("sentencepiece is not installed")

        stub.SentencePieceProcessor = SentencePieceProcessor  # type: ignore[attr-defined]
        sys.modules["sentencepiece"] = stub

    original = TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self: Any, tokenizer: Any) -> str:
        try:
            return str(original(self, tokenizer))
        except NotImplementedError:
            return "gpt-2"

    TextModel.get_vocab_base_pre = get_vocab_base_pre  # type: ignore[method-assign]
    sys.argv = ["convert_hf_to_gguf.py", model_dir, "--outfile", out, "--outtype", outtype]
    convert_hf_to_gguf.main()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
