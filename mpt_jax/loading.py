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

    Run folders restore only the parameters (Orbax), cast to `param_dtype`, or to bf16 for a
    bf16 `dtype` when the run's step computed with every parameter in bf16 (`pure_bf16`, or
    `train.mixed_precision` DEFAULT or PURE), as it trained; HF folders go through
    MPTForCausalLM.from_pretrained (`kwargs`: allow_pickle, config overrides).
    """
    if not is_run_folder(path):
        if (Path(path) / "config.yaml").is_file() and not (Path(path) / "config.json").exists():
            raise ConfigError(
                f"{path}: a run folder without checkpoints/ (checkpoint.enabled false, or stopped "
                "before its first save): no model to load"
            )
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
    # a step folder named directly: its siblings are the earlier steps, --step picks none
    params = checkpoint.load_params(
        step_dir, target, step_option="--step" if step_dir != Path(path) else ""
    )
    if _step_saw_bf16_params(meta["config"]) and jnp.dtype(dtype) == jnp.bfloat16:
        param_dtype = dtype  # evaluated as it trained: a bf16 stream, bf16 norms and embeddings
    params = jax.tree.map(lambda x: x.astype(param_dtype), params)
    return nnx.merge(graphdef, params)


def _run_param_dtype(raw: dict[str, Any]) -> Any:
    precision = raw.get("train", {}).get("precision", "fp32")
    return jnp.bfloat16 if precision == "pure_bf16" else jnp.float32


def _step_saw_bf16_params(raw: dict[str, Any]) -> bool:
    """Whether the run's step computed with every parameter in bf16: stored so (pure_bf16), or
    cast so by train.mixed_precision DEFAULT or PURE under amp_bf16."""
    train = raw.get("train", {})
    precision, mode = train.get("precision", "fp32"), train.get("mixed_precision", "FULL")
    return precision == "pure_bf16" or (precision == "amp_bf16" and mode != "FULL")


def load_tokenizer_for(
    path: str | Path,
    *,
    step: int | None = None,
    tokenizer: str | None = None,
    eos_token: str | None = None,
):
    """The tokenizer that goes with a model folder (ByteTokenizer or JsonTokenizer).

    `tokenizer` ('byte', a tokenizer.json or a transformers tokenizer folder) wins; else an HF
    folder's tokenizer.json (EOS from its tokenizer_config.json when present); else the
    tokenizer of the dataset a run folder trained on, as its meta.json records it (its EOS
    included), when that folder is there, and the run's `data.tokenizer` otherwise (also for
    RUN_DIR/hf, the run's export). `eos_token` names the EOS where none of these says it.
    """
    from mpt_jax.data.errors import DataError
    from mpt_jax.data.tokenizer import load_tokenizer

    if tokenizer is not None:
        return load_tokenizer(tokenizer, eos_token)
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: no such model folder")
    if (path / "tokenizer.json").is_file():
        return load_tokenizer(str(path), eos_token)
    run = path if is_run_folder(path) else path.parent if is_run_folder(path.parent) else None
    if run is None:
        raise DataError(
            f"{path}: no tokenizer.json and not part of a run folder; "
            "name the tokenizer (--tokenizer byte|PATH)"
        )
    step_dir = checkpoint.find_step_dir(run, step if run == path else None)
    data = checkpoint.read_meta(step_dir)["config"].get("data", {})
    trained_on = _dataset_tokenizer(data)
    if trained_on is not None and eos_token is None:
        return trained_on
    name = data.get("tokenizer", "byte")
    if name != "byte" and not Path(name).exists():
        run_dir = step_dir.parent.parent
        if not (run_dir / name).exists():
            raise DataError(
                f"{run_dir / 'config.yaml'}: data.tokenizer {name!r} not found; "
                "name the tokenizer (--tokenizer byte|PATH)"
            )
        name = str(run_dir / name)
    return load_tokenizer(name, eos_token)


def _dataset_tokenizer(data: dict[str, Any]):
    """The tokenizer a prepared dataset recorded (with its EOS), or None where it is not here."""
    from mpt_jax.data.errors import DataError
    from mpt_jax.data.loader import open_dataset
    from mpt_jax.data.tokenizer import tokenizer_from_spec

    sources = [data.get("path")] + [s.get("path") for s in data.get("mixture") or ()]
    for source in filter(None, sources):
        if str(source).startswith("builtin:"):
            continue  # prepared with data.tokenizer itself
        try:
            meta = open_dataset(source)
            return tokenizer_from_spec(meta.tokenizer, meta.folder)
        except (DataError, KeyError, OSError):
            continue  # not on this machine, or not readable: data.tokenizer decides
    return None


def load_model_and_tokenizer(
    path: str | Path,
    *,
    step: int | None = None,
    tokenizer: str | None = None,
    eos_token: str | None = None,
    dtype: Any = jnp.float32,
    **kwargs: Any,
):
    """(model, tokenizer) of an HF MPT folder or a run folder; see load_tokenizer_for."""
    from mpt_jax.data.errors import DataError

    tok = load_tokenizer_for(path, step=step, tokenizer=tokenizer, eos_token=eos_token)
    # a tokenizer that can emit ids the embedding lacks belongs to another model
    model = from_pretrained(path, step=step, dtype=dtype, **kwargs)
    if tok.vocab_size > model.config.vocab_size:
        where = getattr(tok, "path", tokenizer or "byte")
        raise DataError(
            f"{where}: tokenizer has {tok.vocab_size} ids, more than the model's vocab_size "
            f"{model.config.vocab_size}"
        )
    return model, tok
