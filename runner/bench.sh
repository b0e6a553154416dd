#!/usr/bin/env bash
# Time .pte programs through the lab's native runner on the machine at hand (a Raspberry Pi, say),
# side by side, as `mobileprune bench` does where Python runs: each program in a fresh process per
# round, the programs taking turns in an order rotated every round, so that heat and background
# noise hit them all alike; at each thread count the figure is the median over the rounds of each
# round's median (the runner drops its first 10 images as warm-up). With --accuracy, each program
# also runs once over the whole test file and its accuracy is printed as the lab's runner prints it.
#
#   ./bench.sh [--threads "1 4"] [--runs 100] [--rounds 5] [--accuracy] MODEL.pte ...
#
# Defaults: 1 thread and all cores, 100 timed runs of each program in 5 rounds (fewer rounds for
# fewer runs). The first program is the reference of the speed-up column. RUNNER and DATA override
# where the runner and the test file are (by default beside this script: ./xnn_executor_runner,
# ./data/test_batch.bin, as `runner/aarch64.sh kit` lays them out).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
RUNNER=${RUNNER:-$here/xnn_executor_runner}
export LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"  # the kit's ExecuTorch libraries
DATA=${DATA:-$here/data/test_batch.bin}
threads="1 $(nproc)"; runs=100; rounds=""; accuracy=0; models=()

fail() { echo "bench.sh: error: $*" >&2; exit 2; }
whole() { [[ $2 =~ ^[0-9]+$ ]] && (( $2 >= 1 )) || fail "$1 $2: a whole number from 1"; }

while (( $# )); do
  case $1 in
    --threads) threads=${2:-}; shift 2 || fail "--threads needs a value" ;;
    --runs) runs=${2:-}; shift 2 || fail "--runs needs a value" ;;
    --rounds) rounds=${2:-}; shift 2 || fail "--rounds needs a value" ;;
    --accuracy) accuracy=1; shift ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
    -*) fail "unknown option $1 (see --help)" ;;
    *) models+=("$1"); shift ;;
  esac
done
(( ${#models[@]} )) || fail "no programs given: ./bench.sh MODEL.pte ... (see --help)"
whole --runs "$runs"; rounds=${rounds:-$(( runs < 5 ? runs : 5 ))}; whole --rounds "$rounds"
for n in $threads; do whole --threads "$n"; done
(( rounds <= runs )) || fail "--rounds $rounds is more than --runs $runs"
[[ -x $RUNNER ]] || fail "$RUNNER: no runner there (set RUNNER, or build it: make runner / runner/aarch64.sh build)"
[[ -f $DATA ]] || fail "$DATA: no test file there (set DATA to a CIFAR-10 test_batch.bin)"
for model in "${models[@]}"; do [[ -f $model ]] || fail "$model: no such file"; done

per_round=$(( runs / rounds ))
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
median() { sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }

count=${#models[@]}
for n in $threads; do
  for (( round = 0; round < rounds; round++ )); do
    for (( turn = 0; turn < count; turn++ )); do
      i=$(( (turn + round) % count ))
      out=$("$RUNNER" --model_path "${models[i]}" --data "$DATA" --limit $(( per_round + 10 )) --threads "$n" \
            --bench 2>"$tmp/stderr") || fail "${models[i]}: the runner failed ($(tail -1 "$tmp/stderr"))"
      line=$(sed -n 's/^Latency: median \([0-9.]*\) ms, p90 \([0-9.]*\) ms.*/\1 \2/p' <<<"$out")
      [[ -n $line ]] || fail "$DATA: the runner timed nothing (it needs more than 10 images: $(( per_round + 10 )) asked)"
      echo "$line" >>"$tmp/$i.$n"
    done
  done
done

cpu=$(sed -n 's/^\(Model\|model name\)[[:space:]]*: //p' /proc/cpuinfo 2>/dev/null | head -1)
echo "# $(date -u +%Y-%m-%dT%H:%MZ), $(uname -m), ${cpu:-unknown CPU}, $(nproc) cores"
flags="--threads \"$threads\" --runs $runs --rounds $rounds"; (( accuracy )) && flags+=" --accuracy"
echo "# bench.sh $flags ${models[*]}"
printf '%-48s %7s %10s %8s %8s\n' program threads "median ms" "p90 ms" speed-up
for n in $threads; do reference[n]=$(cut -d' ' -f1 "$tmp/0.$n" | median); done
for (( i = 0; i < count; i++ )); do
  for n in $threads; do
    ms=$(cut -d' ' -f1 "$tmp/$i.$n" | median); p90=$(cut -d' ' -f2 "$tmp/$i.$n" | median)
    name=${models[i]}; (( ${#name} > 48 )) && name=${name: -48}
    printf '%-48s %7s %10.3f %8.3f %7.2fx\n' "$name" "$n" "$ms" "$p90" \
      "$(awk -v a="${reference[n]}" -v b="$ms" 'BEGIN {print a / b}')"
  done
done
if (( accuracy )); then
  for model in "${models[@]}"; do
    "$RUNNER" --model_path "$model" --data "$DATA" 2>/dev/null | sed -n "s|^Accuracy: |$model: Accuracy: |p"
  done
fi
