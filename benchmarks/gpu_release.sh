#!/usr/bin/env bash
# The release run, on the device machine (one H100): dense baseline, then Part 2 to 20 MFLOPs with
# and without distillation and Part 1, side by side on the one GPU. The DEVELOPERS.md runbook says
# which calls carry what; this script is what those calls run.
#
#   benchmarks/gpu_release.sh setup         unpack the carried CIFAR-10 parts, install the carried wheel
#   benchmarks/gpu_release.sh start         start the pipeline in its own process session (it outlives
#                                           the call that started it, as long as the machine is held)
#   benchmarks/gpu_release.sh wait SECONDS  wait up to SECONDS for it, then pack its results into $OUT
#
# Settings (environment): RUN (run folder, default runs/lab2-20), BASELINE_EPOCHS (overrides the
# baseline recipe's epochs). What comes back is state_dicts + channel layouts, summaries, tables and
# logs in 15-MiB pieces ($OUT/results.tgz.NN; `cat results.tgz.* | tar xz`): the .pth/.pte are
# rebuilt here with the pinned versions (`mobileprune export`).
set -uo pipefail
RUN=${RUN:-runs/lab2-20}
export PYTHONPATH=src:/tmp/site PYTHONUNBUFFERED=1
MP="python3 -m mobileprune --no-progress"
DATA="--data data/cifar-10-batches-bin"

pipeline() {
    mkdir -p "$RUN"
    $MP train --recipe baseline --out "$RUN/baseline" --resume ${BASELINE_EPOCHS:+--epochs $BASELINE_EPOCHS} $DATA \
        || { echo "baseline failed" >"$RUN/FAILED"; return 1; }
    local base="--baseline $RUN/baseline/mobilenet.pth"
    # Pruning searches run on the CPU: share its 16 cores instead of oversubscribing them.
    OMP_NUM_THREADS=5 $MP prune --recipe lab2-20 $base --out "$RUN/prune" --no-export $DATA >"$RUN/prune.log" 2>&1 &
    OMP_NUM_THREADS=5 $MP prune --recipe lab2-20 $base --out "$RUN/prune-nokd" --no-distill --no-export $DATA \
        >"$RUN/prune-nokd.log" 2>&1 &
    OMP_NUM_THREADS=5 $MP finegrained --recipe baseline $base --out "$RUN/finegrained" --no-export $DATA \
        >"$RUN/finegrained.log" 2>&1 &
    wait
    touch "$RUN/DONE"
}

pack() {
    # No optimiser states, no pickles (rebuilt here), no pruned-before-fine-tuning copies, and of
    # the no-KD run's steps only their tables: the pieces must stay under the 64 MiB that comes back.
    tar czf - --exclude=last.pt --exclude=pruned.pt --exclude='*.pth' --exclude='prune-nokd/step_*/finetune/best.pt' \
        --exclude='prune/step_[12]/finetune/best.pt' -C "$(dirname "$RUN")" "$(basename "$RUN")" \
        | split -b 15m -d - "$OUT/results.tgz."
    ls -l "$OUT"
}

case "${1:-}" in
    setup)
        python3 .gpu-data/test/gpu_data.py unpack .gpu-data data/cifar-10-batches-bin >/dev/null &&
            python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
        ;;
    start)
        mkdir -p "$RUN"
        setsid nohup bash "$0" pipeline >>"$RUN/pipeline.log" 2>&1 </dev/null &
        echo "started; log: $RUN/pipeline.log"
        ;;
    pipeline) pipeline ;;
    wait)
        # A machine left idle for 30 s goes back, and the next call gets a bare one: then there is
        # nothing to wait for, and waiting would only burn device time.
        if [ ! -e "$RUN/pipeline.log" ]; then
            echo "no pipeline on this machine (a fresh one: the last was given back); nothing to wait for" >&2
            exit 3
        fi
        for _ in $(seq "${2:-540}"); do
            [ -e "$RUN/DONE" ] || [ -e "$RUN/FAILED" ] && break
            sleep 1
        done
        for log in "$RUN"/*.log; do echo "== $log"; tail -n 8 "$log"; done
        nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
        [ -e "$RUN/DONE" ] && echo "pipeline DONE"
        pack
        ;;
    *) sed -n '2,16p' "$0"; exit 2 ;;
esac
