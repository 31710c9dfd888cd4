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


def chunked_cross_entropy_sum(
    h_BSD: jax.Array,
    w_DV: jax.Array,
    targets_BS: jax.Array,
    *,
    chunk: int,
    logit_scale: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """cross_entropy_sum(h @ w * logit_scale, targets) without the (B, S, V) logits.

    The sequence is cut into chunks of `chunk` positions; each chunk's logits are made, reduced
    to its loss sum and, in the backward pass, made again (jax.checkpoint), so at most one
    (B, chunk, V) block of logits is alive. Batch sharding is kept: chunks run along S.
    """
    B, S, D = h_BSD.shape
    n = -(-S // chunk)
    pad = n * chunk - S
    if pad:  # padded positions are ignored targets
        h_BSD = jnp.pad(h_BSD, ((0, 0), (0, pad), (0, 0)))
        targets_BS = jnp.pad(targets_BS, ((0, 0), (0, pad)), constant_values=IGNORE_INDEX)
    h_NBCD = h_BSD.reshape(B, n, chunk, D).swapaxes(0, 1)
    targets_NBC = targets_BS.reshape(B, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one_chunk(h_BCD, targets_BC):
        logits_BCV = jnp.einsum("bcd,dv->bcv", h_BCD, w_DV)
        if logit_scale is not None:
            logits_BCV = logits_BCV * logit_scale
        return cross_entropy_sum(logits_BCV, targets_BC)

    def body(carry, xs):
        loss_sum, count = one_chunk(*xs)
        return (carry[0] + loss_sum, carry[1] + count), None

    zero = jnp.zeros((), jnp.float32)
    (loss_sum, count), _ = jax.lax.scan(body, (zero, zero), (h_NBCD, targets_NBC))
    return loss_sum, count
