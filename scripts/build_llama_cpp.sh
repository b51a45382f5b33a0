#!/usr/bin/env bash
# Builds llama.cpp's command-line tools (llama-server, llama-cli, llama-quantize,
# llama-perplexity, llama-bench) from the llama.cpp vendored in the llama-cpp-python
# sdist on PyPI, so the only network access is the package registry.
# Benchmark-only (bench/export_perplexity.py); never needed at runtime or in CI.
# Takes ~15 minutes on 2 cores. Idempotent: a finished build is reused.
#   bash scripts/build_llama_cpp.sh [CACHE_DIR]   (default ~/.cache/quantserve/llama.cpp)
# Prints the directory holding the binaries on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.16}
CACHE=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/quantserve/llama.cpp}
BIN="$CACHE/build/bin"
TOOLS=(llama-server llama-cli llama-quantize llama-perplexity llama-bench)
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3

done_already=1
for tool in "${TOOLS[@]}"; do [ -x "$BIN/$tool" ] || done_already=0; done
if [ "$done_already" -eq 1 ]; then
    echo "$BIN"
    exit 0
fi

mkdir -p "$CACHE"
SDIST="$CACHE/llama_cpp_python-$VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
    "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
        --dest "$CACHE" "llama-cpp-python==$VERSION" >&2
fi
SRC="$CACHE/src"
if [ ! -f "$SRC/vendor/llama.cpp/CMakeLists.txt" ]; then
    rm -rf "$SRC" && mkdir -p "$SRC"
    tar -xzf "$SDIST" -C "$SRC" --strip-components=1
fi
GENERATOR=()
command -v ninja >/dev/null && GENERATOR=(-G Ninja)
# Native CPU flags: the binaries run on the machine that builds them (the benchmark host).
cmake -S "$SRC/vendor/llama.cpp" -B "$CACHE/build" "${GENERATOR[@]}" \
    -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON >&2
cmake --build "$CACHE/build" --config Release -j "$(nproc)" --target "${TOOLS[@]}" >&2
echo "$BIN"
