"""Rounding to a narrower dtype where a torch op would, in a form XLA keeps.

A bf16 op in torch computes in float32 and rounds its output. In JAX the same op written as a
cast to bf16 and back is a pair XLA may drop ("excess precision") when it fuses the op with a
float32 consumer, on CPU and GPU alike; `reduce_precision` it keeps.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def rounded(v: jax.Array, dtype: Any) -> jax.Array:
    """v rounded to dtype's precision, in v's own dtype (v itself for 32-bit dtypes).

    v is float32 but for parameters already stored in dtype (pure_bf16), which pass unchanged."""
    info = jnp.finfo(dtype)
    if info.bits >= 32:
        return v
    return jax.lax.reduce_precision(v, exponent_bits=info.nexp, mantissa_bits=info.nmant)


def in_dtype(v: jax.Array, dtype: Any) -> jax.Array:
    """v (float32) as one torch op's output in dtype: rounded, then cast (exactly)."""
    return rounded(v, dtype).astype(dtype)


def scaled(v: jax.Array, factor: float) -> jax.Array:
    """v * factor in v's dtype, rounded there (llm-foundry's `logits *= logit_scale`)."""
    return in_dtype(v.astype(jnp.float32) * factor, v.dtype)
