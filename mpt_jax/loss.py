"""llm-foundry's causal-LM loss: next-token targets, ignore index -100, mean over counted tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100


def shift_targets(labels_BS: jax.Array) -> jax.Array:
    """targets[:, t] = labels[:, t + 1], the last column IGNORE_INDEX (llm-foundry's roll by -1)."""
    pad_B1 = jnp.full((labels_BS.shape[0], 1), IGNORE_INDEX, labels_BS.dtype)
    return jnp.concatenate([labels_BS[:, 1:], pad_B1], axis=1)


def cross_entropy_sum(logits_BSV: jax.Array, targets_BS: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of token losses, number of counted tokens) in float32; IGNORE_INDEX targets skipped."""
    logits_BSV = logits_BSV.astype(jnp.float32)
    valid_BS = targets_BS != IGNORE_INDEX
    safe_BS = jnp.where(valid_BS, targets_BS, 0)
    logz_BS = jax.nn.logsumexp(logits_BSV, axis=-1)
    target_logit_BS = jnp.take_along_axis(logits_BSV, safe_BS[..., None], axis=-1)[..., 0]
    losses_BS = jnp.where(valid_BS, logz_BS - target_logit_BS, 0.0)
    return losses_BS.sum(), valid_BS.sum().astype(jnp.float32)


def causal_lm_loss(logits_BSV: jax.Array, labels_BS: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy; labels are the inputs (IGNORE_INDEX where masked)."""
    total, count = cross_entropy_sum(logits_BSV, shift_targets(labels_BS))
    # llm-foundry returns the plain sum when every target is ignored
    return total / jnp.maximum(count, 1.0)
