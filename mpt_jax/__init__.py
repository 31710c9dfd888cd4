"""mpt_jax: efficient pretraining of MosaicML's MPT models in JAX."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from mpt_jax.config import ConfigError, ModelConfig, count_params, load_model_config

if TYPE_CHECKING:
    from mpt_jax.loading import from_pretrained
    from mpt_jax.model import MPTForCausalLM

# imported on first use, so that config-only tools (sweeps, the supervisor) do not load jax
_LAZY = {"from_pretrained": "mpt_jax.loading", "MPTForCausalLM": "mpt_jax.model"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mpt_jax' has no attribute {name!r}")


__all__ = [
    "ConfigError",
    "MPTForCausalLM",
    "ModelConfig",
    "count_params",
    "from_pretrained",
    "load_model_config",
]
