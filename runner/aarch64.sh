#!/usr/bin/env bash
# Cross-compile xnn_executor_runner for a Raspberry Pi (aarch64 Linux) and, with "test", run it under
# qemu-aarch64 on real test images and check that its predictions equal the native x86-64 build's.
#   runner/aarch64.sh build
#   runner/aarch64.sh test [MODEL.pte] [DATA_DIR] [N]
# Needs Debian's g++-aarch64-linux-gnu and qemu-user (apt-get install g++-aarch64-linux-gnu qemu-user)
# and the aarch64 executorch wheel from PyPI (downloaded here). qemu timings are not Pi timings.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ET_VERSION=$($PY -c 'import importlib.metadata as m; print(m.version("executorch"))')
WHEEL_DIR=build/aarch64-wheel
ET_ROOT=build/aarch64-et/executorch
BIN=build/aarch64/xnn_executor_runner

need() { command -v "$1" >/dev/null || { echo "runner/aarch64.sh: error: $1 not found: apt-get install $2" >&2; exit 2; }; }

build() {
  need aarch64-linux-gnu-g++ g++-aarch64-linux-gnu
  if [ ! -f "$ET_ROOT/lib/cmake/executorch/executorch-config.cmake" ]; then
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
      --platform manylinux_2_28_aarch64 -d "$WHEEL_DIR" "executorch==$ET_VERSION"
    mkdir -p build/aarch64-et
    (cd build/aarch64-et && unzip -q -o "../aarch64-wheel/executorch-$ET_VERSION-"*aarch64.whl \
      'executorch/include/*' 'executorch/lib/*' 'executorch/share/*')
  fi
  cmake -S runner -B build/aarch64 -DCMAKE_TOOLCHAIN_FILE="$PWD/runner/aarch64-toolchain.cmake" \
    -DCMAKE_PREFIX_PATH="$PWD/$ET_ROOT" -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build build/aarch64 -j2
  file "$BIN"
}

check() {
  need qemu-aarch64 qemu-user
  local model=${1:-runs/quick/submission/model/mobilenet.pte} data=${2:-../shared/data/cifar-10-batches-bin} n=${3:-20}
  [ -f "$BIN" ] || build
  [ -f build/xnn_executor_runner ] || make runner
  local tmp; tmp=$(mktemp -d)
  build/xnn_executor_runner --model_path "$model" --data "$data/test_batch.bin" --limit "$n" \
    --predictions "$tmp/x86.txt" 2>/dev/null | tail -1
  qemu-aarch64 -L /usr/aarch64-linux-gnu "$BIN" --model_path "$model" --data "$data/test_batch.bin" --limit "$n" \
    --predictions "$tmp/arm.txt" 2>/dev/null | tail -1
  if cmp -s "$tmp/x86.txt" "$tmp/arm.txt"; then
    echo "aarch64 build under qemu: same predictions as x86-64 on $n images"
  else
    echo "runner/aarch64.sh: error: aarch64 predictions differ from x86-64" >&2; exit 1
  fi
}

case "${1:-build}" in
  build) build ;;
  test) shift; check "$@" ;;
  *) echo "usage: runner/aarch64.sh build | test [MODEL.pte] [DATA_DIR] [N]" >&2; exit 2 ;;
esac
