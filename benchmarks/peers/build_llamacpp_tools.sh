#!/usr/bin/env bash
# Build llama.cpp's own benchmark tools (llama-batched-bench, llama-server,
# llama-speculative-simple) from the llama.cpp
# source that llama-cpp-python vendors, so the "llama.cpp batched-bench" rows of
# benchmarks/compare.py run the same llama.cpp as its llama-cpp-python rows.
#
#   benchmarks/peers/build_llamacpp_tools.sh [LLAMA_CPP_SRC [BUILD_DIR]]
#
# LLAMA_CPP_SRC: vendor/llama.cpp of llama-cpp-python's sdist (default: the one compare.py
# unpacked under bench-results/models/llama-cpp-sdist; get it with `pip download --no-binary
# :all: --no-deps llama-cpp-python` and untar). BUILD_DIR: default $CONVOY_LLAMACPP_BUILD_DIR,
# else bench-results/peers/llamacpp-build under the repository; the binaries land in
# BUILD_DIR/bin, compare.py's default --llamacpp-tools-dir (CONVOY_LLAMACPP_TOOLS_DIR points it
# elsewhere). Needs cmake and a C++ compiler. The output ends with rc=N.
set -u
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
src="${1:-}"
if [ -z "$src" ]; then
    src="$(ls -d "$repo"/bench-results/models/llama-cpp-sdist/llama_cpp_python-*/vendor/llama.cpp 2>/dev/null | sort | tail -1)"
fi
build="${2:-${CONVOY_LLAMACPP_BUILD_DIR:-$repo/bench-results/peers/llamacpp-build}}"
if [ -z "$src" ] || [ ! -f "$src/CMakeLists.txt" ]; then
    echo "no llama.cpp source: pass vendor/llama.cpp of llama-cpp-python's sdist" >&2
    echo "rc=2"
    exit 2
fi
echo "building llama-batched-bench and llama-server from $src into $build"
cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_OPENSSL=OFF &&
    cmake --build "$build" -j"${JOBS:-2}" --target llama-batched-bench llama-server llama-speculative-simple
rc=$?
echo "rc=$rc"
exit $rc
