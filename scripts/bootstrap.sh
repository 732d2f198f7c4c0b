#!/usr/bin/env bash
# Installs what the build needs into the project folder, idempotently:
#   .libtorch/torch/{lib,include,share}  libtorch from the PyPI wheel torch==2.11.0 (tch 0.24 expects it)
#   .libtorch/torch/lib/libcudart.so.13, libcupti.so.13  the two CUDA libraries that
#       libtorch_cpu.so needs even on a CPU-only host (from the PyPI cuda-toolkit wheels)
#   protoc comes from the protoc-bin-vendored crate at build time, so nothing to install here.
# A second run finds the stamp file and does nothing.
set -euo pipefail

TORCH_VERSION=2.11.0
CUDA_TOOLKIT_VERSION=13.0.2
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.libtorch"
STAMP="$DEST/.installed-torch-$TORCH_VERSION"

if [[ -f "$STAMP" ]]; then
  echo "bootstrap: libtorch $TORCH_VERSION already installed in $DEST/torch; nothing to do"
  exit 0
fi

PYTHON="${PYTHON:-python3}"
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "bootstrap: $PYTHON not found; install Python 3 with pip (Debian: apt-get install python3-pip)" >&2
  exit 1
fi
if ! command -v unzip >/dev/null 2>&1; then
  echo "bootstrap: installing unzip"
  apt-get update -qq && apt-get install -y -qq unzip >/dev/null
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/bootstrap.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

echo "bootstrap: downloading torch==$TORCH_VERSION (the wheel alone, about 530 MB)"
"$PYTHON" -m pip download --quiet --no-deps --dest "$WORK/wheel" "torch==$TORCH_VERSION"
echo "bootstrap: unpacking libtorch"
rm -rf "$DEST"
mkdir -p "$DEST"
unzip -q "$WORK"/wheel/torch-"$TORCH_VERSION"-*.whl 'torch/lib/*' 'torch/include/*' 'torch/share/*' -d "$DEST"
# Python bindings are not needed by tch and drag in libpython.
rm -f "$DEST/torch/lib/libtorch_python.so"

echo "bootstrap: installing the CUDA runtime and CUPTI that libtorch_cpu.so links against"
"$PYTHON" -m pip install --quiet --disable-pip-version-check --no-warn-conflicts \
  --target "$WORK/cuda" "cuda-toolkit[cudart,cupti]==$CUDA_TOOLKIT_VERSION"
for lib in libcudart.so.13 libcupti.so.13; do
  found="$(find "$WORK/cuda" -name "$lib" -print -quit)"
  if [[ -z "$found" ]]; then
    echo "bootstrap: $lib not found in the cuda-toolkit wheels" >&2
    exit 1
  fi
  cp "$found" "$DEST/torch/lib/"
done

touch "$STAMP"
echo "bootstrap: libtorch $TORCH_VERSION installed in $DEST/torch"
