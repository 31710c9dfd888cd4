#!/usr/bin/env bash
# [kernels] on one GPU (about 6.5 minutes, at most 9.2): the GPU tests (our Hopper kernels
# against XLA among them), the Triton tiling sweep at head dim 128, then the benchmark table
# (ours, on Hopper our Mosaic GPU kernels, cuDNN with and without the bias, tokamax, XLA) and
# memory against sequence length.
#   run: bash tools/gpu/kernels.sh   (carry .whl; fill it with tools/gpu/fetch_wheels.sh)
# Details go to $OUT; the table prints last.
set -u
source tools/gpu/setup.sh || exit 1
python3 -c "import tokamax; print('tokamax', tokamax.__version__)" || echo "tokamax: not importable"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -15
# our Hopper kernels join the benchmark only once their GPU tests finished and passed: a
# deadlocked kernel would otherwise hang the benchmark and lose its whole table
HOPPER=--no-hopper
if grep -qE "^[0-9]+ (passed|failed)|^=+ .*(passed|failed)" "$OUT/gpu_tests.log" \
  && ! grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | grep -q test_hopper; then
  HOPPER=
fi
echo "bench: our Hopper kernels ${HOPPER:-included}"
# head dim 128 was swept on 2026-11-28 (its winners are default_tilings) with the kernels' old
# launch order (batch and head fastest); the grouped order may favour other blocks. 64 (MPT-125M
# and MPT-350M) comes after
timeout 130 python3 tools/bench_attention.py --tune 128 --tune-budget-s 85 --reps 5 \
  --out "$OUT/tune.md" >/dev/null 2>"$OUT/tune.err"
grep -v "^|" "$OUT/tune.md"
timeout 220 python3 tools/bench_attention.py --reps 10 $HOPPER --out "$OUT/bench.md" \
  2>"$OUT/bench.err" \
  | tail -40
