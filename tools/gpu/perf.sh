#!/usr/bin/env bash
# [gpu-perf] on one GPU (about 7 minutes, at most 9.5): the plain-JAX MPT-1B anchor and ours in
# the same run (both with ALiBi), MPT-1B at seq 2048 (its 3 steps after the timed ones traced:
# where the time goes) and at seq 8192. The correctness guard is tools/gpu/guard.sh, a run of
# its own.
#   run: bash tools/gpu/perf.sh   (kind nvidia-h200: the targets are H200 figures and batch 16
#   without remat needs ~76 GB; carry .whl; fill it with tools/gpu/fetch_wheels.sh)
# Details go to $OUT (traces and their full summaries in $OUT/profile/<row>/); the tables print
# last: the bench rows, then each traced row's busy line, categories and top kernels.
set -u
source tools/gpu/setup.sh || exit 1
ANCHOR=${ANCHOR:-../shared/tools/anchor_bench.py}
[ -f "$ANCHOR" ] || ANCHOR=shared/tools/anchor_bench.py
B=16 ANCHOR_OUT="$OUT" timeout 140 python3 "$ANCHOR" jax_plain_mpt1b 2>&1 | tail -4
bench() {  # out-name, seconds, then bench_train arguments; prints the table's header and rows
  local name=$1 limit=$2
  shift 2
  timeout "$limit" python3 tools/bench_train.py --models mpt-1b --precision amp_bf16 --warmup 3 \
    --steps 10 "${ALIBI[@]}" --out "$OUT/$name" "$@" >"$OUT/$name.log" 2>&1
  grep "^| [^-]" "$OUT/$name/bench_train.md" 2>/dev/null || tail -3 "$OUT/$name.log"
}
bench 1b_2048 250 --seq-lens 2048 --global-batch 16 --remat none --loss-chunk none,512 \
  --profile "$OUT/profile"
bench 1b_8192 160 --seq-lens 8192 --global-batch 4 --remat none --loss-chunk 512
# where the time goes, per traced row: the busy line, the category table, the top 10 kernels
for summary in "$OUT"/profile/*/summary.md; do
  [ -f "$summary" ] || { echo "no profile summary in $OUT/profile (see $OUT/1b_2048.log)"; break; }
  echo "## $(basename "$(dirname "$summary")")"
  awk '/^(no device process|device process|Busy)/ {print} /^\| category/ {t = 1}
    /^\| name/ {t = 1; n = 0} t && /^\|/ {if (n++ < 12) print; next} t {t = 0; print ""}' "$summary"
done
