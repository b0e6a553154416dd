#!/usr/bin/env bash
# Cross-compile xnn_executor_runner for a Raspberry Pi (aarch64 Linux) and, with "test", run it under
# qemu-aarch64 on real test images and check that its predictions equal the native x86-64 build's.
#   runner/aarch64.sh build
#   runner/aarch64.sh test [MODEL.pte] [DATA_DIR] [N]
#   runner/aarch64.sh kit [PROGRAM.pte ...]
# "kit" packs build/pi-kit.tar.gz (KIT_DIR=build/pi-kit) for a Raspberry Pi (64-bit OS): this runner and its ExecuTorch
# libraries, runner/bench.sh, the test file and the programs to time (by default the dense model's
# fp32 and int8 programs, the hand-in's two and prune-20's, exported here when missing). On the Pi:
#   tar xzf pi-kit.tar.gz && cd pi-kit && ./bench.sh --accuracy models/*.pte | tee bench-pi.txt
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

exported() {  # exported SOURCE_MODEL OUT_DIR [--int8]: OUT_DIR/model/mobilenet{,.int8}.pte, made if missing
  local want=$2/model/mobilenet.pte; [ "${3:-}" = --int8 ] && want=$2/model/mobilenet.int8.pte
  [ -f "$want" ] || $PY -m mobileprune --no-progress export "$1" --out "$2" ${3:-} >&2
  echo "$want"
}

kit() {
  local data=${DATA_DIR:-../shared/data/cifar-10-batches-bin} dir=${KIT_DIR:-build/pi-kit} programs=("$@")
  [ -f "$data/test_batch.bin" ] || { echo "runner/aarch64.sh: error: $data/test_batch.bin: no test file (set DATA_DIR)" >&2; exit 2; }
  for program in "${programs[@]}"; do
    [ -f "$program" ] || { echo "runner/aarch64.sh: error: $program: no such file" >&2; exit 2; }
  done
  [ -f "$BIN" ] || build >/dev/null  # before minutes of exporting: the cross compiler may be missing
  if [ ${#programs[@]} -eq 0 ]; then  # numbered so that models/*.pte lists the dense reference first
    programs=("$(exported release/baseline/mobilenet.pt runs/bench/baseline)"
              "$(exported release/baseline/mobilenet.pt runs/bench/baseline --int8)"
              release/prune/mobilenet.pte release/prune/mobilenet.int8.pte
              "$(exported release/prune-20/mobilenet.pt runs/bench/prune-20)")
    names=(1-dense.pte 2-dense.int8.pte 3-hand-in.pte 4-hand-in.int8.pte 5-prune-20.pte)
  else
    names=(); for (( i = 0; i < ${#programs[@]}; i++ )); do
      names+=("$(( i + 1 ))-$(basename "$(dirname "${programs[i]}")").$(basename "${programs[i]}")")
    done
  fi
  for program in "${programs[@]}"; do  # an export that failed above said why on stderr
    [ -f "$program" ] || { echo "runner/aarch64.sh: error: ${program:-a program}: not exported" >&2; exit 2; }
  done
  rm -rf "$dir" "$dir.tar.gz"
  mkdir -p "$dir/lib" "$dir/data" "$dir/models"
  cp "$BIN" runner/bench.sh "$dir/"
  cp "$ET_ROOT"/lib/*.so "$dir/lib/"
  cp "$data/test_batch.bin" "$dir/data/"
  for (( i = 0; i < ${#programs[@]}; i++ )); do cp "${programs[i]}" "$dir/models/${names[i]}"; done
  tar -C "$(dirname "$dir")" -czf "$dir.tar.gz" "$(basename "$dir")"
  echo "$dir.tar.gz ($(du -h "$dir.tar.gz" | cut -f1)): ${names[*]}"
  echo "on the Pi: tar xzf pi-kit.tar.gz && cd pi-kit && ./bench.sh --accuracy models/*.pte | tee bench-pi.txt"
}

case "${1:-build}" in
  build) build ;;
  test) shift; check "$@" ;;
  kit) shift; kit "$@" ;;
  *) echo "usage: runner/aarch64.sh build | test [MODEL.pte] [DATA_DIR] [N] | kit [PROGRAM.pte ...]" >&2; exit 2 ;;
esac
