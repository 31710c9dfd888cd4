#!/usr/bin/env bash
# [kernels] Nsight Compute's counters for our three kernels and cuDNN's at (8, 2048, 16, 128),
# each fwd+bwd run once (about 2 minutes): duration, SM and memory throughput, registers,
# shared memory, occupancy and issue stalls per kernel, the profile that explains the gap to
# cuDNN without ALiBi.
#   run: bash tools/gpu/kernel_profile.sh   (carry .whl; ncu reads counters on the Firecracker
#   machines this workplace lends, not under gVisor)
# The table prints last and goes to $OUT/ncu.md; ncu's report to $OUT/ncu.csv.
set -u
source tools/gpu/setup.sh || exit 1
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
[ -n "$NCU" ] || { echo "ncu: not found"; exit 1; }
"$NCU" --version | tail -1
# no preallocation: ncu saves and restores the memory each profiled kernel touches between its
# passes; the clocks stay as the card has them
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 300 "$NCU" --clock-control none \
  --target-processes all -k "regex:mpt_flash|sdpa|fmha|flash" \
  --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
  --section ComputeWorkloadAnalysis --csv --page details \
  python3 tools/bench_attention.py --once >"$OUT/ncu.csv" 2>"$OUT/ncu.err"
echo "ncu exit status $?"
grep "^ran once" "$OUT/ncu.csv"
python3 tools/profile_summary.py --ncu "$OUT/ncu.csv" | tee "$OUT/ncu.md" || tail -5 "$OUT/ncu.err"
