#!/usr/bin/env bash
# [kernels] Nsight Compute's counters for our three kernels and cuDNN's at (8, 2048, 16, 128),
# each fwd+bwd run once (about 2 minutes): duration, SM and memory throughput, registers,
# shared memory, occupancy and issue stalls per kernel, the profile that explains the gap to
# cuDNN without ALiBi; then, with HOPPER=1, our Hopper kernels' tiling sweep (about 2 minutes),
# and the Triton tiling sweep at head dim 128 (about 3 minutes; in all at most BUDGET_S, 590 s unless set).
#   run: bash tools/gpu/kernel_profile.sh   (carry .whl; ncu reads counters on the Firecracker
#   machines this workplace lends, not under gVisor); HOPPER=1 bash ... adds our Hopper
#   kernels to the profile (both backward variants, the two-warpgroup one's kernels named
#   ..._x2), once kernels.sh has shown them correct
# The tables go to $OUT/ncu.md (counters) and $OUT/ptx.md (matrix instructions per kernel in the
# PTX XLA dumps); ncu's report to $OUT/ncu.csv; the sweeps to $OUT/tune_hopper.md and
# tune.md (their stderr to tune.err): 7 files, of the 8 a run returns.
set -u
source tools/gpu/setup.sh || exit 1
ONCE_FLAGS=$([ "${HOPPER:-0}" = 1 ] || echo --no-hopper)
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
# XLA dumps the PTX of what it compiles: which matrix instructions our kernels became, Hopper's
# asynchronous warpgroup MMA (wgmma.mma_async) or the older per-warp mma.sync (table below)
rm -rf /tmp/xla_dump
export XLA_FLAGS="--xla_dump_to=/tmp/xla_dump"
if [ -n "$NCU" ]; then
  "$NCU" --version | tail -1
  # no preallocation: ncu saves and restores the memory each profiled kernel touches between
  # its passes; the clocks stay as the card has them
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout "$(cap 300)" "$NCU" --clock-control none \
    --target-processes all -k "regex:mpt_flash|sdpa|fmha|flash" \
    --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
    --section ComputeWorkloadAnalysis --csv --page details \
    python3 tools/bench_attention.py --once $ONCE_FLAGS >"$OUT/ncu.csv" 2>"$OUT/ncu.err"
  echo "ncu exit status $?"
  grep "^ran once" "$OUT/ncu.csv"
  python3 tools/profile_summary.py --ncu "$OUT/ncu.csv" >"$OUT/ncu.md" || tail -5 "$OUT/ncu.err"
  cat "$OUT/ncu.md"
else
  echo "ncu: not found; no counters"
  timeout "$(cap 120)" python3 tools/bench_attention.py --once $ONCE_FLAGS
fi
python3 - /tmp/xla_dump <<'PY' | tee "$OUT/ptx.md"
import pathlib, re, sys
files = sorted(pathlib.Path(sys.argv[1]).rglob("*.ptx"))
print(f"{len(files)} PTX files in the dump")
print("| PTX entry | wgmma.mma_async | mma.sync | ex2.approx | file |")
print("|---|---|---|---|---|")
for path in files:
    text = path.read_text(errors="replace")
    for entry in re.split(r"(?=\.visible \.entry )", text)[1:]:
        name = re.match(r"\.visible \.entry (\w+)", entry).group(1)
        if not re.search(r"mpt_flash|sdpa|flash", name):
            continue
        counts = [entry.count(op) for op in ("wgmma.mma_async", "mma.sync", "ex2.approx")]
        print(f"| {name[:60]} | " + " | ".join(map(str, counts)) + f" | {path.name[:40]} |")
PY
unset XLA_FLAGS  # the sweeps' many programs need no dump
TRITON_LIMIT=170 TRITON_BUDGET=110
if [ "${HOPPER:-0}" = 1 ]; then
  # our Hopper kernels' tilings (forward key block and ring depth, then the backward's ring
  # depth and warpgroups), before the Triton sweep: they are the likelier winner; the winner's
  # check against XLA and its fwd+bwd beside the default print last
  timeout "$(cap 130)" python3 tools/bench_attention.py --tune-hopper 128 --tune-budget-s 70 --reps 5 \
    --out "$OUT/tune_hopper.md" >/dev/null 2>"$OUT/tune.err"
  # cut off by its limit, the sweep left the candidates it timed in tune.err
  grep -v "^|" "$OUT/tune_hopper.md" || grep "^| 128 " "$OUT/tune.err"
  TRITON_LIMIT=150 TRITON_BUDGET=95
fi
# the Triton tilings at head dim 128 again: the 2026-11-28 sweep (default_tilings' winners) ran
# with the kernels' old launch order (batch and head fastest); the grouped order may favour
# other blocks. 64 (MPT-125M and MPT-350M) comes after
timeout "$(cap $TRITON_LIMIT)" python3 tools/bench_attention.py --tune 128 --tune-budget-s $TRITON_BUDGET \
  --reps 5 --out "$OUT/tune.md" >/dev/null 2>>"$OUT/tune.err"
grep -v "^|" "$OUT/tune.md" || { echo "Triton sweep cut off; what it timed:"; tail -20 "$OUT/tune.err"; }
