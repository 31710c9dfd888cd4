#!/usr/bin/env bash
# [gpu-perf] on one GPU (about 6 minutes, at most BUDGET_S, 590 s): the plain-JAX MPT-1B anchor and ours in
# the same run (both with ALiBi, batch 16, seq 2048), each row with 3 steps traced after the
# timed ones (where the time goes):
#   ROWS=main (the default): scanned layers with XLA norms (the preset, train.mixed_precision
#     FULL), then, with mixed_precision PURE (every parameter in bf16 in the step, as the
#     recipes, llm-foundry's FSDP runs and the anchor itself: a bf16 residual stream), unrolled
#     layers (no per-layer copies of the saved activations into and out of the scan's stacked
#     buffers) with norm_impl=pallas_gpu (our fused add + norm kernels, the fastest predicted),
#     the same at seq 8192, then unrolled layers with XLA norms (untraced). With HOPPER=1 (once
#     kernels.sh passed the Hopper kernels' GPU tests) that last row runs with
#     attn_impl=pallas_mgpu and the Pallas norms instead (traced).
#   ROWS=levers: the smaller levers against the preset: every matmul in cuBLAS (no XLA Triton
#     GEMMs), the whole logits, seq 8192 scanned, and mixed_precision PURE (about 5 minutes).
# The correctness guard is tools/gpu/guard.sh, a run of its own.
#   run: bash tools/gpu/perf.sh   (kind nvidia-h200: the targets are H200 figures and batch 16
#   without remat does not fit an H100; carry .whl and shared; fill .whl with fetch_wheels.sh,
#   copy ../shared/tools/anchor_bench.py to shared/tools/)
# The tables print last and go to $OUT/perf.md; logs, CSVs and profile summaries to
# $OUT/perf_details.tgz (what comes back from $OUT is limited to 8 files).
set -u
source tools/gpu/setup.sh || exit 1
ANCHOR=${ANCHOR:-../shared/tools/anchor_bench.py}
[ -f "$ANCHOR" ] || ANCHOR=shared/tools/anchor_bench.py
# without the anchor there is no 1.3x verdict: stop before spending device time on the rows
[ -f "$ANCHOR" ] || { echo "perf.sh: no anchor_bench.py: copy ../shared/tools/anchor_bench.py to shared/tools/ and carry shared"; exit 1; }
WORK=$OUT/perf
mkdir -p "$WORK"
REPORT=$OUT/perf.md
B=16 ANCHOR_OUT="$WORK" timeout "$(cap 100)" python3 "$ANCHOR" jax_plain_mpt1b >"$WORK/anchor.log" 2>&1
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
  local name=$1 limit  # ROW_XLA_FLAGS, if set, is the row's XLA_FLAGS
  limit=$(cap "$2")
  shift 2
  # row_limit: a row cut off (while tracing, say) still leaves its table
  XLA_FLAGS="${ROW_XLA_FLAGS:-${XLA_FLAGS:-}}" timeout "$limit" python3 tools/bench_train.py \
    --models mpt-1b --precision amp_bf16 --warmup 3 --steps 10 --remat none --loss-chunk 512 \
    --row-timeout "$(row_limit "$limit")" \
    "${ALIBI[@]}" --out "$WORK/$name" "$@" >"$WORK/$name.log" 2>&1
  local table=$WORK/$name/bench_train.md
  if [ -f "$table" ]; then
    grep -q "^row: " "$REPORT" || echo "row: $(grep -m1 "^| Model" "$table")" >>"$REPORT"
    echo "$name: $(grep "^| mpt" "$table")" >>"$REPORT"
  else
    echo "$name: no result: $(tail -1 "$WORK/$name.log")" >>"$REPORT"
  fi
}
NORMS=(--model-override norm_impl=pallas_gpu)
PURE=(--mixed-precision PURE)
UNROLLED=(--model-override scan_layers=false)
case "${ROWS:-main}" in
main)
  # in the order of the targets: the preset, the fastest predicted at seq 2048 (60% MFU), the
  # same at seq 8192 (50%), then the comparison row; worst cases add up to 600 s with the
  # anchor, each capped by what is left of BUDGET_S, so a cut falls on the comparison row
  bench scan_2048 90 --seq-lens 2048 --global-batch 16 --profile "$WORK/profile_scan"
  bench unrolled_2048_norms 150 --seq-lens 2048 --global-batch 16 "${UNROLLED[@]}" \
    "${NORMS[@]}" "${PURE[@]}" --profile "$WORK/profile_unrolled_norms"
  # 24 unrolled layers compile slowly (mpt-760m ran out of a 70 s row on 2026-11-28)
  bench unrolled_8192_norms 130 --seq-lens 8192 --global-batch 4 "${UNROLLED[@]}" "${NORMS[@]}" \
    "${PURE[@]}"
  if [ "${HOPPER:-0}" = 1 ]; then
    # our Mosaic GPU (wgmma) kernels in the model, once kernels.sh has passed their GPU tests
    bench unrolled_2048_norms_hopper 130 --seq-lens 2048 --global-batch 16 "${UNROLLED[@]}" \
      "${NORMS[@]}" "${PURE[@]}" --model-override attn_impl=pallas_mgpu \
      --profile "$WORK/profile_hopper"
  else
    bench unrolled_2048 130 --seq-lens 2048 --global-batch 16 "${UNROLLED[@]}" "${PURE[@]}"
  fi
  ;;
levers)
  # XLA's own Triton GEMMs (gemm_fusion_dot_*: 38 ms of the 2026-11-28 step) against cuBLAS for
  # every matmul
  ROW_XLA_FLAGS=--xla_gpu_enable_triton_gemm=false bench scan_2048_cublas 80 --seq-lens 2048 \
    --global-batch 16 --profile "$WORK/profile_scan_cublas"
  # the whole fp32 logits instead of 512-token chunks (bench's --loss-chunk 512 comes first;
  # the later value wins)
  bench scan_2048_whole_logits 70 --seq-lens 2048 --global-batch 16 --loss-chunk none
  bench scan_8192 70 --seq-lens 8192 --global-batch 4
  # the preset with every parameter in bf16 in the step (the recipes' mixed_precision)
  bench scan_2048_pure 70 --seq-lens 2048 --global-batch 16 "${PURE[@]}"
  ;;
*)
  echo "ROWS=${ROWS}: not main or levers" >>"$REPORT"
  ;;
esac
# each row against the [gpu-perf] targets (MFU, the anchor's tokens/s): met or MISSED
python3 tools/bench_train.py --judge "$WORK" >>"$REPORT" 2>&1
# where the time goes, per traced row: the busy line, the category table, the top 12 kernels
for summary in "$WORK"/profile_*/*/summary.md; do
  [ -f "$summary" ] || continue
  echo "## $(basename "$(dirname "$(dirname "$summary")")")"
  awk '/^(no device process|device process|Busy)/ {print} /^\| category/ {t = 1}
    /^\| name/ {t = 1; n = 0} t && /^\|/ {if (n++ < 14) print; next} t {t = 0; print ""}' "$summary"
done >>"$REPORT"
# the traces themselves (trace.json.gz, the xplane.pb of each host: tens of MB for MPT-1B) stay
# behind: the summaries hold what they say, and the archive must stay under the 16 MiB a file
find "$WORK" -path "*plugins*" -type f -delete
pack_details perf
cat "$REPORT"
