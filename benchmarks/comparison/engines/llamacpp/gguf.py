"""llama.cpp's sources (for its converter) and the checkpoint's GGUF files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.comparison.paths import PEERS_DIR
from benchmarks.comparison.results import EngineError

# Bytes per weight for the roofline (q8_0: 1, a lower bound on its 34 bytes per 32 weights).
GGUF_DTYPE_BYTES = {"f32": 4, "f16": 2, "q8_0": 1}


def find_llama_cpp_dir(explicit: Path | None, cache_dir: Path) -> Path:
    """llama.cpp's sources (converter, gguf-py), fetching llama-cpp-python's sdist if needed."""
    if explicit is not None:
        return explicit
    src = cache_dir / "llama-cpp-sdist"
    found = sorted(src.glob("llama_cpp_python-*/vendor/llama.cpp"))
    if found:
        return found[-1]
    src.mkdir(parents=True, exist_ok=True)
    print("downloading llama-cpp-python's sdist for convert_hf_to_gguf.py ...", flush=True)
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps"),
            *("llama-cpp-python", "-d", str(src)),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    for archive in src.glob("llama_cpp_python-*.tar.gz"):
        shutil.unpack_archive(str(archive), str(src))
    found = sorted(src.glob("llama_cpp_python-*/vendor/llama.cpp"))
    if not found:
        raise EngineError("the llama-cpp-python sdist has no vendor/llama.cpp")
    return found[-1]


def ensure_gguf(model_dir: Path, outtype: str, llama_cpp_dir: Path) -> Path:
    """``model_dir``'s GGUF at ``outtype``, converted once and cached beside the checkpoint."""
    out = model_dir.parent / f"{model_dir.name}.{outtype}.gguf"
    if out.is_file():
        return out
    tmp = out.with_suffix(".tmp.gguf")
    proc = subprocess.run(
        [
            *(sys.executable, str(PEERS_DIR / "convert_gguf.py"), str(llama_cpp_dir)),
            *(str(model_dir), str(tmp), outtype),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0 or not tmp.is_file():
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise EngineError(f"convert_hf_to_gguf.py --outtype {outtype} failed: {last}")
    os.replace(tmp, out)
    return out
