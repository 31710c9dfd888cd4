"""One entry point for weights: an HF MPT folder, a run folder or a checkpoint step folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mpt_jax import checkpoint
from mpt_jax.config import ConfigError, ModelConfig
from mpt_jax.model import MPTForCausalLM


def is_run_folder(path: str | Path) -> bool:
    """A training run folder (RUN_DIR with checkpoints/) or one of its step folders."""
    path = Path(path)
    return (path / "checkpoints").is_dir() or (
        path.name.isdigit() and (path / "params").is_dir() and (path / "meta").is_dir()
    )


def from_pretrained(
    path: str | Path,
    *,
    step: int | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    **kwargs: Any,
) -> MPTForCausalLM:
    """Load a model from an HF MPT folder, or a run folder's latest (or `step`) checkpoint.

    Run folders restore only the parameters (Orbax), cast to `param_dtype`; HF folders go
    through MPTForCausalLM.from_pretrained (`kwargs`: allow_pickle, config overrides).
    """
    if not is_run_folder(path):
        if step is not None:
            raise ConfigError(f"{path}: step= applies to run folders only")
        return MPTForCausalLM.from_pretrained(path, dtype=dtype, param_dtype=param_dtype, **kwargs)
    if kwargs:
        raise ConfigError(f"{path}: {', '.join(kwargs)} apply to HF folders only")
    step_dir = checkpoint.find_step_dir(path, step)
    meta = checkpoint.read_meta(step_dir)
    config = ModelConfig.from_dict(meta["config"]["model"], where=f"{step_dir} config.model")
    run_param_dtype = _run_param_dtype(meta["config"])
    abstract = nnx.eval_shape(
        lambda: MPTForCausalLM(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=run_param_dtype)
    )
    graphdef, abstract_params = nnx.split(abstract)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract_params
    )
    params = checkpoint.load_params(step_dir, target)
    params = jax.tree.map(lambda x: x.astype(param_dtype), params)
    return nnx.merge(graphdef, params)


def _run_param_dtype(raw: dict[str, Any]) -> Any:
    precision = raw.get("train", {}).get("precision", "fp32")
    return jnp.bfloat16 if precision == "pure_bf16" else jnp.float32
