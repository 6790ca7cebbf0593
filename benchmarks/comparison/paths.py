"""Where the peers' installs live: an environment variable when it is set, else a path under
the repository, so that no machine's layout is written into the code.

Each default is read when the command line is parsed, so a variable set for one run counts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The runner scripts the harness starts in the peers' own interpreters.
PEERS_DIR = REPO / "benchmarks" / "peers"
# Peer installs that no variable points elsewhere: bench-results/ is git-ignored scratch space.
PEERS_HOME = REPO / "bench-results" / "peers"


@dataclass(frozen=True)
class PathDefault:
    """A path read from ``env`` when it is set and not empty, else ``fallback``."""

    env: str
    fallback: Path | None

    def get(self) -> Path | None:
        value = os.environ.get(self.env)
        return Path(value) if value else self.fallback


LLAMACPP_PYTHON = PathDefault("CONVOY_LLAMACPP_PYTHON", PEERS_HOME / "llamacpp" / "bin" / "python")
# llama.cpp's sources (converter, gguf-py); unset: llama-cpp-python's sdist under --cache-dir.
LLAMACPP_DIR = PathDefault("CONVOY_LLAMACPP_DIR", None)
LLAMACPP_TOOLS_DIR = PathDefault("CONVOY_LLAMACPP_TOOLS_DIR", PEERS_HOME / "llamacpp-build" / "bin")
# Logs an install script may leave while it builds; a missing log means no build is running.
LLAMACPP_BUILD_LOG = PathDefault("CONVOY_LLAMACPP_BUILD_LOG", PEERS_HOME / "llamacpp-build.log")
LLAMACPP_TOOLS_BUILD_LOG = PathDefault(
    "CONVOY_LLAMACPP_TOOLS_BUILD_LOG", PEERS_HOME / "llamacpp-tools-build.log"
)
VLLM_PYTHON = PathDefault("CONVOY_VLLM_PYTHON", PEERS_HOME / "vllm" / "bin" / "python")

ALL = (
    LLAMACPP_PYTHON,
    LLAMACPP_DIR,
    LLAMACPP_TOOLS_DIR,
    LLAMACPP_BUILD_LOG,
    LLAMACPP_TOOLS_BUILD_LOG,
    VLLM_PYTHON,
)
