#!/usr/bin/env bash
# [gpu-perf] the MPT size table on one GPU (about 6 minutes on an H200, at most BUDGET_S, 590 s): 125m, 350m,
# 760m, 1b and 3b at seq 2048, then 7b with full remat (the largest MPT expected to train on one
# H200: about 107 GB of fp32 weights, gradients and Adam moments). ALiBi on (no learned positions,
# no biases, as anchor_bench's MPT-1B), amp_bf16 with mixed precision PURE (as llm-foundry's
# throughput tables and recipes), loss_chunk 512. A row that does not fit the card (3b and 7b on
# an H100) is reported as such by bench_train, not run.
#   run: bash tools/gpu/sizes.sh   (kind nvidia-h200; carry .whl; fill it with fetch_wheels.sh)
# One merged table prints last and goes to $OUT/sizes.md; logs and CSVs to $OUT/sizes_details.tgz.
set -u
source tools/gpu/setup.sh || exit 1
mkdir -p "$OUT/sizes"
merge() {  # the table so far: written after every row, so a cut-off run keeps what it timed
  python3 - "$OUT/sizes" >"$OUT/sizes.md" <<'PY'
import csv
import pathlib
import sys

columns = ("Model", "GlobalBatchSize", "Activation Checkpointing", "MP Mode", "NumParams",
           "Throughput (T/s)", "MFU", "TFLOP/s/device", "Step time (s)",
           "Peak memory (GiB/device)", "Status")
print("| " + " | ".join(columns) + " |")
print("|" + "---|" * len(columns))
for path in sorted(pathlib.Path(sys.argv[1]).glob("*/bench_train.csv"),
                   key=lambda p: p.parent.stat().st_mtime):
    for row in csv.DictReader(path.open()):
        print("| " + " | ".join(row.get(c, "") for c in columns) + " |")
PY
}
row() {  # model, global batch, remat, seconds
  local limit
  limit=$(cap "$4")
  timeout "$limit" python3 tools/bench_train.py --models "$1" --seq-lens 2048 --global-batch "$2" \
    --remat "$3" --loss-chunk 512 --precision amp_bf16 --mixed-precision PURE --warmup 2 --steps 5 \
    "${ALIBI[@]}" --row-timeout "$(row_limit "$limit")" \
    --out "$OUT/sizes/$1" >"$OUT/sizes/$1.log" 2>&1 || echo "$1: exit $? (see $OUT/sizes/$1.log)"
  merge
}
row mpt-125m 32 none 80
row mpt-350m 32 none 110
row mpt-760m 16 none 130
row mpt-1b 16 none 70
row mpt-3b 8 none 70
row mpt-7b 8 full 120
pack_details sizes
cat "$OUT/sizes.md"
