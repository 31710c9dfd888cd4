#!/usr/bin/env bash
# [gpu-perf] correctness guard on one GPU (about 6 minutes): MPT-125M with ALiBi, 50 steps, the
# reference settings (XLA attention, whole logits, the recipe's PURE mixed precision) against
# fp32, the fast path (Pallas kernel, loss_chunk 512) and fp32 parameters outside the matmuls
# (FULL), from the same initialization and batches; the report's loss_diff columns last.
#   run: bash tools/gpu/guard.sh   (kind nvidia-h200: compiled for an H200 on a CPU host, the
#   reference member needs about 107 GiB and the fp32 one 122; carry .whl; fill it with
#   tools/gpu/fetch_wheels.sh)
set -u
source tools/gpu/setup.sh || exit 1
MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
if [ "${MIB:-0}" -lt 130000 ]; then
  echo "guard.sh: ${MIB:-no} MiB of GPU memory; the guard's members need an H200 (141 GB)"
  exit 1
fi
# SIGTERM stops the sweep cleanly (members save and stop); -k kills it 30 s later if not
timeout -k 30 "$(cap 470)" python3 tools/sweep.py experiments/sweeps/gpu-perf-guard.yaml \
  --no-plots --out-dir "$OUT/guard" >"$OUT/guard.log" 2>&1
# members run in sessions of their own: one still compiling would hold 100+ GiB of the GPU
nvidia-smi --query-compute-apps=pid --format=csv,noheader | xargs -r kill 2>/dev/null
# a sweep cut off writes no table: collect what the members logged
[ -f "$OUT/guard/results.md" ] || timeout "$(cap 60)" python3 tools/sweep.py \
  experiments/sweeps/gpu-perf-guard.yaml --report-only --no-plots --out-dir "$OUT/guard" \
  >>"$OUT/guard.log" 2>&1
cp "$OUT/guard/results.md" "$OUT/guard.md" 2>/dev/null
pack_details guard
tail -8 "$OUT/guard.log"
cat "$OUT/guard.md" 2>/dev/null
