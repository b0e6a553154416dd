#!/usr/bin/env bash
# The distillation lease (issue #22; the calls are in docs/gpu-runbook.md), on the device machine:
# unpack the carried CIFAR-10 training batches and the torch-pruning wheel, distil the carried
# students from a 32-px teacher trained there, all within a wall-clock budget, and pack what must
# come back into $OUT (at most 8 files of 16 MiB).
#
#   benchmarks/gpu_distill.sh setup           unpack $GPU_DATA/b1..b5 into $DATA_DIR, install $WHEELS/*.whl
#   benchmarks/gpu_distill.sh run SECONDS     `mobileprune distill --budget-s SECONDS`, then pack into $OUT
#
# Settings (environment): RECIPE (distill), STUDENTS (.gpu-students, carried), RUN (runs/distill),
# DATA_DIR (data/cifar-10-batches-bin), GPU_DATA (.gpu-data), WHEELS (.whl), TEACHER (a teacher.pt
# to load instead of training one). tests/test_distill.py runs both on tiny data on the CPU.
set -uo pipefail
RUN=${RUN:-runs/distill}
DATA_DIR=${DATA_DIR:-data/cifar-10-batches-bin}
GPU_DATA=${GPU_DATA:-.gpu-data}
WHEELS=${WHEELS:-.whl}
export PYTHONPATH=src:/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

case "${1:-}" in
    setup)
        # Each part carries its own copy of the unpacker; the five training batches are all a
        # distillation needs (no test batch: the test set is only looked at back here).
        unpacker=$(ls "$GPU_DATA"/*/gpu_data.py 2>/dev/null | head -n 1)
        [ -n "$unpacker" ] || { echo "no CIFAR-10 parts under $GPU_DATA" >&2; exit 2; }
        python3 "$unpacker" unpack "$GPU_DATA" "$DATA_DIR" b1,b2,b3,b4,b5 >/dev/null || exit 1
        if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
            python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
                "$WHEELS"/*.whl || exit 1
        fi
        python3 -c "import torch_pruning" 2>/dev/null || { echo "torch_pruning missing: carry its wheel in $WHEELS" >&2; exit 2; }
        echo "setup done: $(ls "$DATA_DIR" | tr '\n' ' ')"
        ;;
    run)
        seconds=${2:?usage: gpu_distill.sh run SECONDS}
        mkdir -p "$RUN"
        # The command ends itself inside its budget; the timeout only guards against a hang. Then,
        # whatever happened, what is finished is packed: the machine goes back after the reply.
        timeout $((seconds + 120)) python3 -m mobileprune --no-progress distill --recipe "${RECIPE:-distill}" \
            --students "${STUDENTS:-.gpu-students}" --out "$RUN" --budget-s "$seconds" --data "$DATA_DIR" \
            ${TEACHER:+--teacher "$TEACHER"} >>"$RUN/distill.log" 2>&1
        status=$?
        tail -n 25 "$RUN/distill.log"
        nvidia-smi --query-gpu=name,utilization.gpu,memory.used --format=csv,noheader 2>/dev/null
        python3 -m mobileprune pack "$RUN" "$OUT" || status=1
        exit $status
        ;;
    *) sed -n '2,14p' "$0"; exit 2 ;;
esac
