#!/usr/bin/env bash
# Run here (not on the GPU machine): downloads the cp312 wheels the GPU image lacks into .whl/
# (git-ignored), for `run` to carry. The image has jax, flax, optax, orbax, torch, transformers.
set -euo pipefail
cd "$(dirname "$0")/../.."
pip download --quiet --python-version 3.12 --only-binary=:all: --no-deps -d .whl \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 \
  grain==0.2.18 array-record==0.8.6 portpicker tensorboardx \
  tokamax==0.0.12 einshape jaxtyping wadler_lindig qwix typeguard==2.13.3 immutabledict \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection  # a matched pair
ls .whl
