#!/usr/bin/env bash
# [gpu-perf] on one GPU (about 9 minutes): the plain-JAX MPT-1B anchor and ours in the same run,
# MPT-1B at seq 8192, then the 125M correctness guard (reference vs fast path, 50 steps).
#   run: bash tools/gpu/perf.sh   (carry .whl; fill it with tools/gpu/fetch_wheels.sh)
# Details go to $OUT; the tables print last.
set -u
source tools/gpu/setup.sh || exit 1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
ANCHOR=${ANCHOR:-../shared/tools/anchor_bench.py}
[ -f "$ANCHOR" ] || ANCHOR=shared/tools/anchor_bench.py
B=16 ANCHOR_OUT="$OUT" timeout 150 python3 "$ANCHOR" jax_plain_mpt1b 2>&1 | tail -4
bench() {  # out-name, then bench_train arguments
  local name=$1
  shift
  timeout 200 python3 tools/bench_train.py --models mpt-1b --precision amp_bf16 --warmup 3 \
    --steps 10 --out "$OUT/$name" "$@" 2>&1 | tail -3
}
bench 1b_2048 --seq-lens 2048 --global-batch 16 --remat none --loss-chunk none,512
bench 1b_8192 --seq-lens 8192 --global-batch 4 --remat none --loss-chunk 512
timeout 200 python3 tools/sweep.py experiments/sweeps/gpu-perf-guard.yaml \
  --out-dir "$OUT/guard" 2>&1 | tail -8
