"""Data: tokenize-and-pack to ArrayRecord (prepare) and deterministic grain loading (loader)."""

from mpt_jax.data.catalog import resolve_dataset
from mpt_jax.data.errors import DataError
from mpt_jax.data.loader import (
    BatchLoader,
    DatasetMeta,
    check_compatible,
    check_same_eos,
    check_tokenizer,
    open_dataset,
    sequence_ids,
)
from mpt_jax.data.prepare import prepare_dataset
from mpt_jax.data.tokenizer import ByteTokenizer, load_tokenizer, tokenizer_from_spec
from mpt_jax.data.verify import verify_dataset

__all__ = [
    "BatchLoader",
    "ByteTokenizer",
    "DataError",
    "DatasetMeta",
    "check_compatible",
    "check_same_eos",
    "check_tokenizer",
    "load_tokenizer",
    "open_dataset",
    "prepare_dataset",
    "resolve_dataset",
    "sequence_ids",
    "tokenizer_from_spec",
    "verify_dataset",
]
