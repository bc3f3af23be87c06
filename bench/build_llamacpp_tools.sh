#!/usr/bin/env bash
# Build llama.cpp's command-line tools (llama-quantize, llama-imatrix, llama-perplexity)
# from the llama.cpp sources vendored in the llama-cpp-python sdist, so the tools match the
# library that the export test loads GGUFs with.
#
#   bench/build_llamacpp_tools.sh [PREFIX]      (default PREFIX: <repo>/.cache/llamacpp)
#
# Idempotent: when every tool is already built it only prints where they are.
# The binaries end up in PREFIX/bin.
set -euo pipefail

VERSION=0.3.36
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX="${1:-$REPO_ROOT/.cache/llamacpp}"
JOBS=2
TOOLS=(llama-quantize llama-imatrix llama-perplexity)
PYTHON="${PYTHON:-$REPO_ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3

all_built() {
    for t in "${TOOLS[@]}"; do [ -x "$PREFIX/bin/$t" ] || return 1; done
}

if all_built; then
    echo "llama.cpp tools already built in $PREFIX/bin"
    exit 0
fi

mkdir -p "$PREFIX/src" "$PREFIX/bin"
SRC="$PREFIX/src/llama_cpp_python-$VERSION"
if [ ! -f "$SRC/vendor/llama.cpp/CMakeLists.txt" ]; then
    echo "downloading llama-cpp-python==$VERSION sdist"
    "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: \
        "llama-cpp-python==$VERSION" -d "$PREFIX/src"
    tar -xzf "$PREFIX/src/llama_cpp_python-$VERSION.tar.gz" -C "$PREFIX/src"
fi
LLAMA="$SRC/vendor/llama.cpp"
[ -f "$LLAMA/CMakeLists.txt" ] || { echo "error: no llama.cpp sources in $SRC" >&2; exit 1; }

BUILD="$PREFIX/build"
# ggml's AMX kernels (picked by -march=native on CPUs that advertise AMX) crash llama-perplexity with a
# segmentation fault on Q4_0 files in VMs that advertise AMX without enabling it; the AVX-512 repacked kernels
# that every other x86 CPU uses are kept.
NO_AMX=()
if [ "$(uname -m)" = "x86_64" ]; then
    NO_AMX=(-DCMAKE_C_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
            -DCMAKE_CXX_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16")
fi
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
nice -n 10 cmake -S "$LLAMA" -B "$BUILD" "${GEN[@]}" \
    -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON "${NO_AMX[@]}"
nice -n 10 cmake --build "$BUILD" -j "$JOBS" --target "${TOOLS[@]}"
for t in "${TOOLS[@]}"; do
    cp "$BUILD/bin/$t" "$PREFIX/bin/$t"
done
echo "llama.cpp tools built in $PREFIX/bin"
