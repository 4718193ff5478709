#!/usr/bin/env bash
# Build llama.cpp's llama-bench, llama-speculative-simple and llama-server from the source that the
# llama-cpp-python sdist vendors (PyPI is the only reachable source), for the benchmark's
# reference rows. Native CPU flags (-DGGML_NATIVE=ON): the peer at its best on this machine.
# Result: $DOVETAIL_HOME/llama.cpp/<version>/bin/{llama-bench,llama-speculative-simple,llama-server}.
# Idempotent.
set -euo pipefail
# LLAMA_NO_AMX=1: native flags without AMX (-march=native with AVX-512 but the AMX extensions off),
# for VMs whose CPU lists AMX but where llama.cpp's AMX matmul crashes (SIGSEGV on any prompt).
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
HOME_DIR="${DOVETAIL_HOME:-$HOME/.cache/dovetail}"
OUT="$HOME_DIR/llama.cpp/$VERSION"
FLAGS=(-DGGML_NATIVE=ON)
if [[ "${LLAMA_NO_AMX:-0}" == 1 ]]; then
    OUT="$OUT-noamx"
    FLAGS=(-DGGML_NATIVE=OFF "-DCMAKE_C_FLAGS=-march=native -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
           "-DCMAKE_CXX_FLAGS=-march=native -mno-amx-tile -mno-amx-int8 -mno-amx-bf16")
fi
TOOLS=(llama-bench llama-speculative-simple llama-server)
if [[ -x "$OUT/bin/llama-bench" && -x "$OUT/bin/llama-speculative-simple" && -x "$OUT/bin/llama-server" ]]; then
    echo "$OUT/bin"; exit 0
fi
command -v cmake >/dev/null || { echo "cmake not found: pip install cmake (or apt-get install cmake)" >&2; exit 1; }
command -v c++ >/dev/null || { echo "no C++ compiler found (install g++)" >&2; exit 1; }
WORK="$OUT.build"
rm -rf "$WORK" && mkdir -p "$WORK"
echo "[build_llamacpp] downloading the llama-cpp-python $VERSION sdist" >&2
python3 -m pip download --quiet --no-deps --no-binary :all: -d "$WORK" "llama-cpp-python==$VERSION"
tar -xzf "$WORK"/llama_cpp_python-*.tar.gz -C "$WORK"
SRC=$(echo "$WORK"/llama_cpp_python-*/vendor/llama.cpp)
echo "[build_llamacpp] configuring $SRC (${FLAGS[*]})" >&2
cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release "${FLAGS[@]}" -DLLAMA_CURL=OFF \
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF >&2
echo "[build_llamacpp] building (about 10 minutes on 2 cores)" >&2
cmake --build "$WORK/build" -j"$(nproc)" --target "${TOOLS[@]}" >&2
mkdir -p "$OUT/bin"
for tool in "${TOOLS[@]}"; do cp "$WORK/build/bin/$tool" "$OUT/bin/"; done
rm -rf "$WORK"
echo "$OUT/bin"
