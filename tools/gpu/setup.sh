# Sourced on the GPU machine: installs the carried wheels (.whl/) of packages the image lacks
# into /tmp/site and puts it and the repo on PYTHONPATH. Packages the image has are kept.
# Leaves OUT (created), pack_details and ALIBI (bench_train overrides) for the scripts that
# source it.
python3 - "${WHEELS:-.whl}" <<'PY' || return 1
import importlib.metadata as md
import pathlib
import subprocess
import sys

ALWAYS = {"typeguard"}  # tokamax pins 2.13.3; an image's typeguard 4 would break its import
missing = []
for wheel in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    name = wheel.name.split("-")[0]
    try:
        md.version(name)
        if name in ALWAYS:
            missing.append(str(wheel))
    except md.PackageNotFoundError:
        missing.append(str(wheel))
if missing:
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
    subprocess.run([*pip, "--no-compile", "--target", "/tmp/site", *missing], check=True)
print("installed:", " ".join(pathlib.Path(w).name.split("-")[0] for w in missing) or "nothing")
PY
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MPT_JAX_CACHE=/tmp/cache
# the allocator's default 75% of the card leaves MPT-7B's ~113 GB no room on an H200
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.94}
OUT=${OUT:-/tmp/out}  # what the scripts write there comes back with the run
# BUDGET_S: the seconds this call may take (run's limit_s; give less when the session has less
# device time left). `cap N` is N, or what is left of the budget less 20 s for the tables at
# the end (1 when nothing is: that step fails at once and the script goes on to write them)
BUDGET_S=${BUDGET_S:-590}
cap() {
  local left=$((BUDGET_S - SECONDS - 20))
  if [ "$left" -lt "$1" ]; then echo $((left > 1 ? left : 1)); else echo "$1"; fi
}
# bench_train's --row-timeout under a shell limit of $1 seconds: the row stops 15 s before the
# shell's `timeout`, so bench_train still writes its table and CSV line for a row cut off
row_limit() {
  if [ $(($1 - 15)) -ge 15 ]; then echo $(($1 - 15)); else echo "$1"; fi
}
mkdir -p "$OUT"
pack_details() {  # $OUT/NAME/ -> $OUT/NAME_details.tgz: at most 8 files come back from $OUT
  tar czf "$OUT/$1_details.tgz" -C "$OUT" "$1" && rm -rf "${OUT:?}/$1"
}
# bench_train's model overrides for the anchor's MPT: ALiBi instead of learned positions, no biases
ALIBI=(--model-override alibi=true --model-override learned_pos_emb=false
  --model-override no_bias=true)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import jax, flax, optax, grain; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, 'grain', grain.__version__, jax.devices()[0].device_kind)"
