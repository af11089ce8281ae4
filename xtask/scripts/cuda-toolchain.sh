#!/usr/bin/env bash
# Sets up a CUDA 13 toolchain from Python wheels plus a libcuda stub in $1 (a cache
# folder outside the repository), so that the `cuda` feature compiles and links on a
# machine without a GPU or a system CUDA. Idempotent: a finished setup is kept.
# Called by `cargo xtask cuda-check`.
set -euo pipefail
ROOT=$1
C=$ROOT/cuda
if [ -f "$C/.ready" ]; then
    echo "CUDA toolchain already set up in $C"
    exit 0
fi
mkdir -p "$ROOT"
if [ ! -x "$ROOT/venv/bin/pip" ]; then
    python3 -m venv "$ROOT/venv"
fi
"$ROOT/venv/bin/pip" install --quiet \
    "cuda-toolkit[nvcc,cudart,cublas,curand,nvrtc,crt,nvvm,cccl]==13.0.2"
W=$(echo "$ROOT"/venv/lib/python3*/site-packages/nvidia/cu13)
[ -x "$W/bin/nvcc" ] || { echo "no nvcc in $W after pip install" >&2; exit 1; }
mkdir -p "$C/lib64/stubs" "$C/stubsrc"
ln -sfn "$W/bin" "$C/bin"
ln -sfn "$W/include" "$C/include"
ln -sfn "$W/nvvm" "$C/nvvm"
ln -sfn lib64 "$C/lib"
for f in "$W"/lib/*.so* "$W"/lib/*.a; do ln -sf "$f" "$C/lib64/"; done
(
    cd "$C/lib64"
    for l in cudart cublas cublasLt curand nvrtc; do
        ln -sf "$(ls lib$l.so.* | grep -v alt | head -1)" "lib$l.so"
    done
)
# libcuda stub: every cu* entry point of cuda.h returns CUDA_ERROR_STUB_LIBRARY (34).
(
    cd "$C/stubsrc"
    { gcc -E -P "$W/include/cuda.h"; gcc -E -P -D__CUDA_API_VERSION_INTERNAL=0 "$W/include/cuda.h"; } \
        | grep -oE '\bcu[A-Z][A-Za-z0-9_]*\s*\(' | sed 's/\s*($//' | sort -u \
        | awk '{print "int " $1 "(void){return 34;}"}' > libcuda_stub.c
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o ../lib64/stubs/libcuda.so libcuda_stub.c
    cp ../lib64/stubs/libcuda.so ../lib64/stubs/libcuda.so.1
)
touch "$C/.ready"
echo "CUDA toolchain ready in $C"
