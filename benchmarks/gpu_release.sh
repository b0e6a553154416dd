#!/usr/bin/env bash
# The release run, on the device machine (one H100): the dense baseline (or a carried one), then
# side by side on the one GPU Part 2 to 20 and to 45 MFLOPs with distillation, and Part 1 followed
# by Part 2 to 20 MFLOPs without distillation. The DEVELOPERS.md runbook says which calls carry
# what; this script is what those calls run.
#
#   benchmarks/gpu_release.sh setup         unpack the carried CIFAR-10 parts (and baseline), install the wheel
#   benchmarks/gpu_release.sh start         start the pipeline in its own process session (it outlives
#                                           the call that started it, as long as the machine is held)
#   benchmarks/gpu_release.sh wait SECONDS  wait up to SECONDS for it, then pack its results into $OUT
#
# Settings (environment):
#   RUN              run folder (default runs/lab2-20)
#   BASELINE         a trained dense model (.pt with its layout, or .pth): skip training one
#   BASELINE_EPOCHS  overrides the baseline recipe's epochs when one is trained
#   RECIPE_BASELINE, RECIPE_20, RECIPE_45   recipes (default baseline, lab2-20, lab2-45): the dense
#                    baseline and Part 1; Part 2 with distillation (prune/, prune-45/); Part 2
#                    without it (prune-nokd/, on RECIPE_20's budget, after Part 1)
#   PARTS            which runs, of: prune prune-45 finegrained prune-nokd (default all four); a
#                    session with less device time runs fewer, e.g. PARTS="prune finegrained"
#   DATA_DIR         CIFAR-10 folder (default data/cifar-10-batches-bin, where setup unpacks)
#   THREADS          CPU threads per job (default 5: three jobs on the 16 cores)
# What comes back is state_dicts + channel layouts, summaries, tables and logs in 15-MiB pieces
# ($OUT/results.tgz.NN; `cat results.tgz.* | tar xz`): the .pth/.pte are rebuilt here with the
# pinned versions (`mobileprune export`). tests/test_gpu_release.py runs it on tiny data.
set -uo pipefail
RUN=${RUN:-runs/lab2-20}
RECIPE_BASELINE=${RECIPE_BASELINE:-baseline} RECIPE_20=${RECIPE_20:-lab2-20} RECIPE_45=${RECIPE_45:-lab2-45}
export PYTHONPATH=src:/tmp/site PYTHONUNBUFFERED=1
MP="python3 -m mobileprune --no-progress"
DATA="--data ${DATA_DIR:-data/cifar-10-batches-bin}"
ALL_PARTS="prune prune-45 finegrained prune-nokd"
PARTS=${PARTS:-$ALL_PARTS}
listed() { [[ " $2 " == *" $1 "* ]]; }  # listed WORD "LIST OF WORDS"
wants() { listed "$1" "$PARTS"; }

pipeline() {
    mkdir -p "$RUN"
    local base
    if [ -n "${BASELINE:-}" ]; then
        base="--baseline $BASELINE"
    else
        $MP train --recipe "$RECIPE_BASELINE" --out "$RUN/baseline" --resume ${BASELINE_EPOCHS:+--epochs $BASELINE_EPOCHS} \
            $DATA || { echo "baseline failed" >"$RUN/FAILED"; return 1; }
        base="--baseline $RUN/baseline/mobilenet.pth"
    fi
    # Pruning searches run on the CPU: share its 16 cores instead of oversubscribing them.
    export OMP_NUM_THREADS=${THREADS:-5}
    wants prune && $MP prune --recipe "$RECIPE_20" $base --out "$RUN/prune" --no-export $DATA >"$RUN/prune.log" 2>&1 &
    wants prune-45 && $MP prune --recipe "$RECIPE_45" $base --out "$RUN/prune-45" --no-export $DATA \
        >"$RUN/prune-45.log" 2>&1 &
    { wants finegrained && $MP finegrained --recipe "$RECIPE_BASELINE" $base --out "$RUN/finegrained" --no-export \
        $DATA >"$RUN/finegrained.log" 2>&1
      wants prune-nokd && $MP prune --recipe "$RECIPE_20" $base --out "$RUN/prune-nokd" --no-distill --no-export \
        $DATA >"$RUN/prune-nokd.log" 2>&1; } &
    wait
    touch "$RUN/DONE"
}

pack() {
    # What comes back must stay under 64 MiB: no optimiser states (last.pt), no pickles or .pte
    # (rebuilt here), no pruned-before-fine-tuning copies, and of each schedule's steps only the
    # last finished one's model (all a resumed schedule needs); every table, log and plot.
    local parent name
    parent=$(dirname "$RUN"); name=$(basename "$RUN")
    {
        (cd "$parent" && find "$name" -type f ! -name last.pt ! -name pruned.pt ! -name '*.pth' ! -name '*.pte' \
            ! -path '*/finetune/best.pt')
        for done in "$RUN"/*/step_*/done.json; do [ -e "$done" ] && dirname "$done"; done \
            | sort -V | awk -F/ '{last[$(NF-1)] = $0} END {for (d in last) print last[d]}' \
            | while read -r step; do
                [ -e "$step/finetune/best.pt" ] && echo "${step#$parent/}/finetune/best.pt"
              done
    } >/tmp/pack.list
    tar czf - -C "$parent" -T /tmp/pack.list | split -b 15m -d - "$OUT/results.tgz."
    ls -l "$OUT"
}

case "${1:-}" in
    setup)
        # A baseline carried in halves (.gpu-base/a and .gpu-base/b) goes to runs/base/: an ignored
        # folder, which later calls to the warm machine keep (they remove untracked ones).
        if [ -d .gpu-base ]; then
            mkdir -p runs/base && cat .gpu-base/a/mobilenet.pt.* .gpu-base/b/mobilenet.pt.* >runs/base/mobilenet.pt &&
                cp .gpu-base/a/mobilenet.layout.json runs/base/ && (cd .gpu-base/a && sha256sum -c --quiet SHA256) || exit 1
        fi
        python3 .gpu-data/test/gpu_data.py unpack .gpu-data data/cifar-10-batches-bin >/dev/null &&
            python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
        ;;
    start)
        for part in $PARTS; do  # a misspelt part would otherwise run nothing and say DONE
            listed "$part" "$ALL_PARTS" || { echo "PARTS: unknown part '$part'; known: $ALL_PARTS" >&2; exit 2; }
        done
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
