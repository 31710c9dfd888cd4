"""Dataset names to folders: `builtin:NAME` corpora are prepared on first use and cached."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from mpt_jax.data.errors import DataError
from mpt_jax.data.loader import DatasetMeta, open_dataset
from mpt_jax.data.prepare import META_FILE, VAL_DRAW_VERSION, prepare_dataset
from mpt_jax.data.sources import BUILTIN_PREFIX
from mpt_jax.data.tokenizer import load_tokenizer

BUILTIN_VAL_FRACTION = 0.02


def cache_root() -> Path:
    """$MPT_JAX_CACHE, else ~/.cache/mpt_jax."""
    return Path(os.environ.get("MPT_JAX_CACHE", Path.home() / ".cache" / "mpt_jax"))


def resolve_dataset(
    spec: str,
    *,
    seq_len: int,
    tokenizer: str = "byte",
    progress: bool = True,
    eos_token: str | None = None,
) -> DatasetMeta:
    """Open a prepared folder, or prepare and cache a built-in corpus for this seq_len/tokenizer.

    A tokenizer file or folder names its cached corpus by what decides the tokens: the
    tokenizer.json's content and the end-of-text token (`eos_token`, else the one a folder
    declares or the first known one it has), not by its path: a folder and its tokenizer.json
    share one corpus.
    """
    if not spec.startswith(BUILTIN_PREFIX):
        return open_dataset(spec)
    if tokenizer != "byte" and not Path(tokenizer).exists():
        raise DataError(f"data.tokenizer: {tokenizer!r} is neither 'byte' nor an existing path")
    name = spec[len(BUILTIN_PREFIX) :]
    if tokenizer == "byte":
        tok_tag = "byte"
    else:
        tok = load_tokenizer(tokenizer, eos_token)
        eos_token = tok.eos_token
        eos_tag = hashlib.sha256(eos_token.encode()).hexdigest()[:6]
        tok_tag = f"tokenizer-{tok.sha256[:12]}-eos{eos_tag}"
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    # the draw's version keeps a cache prepared under another val draw from being reused
    folder = (
        cache_root() / "datasets" / f"{name}-{py}-{tok_tag}-seq{seq_len}-draw{VAL_DRAW_VERSION}"
    )
    if not (folder / META_FILE).is_file():
        print(f"preparing {spec} into {folder} (once)", file=sys.stderr)
        try:
            prepare_dataset(
                [spec],
                folder,
                seq_len=seq_len,
                tokenizer=tokenizer,
                eos_token=eos_token,
                val_fraction=BUILTIN_VAL_FRACTION,
                progress=progress,
            )
        except (DataError, OSError):
            # another process may have won the race (its rename can beat ours: ENOTEMPTY)
            if not (folder / META_FILE).is_file():
                raise
    return open_dataset(folder)
