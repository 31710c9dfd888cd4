"""The model under evaluation and its tokenizer, plus what the results record about them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp

from mpt_jax import checkpoint
from mpt_jax.evaluation.errors import EvalError
from mpt_jax.loading import is_run_folder, load_model_and_tokenizer
from mpt_jax.model import MPTForCausalLM

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def load_for_eval(
    path: str | Path,
    *,
    step: int | None = None,
    tokenizer: str | None = None,
    dtype: str = "float32",
) -> tuple[MPTForCausalLM, Any, dict[str, Any]]:
    """(model, tokenizer, description) of a run folder (latest or `step`) or an HF MPT folder.

    The tokenizer is `tokenizer` ('byte' or a path), else the HF folder's tokenizer.json, else
    the run's `data.tokenizer` (mpt_jax.loading.load_model_and_tokenizer).
    """
    if dtype not in DTYPES:
        raise EvalError(f"--dtype: must be one of {', '.join(DTYPES)}, got {dtype!r}")
    path = Path(path)
    if not path.exists():
        raise EvalError(f"{path}: no such model folder")
    model, tok = load_model_and_tokenizer(path, step=step, tokenizer=tokenizer, dtype=DTYPES[dtype])
    info: dict[str, Any] = {"path": str(path), "tokenizer": tok.spec(), "dtype": dtype}
    if is_run_folder(path):
        info["step"] = int(checkpoint.find_step_dir(path, step).name)
    return model, tok, info
