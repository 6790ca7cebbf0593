"""The built wheel ships everything an installed convoy reads from its own package: the C++
kernels' sources and every local header they include (they are compiled on first use, from
site-packages), and the built-in models' assets.

The wheel is built offline (``pip wheel --no-build-isolation`` with this environment's
setuptools) from a copy of the checkout, so the checkout gets no ``build/`` directory, whose
stale ``build/lib`` would otherwise leak deleted files into later wheels.
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import convoy

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = Path(convoy.__file__).resolve().parent
# The module that compiles the kernels, and the names its source list may go by.
KERNELS_MODULE = "convoy.model.cpu_kernels"
SOURCE_LIST_NAMES = ("SOURCES", "_SOURCES")
# Everything ignored here is local state, never package data.
COPY_IGNORE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    "*.pyc",
    "*.so",
    ".*_cache",
    "bench-results",
)
LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.MULTILINE)


def kernel_sources() -> list[Path]:
    module = importlib.import_module(KERNELS_MODULE)
    for name in SOURCE_LIST_NAMES:
        sources = getattr(module, name, None)
        if sources is not None:
            return [Path(s).resolve() for s in sources]
    raise AssertionError(f"{KERNELS_MODULE} has none of {SOURCE_LIST_NAMES}")


def local_includes(sources: list[Path]) -> set[Path]:
    """Every ``#include "..."`` header the sources read, followed through headers."""
    found: set[Path] = set()
    todo = list(sources)
    while todo:
        path = todo.pop()
        for name in LOCAL_INCLUDE.findall(path.read_text()):
            header = (path.parent / name).resolve()
            assert header.is_file(), f'{path.name} includes "{name}", which is not at {header}'
            if header not in found:
                found.add(header)
                todo.append(header)
    return found


def in_wheel(path: Path) -> str:
    """``path``'s name inside the wheel (``convoy/...``)."""
    return path.resolve().relative_to(PACKAGE_DIR.parent).as_posix()


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    tmp = tmp_path_factory.mktemp("wheel")
    src, dist = tmp / "src", tmp / "dist"
    shutil.copytree(REPO_ROOT, src, ignore=COPY_IGNORE)
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip_wheel, "--no-index", "-q", "-w", str(dist), str(src)], check=True)
    (wheel,) = dist.glob("convoy-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        return set(zf.namelist())


def test_the_wheel_ships_every_kernel_source_and_header(wheel_files: set[str]) -> None:
    sources = kernel_sources()
    headers = local_includes(sources)
    assert sources and headers  # the parse found something: vec.h at least
    # A list of headers the kernels module keeps, if it keeps one, must ship too.
    listed = getattr(importlib.import_module(KERNELS_MODULE), "HEADERS", [])
    needed = {in_wheel(p) for p in [*sources, *headers, *map(Path, listed)]}
    assert needed - wheel_files == set()
    # Everything else in csrc/ too (a file the build starts to read later is already there).
    csrc = {in_wheel(p) for p in (PACKAGE_DIR / "model" / "csrc").iterdir() if p.is_file()}
    assert csrc - wheel_files == set()


def test_the_wheel_ships_the_built_in_models(wheel_files: set[str]) -> None:
    assets = {
        in_wheel(p)
        for p in (PACKAGE_DIR / "assets").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert "convoy/assets/convoy-tiny/model.safetensors" in assets
    assert assets - wheel_files == set()
