#!/usr/bin/env bash
# Install convoy NON-editably into a scratch venv and check it from outside the checkout: the
# package imports from the venv's site-packages, compiles its CPU kernels from the sources and
# headers installed there, and generates with its built-in model. An editable install (the
# project's .venv) reads everything from the checkout, so it cannot catch a file missing from
# the wheel; this can.
#
# Usage: scripts/check_install.sh  (from `make test-install`; VENV_PYTHON picks the Python,
# default .venv/bin/python; CONVOY_KEEP_SCRATCH=1 keeps the scratch directory.)
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
py="${VENV_PYTHON:-$repo/.venv/bin/python}"
scratch="$(mktemp -d "${TMPDIR:-/tmp}/convoy-install.XXXXXX")"
if [[ "${CONVOY_KEEP_SCRATCH:-0}" == 1 ]]; then
    echo "check_install: scratch directory kept at $scratch"
else
    trap 'rm -rf "$scratch"' EXIT
fi
start=$SECONDS
step() { echo "check_install: [$((SECONDS - start))s] $*"; }

# The wheel is built from a copy of the working tree: building in the checkout would leave a
# build/ directory whose stale build/lib leaks deleted files into later wheels. Offline, with
# the project venv's setuptools (the dev extra pins one that builds wheels by itself).
step "building the wheel"
mkdir "$scratch/src"
tar -C "$repo" -cf - \
    --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist \
    --exclude='*.egg-info' --exclude=__pycache__ --exclude='*.pyc' --exclude='*.so' \
    --exclude='./.*_cache' --exclude=./bench-results . |
    tar -C "$scratch/src" -xf -
"$py" -m pip wheel -q --no-deps --no-build-isolation --no-index -w "$scratch/dist" "$scratch/src"
wheel=("$scratch"/dist/convoy-*.whl)

# A clean venv: `venv` builds it on the base interpreter, so nothing of the project's .venv
# (least of all its editable convoy) is visible in it. The project venv's pip installs into it
# (--python): quicker than bootstrapping a pip there, and recent enough for the machines' local
# package indexes. The wheel's dependencies pin torch==2.13.0, whose CPU wheel the machines
# carry locally (an unpinned torch would pull GBs of CUDA packages); the rest resolve from the
# package indexes or pip's cache.
step "installing the wheel and its dependencies into a clean venv"
"$py" -m venv --without-pip "$scratch/venv"
"$py" -m pip --python "$scratch/venv/bin/python" install -q "${wheel[0]}"

# TORCH_EXTENSIONS_DIR points at an empty scratch directory, so the kernels compile from
# nothing but the installed files: the check then cannot depend on what a cache holds. The
# shared default (~/.cache/torch_extensions) would also be rewritten for these soon-deleted
# source paths, making the checkout's next run recompile everything, and a test run at the
# same time would wait on the same build lock. -I and an empty working directory keep the
# checkout and PYTHONPATH off sys.path.
step "compiling the CPU kernels from the installed package (takes minutes the first time)"
mkdir "$scratch/run"
cd "$scratch/run"
export TORCH_EXTENSIONS_DIR="$scratch/torch_extensions"
export CUDA_VISIBLE_DEVICES=
"$scratch/venv/bin/python" -I - "$scratch/venv" "$TORCH_EXTENSIONS_DIR" <<'EOF'
import sys
from pathlib import Path

venv, extensions = (Path(a).resolve() for a in sys.argv[1:3])

import convoy
from convoy.model import cpu_kernels

where = Path(convoy.__file__).resolve()
assert venv in where.parents, f"convoy was imported from {where}, not from {venv}"
sources = getattr(cpu_kernels, "SOURCES", None) or cpu_kernels._SOURCES
outside = [str(s) for s in sources if venv not in Path(s).resolve().parents]
assert not outside, f"kernel sources outside the scratch venv: {outside}"

module = cpu_kernels.load()
assert module is not None, f"the CPU kernels did not build: {cpu_kernels.unavailable_reason()}"
built = Path(module.__file__).resolve()
assert extensions in built.parents, f"the kernels were loaded from {built}, not built anew"
print(f"check_install: convoy from {where.parent}; kernels built at {built}")
EOF

step "generating with the installed package's built-in model"
"$scratch/venv/bin/convoy" generate --max-tokens 8 "def fibonacci(n):"
step "ok"
