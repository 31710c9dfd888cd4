#!/usr/bin/env bash
# [kernels] on one GPU (about 6 minutes, at most BUDGET_S, 590 s): the GPU tests, then our Hopper kernels'
# GPU tests in a pytest run of their own (a deadlocked kernel would otherwise take the other
# tests' summary with it), then the benchmark table (ours, on Hopper our Mosaic GPU kernels if
# their tests passed, both backward variants, cuDNN with and without the bias, tokamax, XLA)
# and memory against sequence length. The Triton tiling sweep runs in kernel_profile.sh.
#   run: bash tools/gpu/kernels.sh   (carry .whl; fill it with tools/gpu/fetch_wheels.sh)
# Details go to $OUT; the table prints last.
set -u
source tools/gpu/setup.sh || exit 1
python3 -c "import tokamax; print('tokamax', tokamax.__version__)" || echo "tokamax: not importable"
# 200 s: tokamax's four cases now compile and run its kernels (on 2026-11-28 they failed at once)
timeout "$(cap 200)" python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "not hopper" 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -15
timeout "$(cap 130)" python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k hopper 2>&1 \
  | tee "$OUT/hopper_tests.log" | tail -8
# our Hopper kernels join the benchmark only once their GPU tests finished and passed: a
# deadlocked kernel would otherwise hang the benchmark and lose its whole table
HOPPER=--no-hopper
if grep -qE "^[0-9]+ passed|^=+ [0-9]+ passed" "$OUT/hopper_tests.log" \
  && ! grep -qE "^(FAILED|ERROR)|[0-9]+ (failed|error)" "$OUT/hopper_tests.log"; then
  HOPPER=
fi
echo "bench: our Hopper kernels ${HOPPER:-included}"
timeout "$(cap 240)" python3 tools/bench_attention.py --reps 10 $HOPPER --out "$OUT/bench.md" \
  2>"$OUT/bench.err" | tail -70
# the table is written when the benchmark ends; cut off by its limit, it left its rows in
# bench.err as it timed them
[ -s "$OUT/bench.md" ] || { echo "bench: cut off; the rows it timed:"; grep "^| " "$OUT/bench.err"; }
