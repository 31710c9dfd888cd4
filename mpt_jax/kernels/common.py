"""Math and plumbing shared by the GPU (Triton, Mosaic GPU) and TPU flash-attention kernels.

Positions and segment ids enter as a (bq, 1) column for queries and a (1, bk) row for keys, and
the softmax statistics as (bq, 1) columns: the helpers only broadcast, so the same code serves
Triton tiles and TPU vregs (Mosaic has no 1-D layouts).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax


@dataclasses.dataclass(frozen=True)
class Heads:
    """Query and kv head counts, and where the heads live: q, k and v arrays, or one fused
    (B, S, H + 2G, K) array (an MPT Wqkv output) whose k and v heads follow the H query heads."""

    H: int
    G: int
    fused: bool

    @property
    def k_first(self) -> int:
        return self.H if self.fused else 0

    @property
    def v_first(self) -> int:
        return self.H + self.G if self.fused else 0


def check_arrays(
    name: str,
    q_BSHK: jax.Array,
    k_BSGK: jax.Array | None,
    v_BSGK: jax.Array | None,
    alibi_slopes: jax.Array | None,
    segment_ids: jax.Array | None,
    heads: Heads,
) -> None:
    """Refuse, in one line naming the argument, what the kernels would pad, clamp or misread
    (their blocks are padded to whole tiles: a short array would not fail by itself)."""
    B, S, _, K = q_BSHK.shape
    for label, x in (("q", q_BSHK), ("k", k_BSGK), ("v", v_BSGK)):
        if x is None:
            continue
        if x.ndim != 4 or not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name}: {label} must be a 4-D float array, got {x.dtype}{x.shape}")
    if k_BSGK is not None:
        want = (B, S, heads.G, K)
        for label, x in (("k", k_BSGK), ("v", v_BSGK)):
            if x.shape != want:
                raise ValueError(f"{name}: {label} has shape {x.shape}, q needs {want}")
    if alibi_slopes is not None and jnp.shape(alibi_slopes) != (heads.H,):
        raise ValueError(
            f"{name}: alibi_slopes has shape {jnp.shape(alibi_slopes)}, not one per query "
            f"head ({heads.H},)"
        )
    if segment_ids is not None and jnp.shape(segment_ids) != (B, S):
        raise ValueError(
            f"{name}: segment_ids has shape {jnp.shape(segment_ids)}, not (batch, length) {(B, S)}"
        )


MASKED = -1e30  # finite: fully masked (padding) rows stay NaN-free

# contract the last dim of both operands: q @ k.T without materializing k.T
NT_DIMS = (((1,), (1,)), ((), ()))
# contract the first dim of both operands: p.T @ do
TN_DIMS = (((0,), (0,)), ((), ()))


def scores(q, k, q_pos, k_pos, q_seg, k_seg, slope, *, scale, causal, seq_len):
    """Scaled scores (bq, bk) float32 with ALiBi (-slope * |i - j|) and every mask applied."""
    s = lax.dot_general(q, k, NT_DIMS, preferred_element_type=jnp.float32) * scale
    s = s - slope * jnp.abs(q_pos - k_pos).astype(jnp.float32)
    keep = k_pos < seq_len
    if causal:
        keep &= q_pos >= k_pos
    if q_seg is not None:
        keep &= q_seg == k_seg
    return jnp.where(keep, s, MASKED)


def backward_block(q, k, v, do, lse, delta, q_pos, k_pos, q_seg, k_seg, slope, **kw):
    """Probabilities p and score gradients ds (bq, bk) of one block, FlashAttention-2 style."""
    s = scores(q, k, q_pos, k_pos, q_seg, k_seg, slope, **kw)
    p = jnp.exp(s - lse)
    dp = lax.dot_general(do, v, NT_DIMS, preferred_element_type=jnp.float32)
    return p, p * (dp - delta)


def pad_axis(x: jax.Array, length: int, axis: int) -> jax.Array:
    """x zero-padded at the end of `axis` to `length`."""
    extra = length - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def poison(out_shapes, out_specs, n_inputs: int, enabled: bool):
    """NaN buffers aliased to the outputs (extra args, their in_specs, input_output_aliases).

    Tests use this: an element a kernel never writes keeps its NaN, so a finiteness check
    catches grid or index-map mistakes that would otherwise leave whatever the buffer held.
    """
    if not enabled:
        return [], [], {}
    bufs = [jnp.full(s.shape, jnp.nan, s.dtype) for s in out_shapes]
    return bufs, list(out_specs), {n_inputs + i: i for i in range(len(bufs))}
