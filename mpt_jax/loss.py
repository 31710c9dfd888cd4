"""llm-foundry's causal-LM loss: next-token targets, ignore index -100, mean over counted tokens."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mpt_jax.rounding import scaled

IGNORE_INDEX = -100


def shift_targets(labels_BS: jax.Array) -> jax.Array:
    """targets[:, t] = labels[:, t + 1], the last column IGNORE_INDEX (llm-foundry's roll by -1)."""
    pad_B1 = jnp.full((labels_BS.shape[0], 1), IGNORE_INDEX, labels_BS.dtype)
    return jnp.concatenate([labels_BS[:, 1:], pad_B1], axis=1)


def counted(targets_BS: jax.Array) -> jax.Array:
    """Which targets count toward the loss (bool, like targets): all but IGNORE_INDEX."""
    return targets_BS != IGNORE_INDEX


def cross_entropy_sum(logits_BSV: jax.Array, targets_BS: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of token losses, number of counted tokens) in float32; IGNORE_INDEX targets skipped."""
    losses_BS, _, valid_BS, _ = _token_losses(logits_BSV.astype(jnp.float32), targets_BS)
    return losses_BS.sum(), valid_BS.sum().astype(jnp.float32)


def _token_losses(logits32_BSV, targets_BS):
    """(losses, log partition, valid mask, targets with ignored ones at 0) from float32 logits."""
    valid_BS = counted(targets_BS)
    safe_BS = jnp.where(valid_BS, targets_BS, 0)
    logz_BS = jax.nn.logsumexp(logits32_BSV, axis=-1)
    target_logit_BS = jnp.take_along_axis(logits32_BSV, safe_BS[..., None], axis=-1)[..., 0]
    return jnp.where(valid_BS, logz_BS - target_logit_BS, 0.0), logz_BS, valid_BS, safe_BS


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

    The sequence is cut into chunks of `chunk` positions and only one (B, chunk, V) block of
    logits is alive at a time. Under differentiation each chunk's gradients with respect to h
    and w are made in the forward pass, from the logits already there (the loss is a sum, so
    its cotangent only scales them): three head matmuls per chunk, as for the whole logits,
    where recomputing the logits in the backward pass would take four. Batch sharding is kept:
    chunks run along S.
    """
    B, S, D = h_BSD.shape
    n = -(-S // chunk)
    pad = n * chunk - S
    if pad:  # padded positions are ignored targets
        h_BSD = jnp.pad(h_BSD, ((0, 0), (0, pad), (0, 0)))
        targets_BS = jnp.pad(targets_BS, ((0, 0), (0, pad)), constant_values=IGNORE_INDEX)
    h_NBCD = h_BSD.reshape(B, n, chunk, D).swapaxes(0, 1)
    targets_NBC = targets_BS.reshape(B, n, chunk).swapaxes(0, 1)
    return _linear_cross_entropy(h_NBCD, w_DV, targets_NBC, logit_scale)


def _chunk_logits(h_BCD, w_DV, logit_scale):
    logits_BCV = jnp.einsum("bcd,dv->bcv", h_BCD, w_DV)
    return logits_BCV if logit_scale is None else scaled(logits_BCV, logit_scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _linear_cross_entropy(h_NBCD, w_DV, targets_NBC, logit_scale):
    """(loss sum, count) over chunks (N, B, C, D) of hidden states; see the caller."""

    def body(carry, xs):
        h_BCD, targets_BC = xs
        loss_sum, count = cross_entropy_sum(_chunk_logits(h_BCD, w_DV, logit_scale), targets_BC)
        return (carry[0] + loss_sum, carry[1] + count), None

    zero = jnp.zeros((), jnp.float32)
    (loss_sum, count), _ = jax.lax.scan(body, (zero, zero), (h_NBCD, targets_NBC))
    return loss_sum, count


def _linear_cross_entropy_fwd(h_NBCD, w_DV, targets_NBC, logit_scale):
    """The sums, each chunk's d(loss sum)/dh and d(loss sum)/dw summed over chunks in float32."""

    def body(carry, xs):
        loss_acc, count_acc, dw_DV = carry
        h_BCD, targets_BC = xs
        logits_BCV = _chunk_logits(h_BCD, w_DV, logit_scale)
        logits32_BCV = logits_BCV.astype(jnp.float32)
        losses_BC, logz_BC, valid_BC, safe_BC = _token_losses(logits32_BCV, targets_BC)
        # d(token loss)/d(logits) = softmax - one_hot(target), zero where the target is ignored;
        # then back through the cast and the scale in the logits' dtype, as autodiff would
        one_hot_BCV = safe_BC[..., None] == jnp.arange(logits_BCV.shape[-1])[None, None]
        dlogits32_BCV = jnp.exp(logits32_BCV - logz_BC[..., None]) - one_hot_BCV
        dlogits_BCV = jnp.where(valid_BC[..., None], dlogits32_BCV, 0.0).astype(logits_BCV.dtype)
        if logit_scale is not None:  # the float32 scale and one rounding, as the forward
            dlogits_BCV = scaled(dlogits_BCV, logit_scale)
        f32 = jnp.float32
        dh_BCD = jnp.einsum("bcv,dv->bcd", dlogits_BCV, w_DV, preferred_element_type=f32)
        dw_DV = dw_DV + jnp.einsum("bcd,bcv->dv", h_BCD, dlogits_BCV, preferred_element_type=f32)
        count = valid_BC.sum().astype(f32)
        return (loss_acc + losses_BC.sum(), count_acc + count, dw_DV), dh_BCD

    zero = jnp.zeros((), jnp.float32)
    dw0_DV = jnp.zeros(w_DV.shape, jnp.float32)
    (loss_sum, count, dw_DV), dh_NBCD = jax.lax.scan(
        body, (zero, zero, dw0_DV), (h_NBCD, targets_NBC)
    )
    # dh in h's dtype, as the head's backward matmul would leave it; w and the targets are
    # kept only for their dtype and shape (both are alive anyway)
    residuals = (dh_NBCD.astype(h_NBCD.dtype), dw_DV, w_DV, targets_NBC)
    return (loss_sum, count), residuals


def _linear_cross_entropy_bwd(logit_scale, residuals, cotangents):
    del logit_scale  # already in the saved gradients
    dh_NBCD, dw_DV, w_DV, targets_NBC = residuals
    g_loss = cotangents[0]  # the count does not depend on h or w
    dh_NBCD = (g_loss * dh_NBCD.astype(jnp.float32)).astype(dh_NBCD.dtype)
    targets_ct = np.zeros(targets_NBC.shape, dtype=jax.dtypes.float0)
    return dh_NBCD, (g_loss * dw_DV).astype(w_DV.dtype), targets_ct


_linear_cross_entropy.defvjp(_linear_cross_entropy_fwd, _linear_cross_entropy_bwd)
