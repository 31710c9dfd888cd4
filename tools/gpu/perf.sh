#!/usr/bin/env bash
# [gpu-perf] on one GPU (about 6 minutes, at most 9.5): the plain-JAX MPT-1B anchor and ours in
# the same run (both with ALiBi, batch 16, seq 2048): scanned layers (the preset) and unrolled
# ones (no per-layer copies of the saved activations into and out of the scan's stacked
# buffers), and scanned with every matmul in cuBLAS (no XLA Triton GEMMs), each with 3 steps
# traced after the timed ones (where the time goes); scanned with whole logits; then MPT-1B at
# seq 8192. With HOPPER=1 (once kernels.sh passed the Hopper kernels' GPU tests) a scanned row
# with attn_impl=pallas_mgpu replaces the whole-logits one. The correctness
# guard is tools/gpu/guard.sh, a run of its own.
#   run: bash tools/gpu/perf.sh   (kind nvidia-h200: the targets are H200 figures and batch 16
#   without remat does not fit an H100; carry .whl and shared; fill .whl with fetch_wheels.sh,
#   copy ../shared/tools/anchor_bench.py to shared/tools/)
# The tables print last and go to $OUT/perf.md; logs, CSVs and profile summaries to
# $OUT/perf_details.tgz (what comes back from $OUT is limited to 8 files).
set -u
source tools/gpu/setup.sh || exit 1
ANCHOR=${ANCHOR:-../shared/tools/anchor_bench.py}
[ -f "$ANCHOR" ] || ANCHOR=shared/tools/anchor_bench.py
WORK=$OUT/perf
mkdir -p "$WORK"
REPORT=$OUT/perf.md
B=16 ANCHOR_OUT="$WORK" timeout 100 python3 "$ANCHOR" jax_plain_mpt1b >"$WORK/anchor.log" 2>&1
python3 - "$WORK/anchor_jax_plain_mpt1b.json" >"$REPORT" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))["jax_plain_mpt1b"]
    print(f"anchor jax_plain_mpt1b B{r['batch']}: {r['tokens_per_s']:,.0f} tokens/s, "
          f"step {r['step_s']:.4f} s, MFU {100 * r['mfu_vs_989']:.2f}% ({r['params']:,} params)")
except (OSError, KeyError, ValueError) as e:
    print(f"anchor: no result ({e!r}); see anchor.log in perf_details.tgz")
PY
bench() {  # row name, seconds, then bench_train arguments; the row's table line goes to REPORT
  local name=$1 limit=$2  # ROW_XLA_FLAGS, if set, is the row's XLA_FLAGS
  shift 2
  XLA_FLAGS="${ROW_XLA_FLAGS:-${XLA_FLAGS:-}}" timeout "$limit" python3 tools/bench_train.py \
    --models mpt-1b --precision amp_bf16 --warmup 3 --steps 10 --remat none --loss-chunk 512 \
    "${ALIBI[@]}" --out "$WORK/$name" "$@" >"$WORK/$name.log" 2>&1
  local table=$WORK/$name/bench_train.md
  if [ -f "$table" ]; then
    grep -q "^row: " "$REPORT" || echo "row: $(grep -m1 "^| Model" "$table")" >>"$REPORT"
    echo "$name: $(grep "^| mpt" "$table")" >>"$REPORT"
  else
    echo "$name: no result: $(tail -1 "$WORK/$name.log")" >>"$REPORT"
  fi
}
# worst cases add up to 570 s of the 600 a call may take (585 with HOPPER=1); typical runs take
# half
bench scan_2048 90 --seq-lens 2048 --global-batch 16 --profile "$WORK/profile_scan"
bench unrolled_2048 160 --seq-lens 2048 --global-batch 16 --profile "$WORK/profile_unrolled" \
  --model-override scan_layers=false
# XLA's own Triton GEMMs (gemm_fusion_dot_*: 38 ms of the 2026-11-28 step) against cuBLAS for
# every matmul
ROW_XLA_FLAGS=--xla_gpu_enable_triton_gemm=false bench scan_2048_cublas 80 --seq-lens 2048 \
  --global-batch 16 --profile "$WORK/profile_scan_cublas"
if [ "${HOPPER:-0}" = 1 ]; then
  # our Mosaic GPU (wgmma) kernels in the model, once kernels.sh has passed their GPU tests;
  # in place of the whole-logits row, to stay inside the call's 600 s
  bench scan_2048_hopper 85 --seq-lens 2048 --global-batch 16 --profile "$WORK/profile_hopper" \
    --model-override attn_impl=pallas_mgpu
else
  # the whole fp32 logits instead of 512-token chunks (bench's --loss-chunk 512 comes first;
  # the later value wins)
  bench scan_2048_whole_logits 70 --seq-lens 2048 --global-batch 16 --loss-chunk none
fi
bench scan_8192 70 --seq-lens 8192 --global-batch 4
# each row against the [gpu-perf] targets (MFU, the anchor's tokens/s): met or MISSED
python3 tools/bench_train.py --judge "$WORK" >>"$REPORT" 2>&1
# where the time goes, per traced row: the busy line, the category table, the top 12 kernels
for summary in "$WORK"/profile_*/*/summary.md; do
  [ -f "$summary" ] || continue
  echo "## $(basename "$(dirname "$(dirname "$summary")")")"
  awk '/^(no device process|device process|Busy)/ {print} /^\| category/ {t = 1}
    /^\| name/ {t = 1; n = 0} t && /^\|/ {if (n++ < 14) print; next} t {t = 0; print ""}' "$summary"
done >>"$REPORT"
# the traces themselves stay behind: the summaries hold what they say
find "$WORK" -name "*.json.gz" -path "*plugins*" -delete
pack_details perf
cat "$REPORT"
