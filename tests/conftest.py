"""Test setup: 8 host devices for mesh tests, strict rank promotion, GPU-only and slow markers."""

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


def pytest_addoption(parser):
    parser.addoption(
        "--run-slow",
        action="store_true",
        default=os.environ.get("MPT_JAX_RUN_SLOW") == "1",
        help="also run the tests marked slow (on by default where a GPU is present)",
    )


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() == "gpu":
        return
    needs_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    slow = pytest.mark.skip(reason="slow GPU compile or benchmark check: pytest --run-slow")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(needs_gpu)
        elif "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(slow)


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
