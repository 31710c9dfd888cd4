"""Test setup: 8 host devices for mesh tests, strict rank promotion, GPU-only markers."""

import os
import tempfile

from xla_flags import xla_flags

os.environ.setdefault("XLA_FLAGS", xla_flags(8))
# compiled programs are reused across tests, xdist workers and the trainer subprocesses
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "mpt_jax_test_xla_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import json

import jax
import numpy as np
import pytest

from mpt_jax.data import prepare_dataset

jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "import", "class", "for", "in", "if", "else", "x", "y"]
    with open(root / "docs.jsonl", "w") as f:
        for _ in range(400):
            f.write(json.dumps({"text": " ".join(rng.choice(words, 30))}) + "\n")
    prepare_dataset(
        [str(root / "docs.jsonl")], root / "ds", seq_len=32, val_fraction=0.1, progress=False
    )
    return root
