"""mpt_jax: efficient pretraining of MosaicML's MPT models in JAX."""

from mpt_jax.config import ConfigError, ModelConfig, count_params, load_model_config
from mpt_jax.loading import from_pretrained
from mpt_jax.model import MPTForCausalLM

__all__ = [
    "ConfigError",
    "MPTForCausalLM",
    "ModelConfig",
    "count_params",
    "from_pretrained",
    "load_model_config",
]
