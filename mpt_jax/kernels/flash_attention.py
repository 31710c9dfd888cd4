"""FlashAttention-2 style Pallas kernels with ALiBi computed in-kernel, forward and backward.

Shapes: B batch, S sequence (queries and keys), H query heads, G kv heads (H % G == 0),
K head dim. Inputs q (B, S, H, K), k and v (B, S, G, K); ALiBi slopes (H,) float32 add
-slope_h * |i - j| to the scores from iotas (no bias tensor, no bias gradient); segment ids
(B, S) restrict attention to equal ids; causal blocks above the diagonal are skipped.
A sequence length that is not a multiple of the block sizes is padded and the tail masked; a
head dim that is not a power of two (80, 96, 112) is zero-padded.
Scores, softmax statistics and accumulators are float32 whatever the input dtype.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from mpt_jax.kernels.common import MASKED, backward_block, pad_axis, poison, scores


def _n_key_blocks(qi, *, bq, bk, n_k, causal):
    """Key blocks a query block needs: all of them, or up to the diagonal when causal."""
    if not causal:
        return n_k
    return jnp.minimum(lax.div((qi + 1) * bq + bk - 1, bk), n_k)


def _split_refs(refs, n_inputs: int, has_seg: bool, n_outputs: int):
    """(input refs, query-segment ref, key-segment ref, output refs) of a kernel's refs.

    Poison buffers (tests), if any, sit between the inputs and the outputs and are unused.
    """
    n_seg = 2 if has_seg else 0
    q_seg, k_seg = refs[n_inputs : n_inputs + n_seg] if has_seg else (None, None)
    return refs[:n_inputs], q_seg, k_seg, refs[len(refs) - n_outputs :]


def _fwd_kernel(*refs, scale, causal, bq, bk, seq_len, n_k, has_seg):
    (q_ref, k_ref, v_ref, slope_ref), qs_ref, ks_ref, (o_ref, lse_ref) = _split_refs(
        refs, 4, has_seg, 2
    )
    qi = pl.program_id(2)
    q = q_ref[...]
    slope = slope_ref[0]
    q_pos = qi * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    q_seg = qs_ref[...][:, None] if has_seg else None

    def body(kb, carry):
        acc, m, denom = carry
        ks = pl.ds(pl.multiple_of(kb * bk, bk), bk)
        k_pos = kb * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        k_seg = ks_ref[ks][None, :] if has_seg else None
        s = scores(
            q,
            k_ref[ks, :],
            q_pos,
            k_pos,
            q_seg,
            k_seg,
            slope,
            scale=scale,
            causal=causal,
            seq_len=seq_len,
        )
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.exp(s - m_new[:, None])
        corr = jnp.exp(m - m_new)
        v = v_ref[ks, :]
        acc = corr[:, None] * acc + jnp.dot(
            p.astype(v.dtype), v, preferred_element_type=jnp.float32
        )
        return acc, m_new, corr * denom + p.sum(axis=-1)

    K = q.shape[-1]
    init = (
        jnp.zeros((bq, K), jnp.float32),
        jnp.full((bq,), MASKED, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
    )
    acc, m, denom = lax.fori_loop(
        0, _n_key_blocks(qi, bq=bq, bk=bk, n_k=n_k, causal=causal), body, init
    )
    denom = jnp.maximum(denom, 1e-30)
    o_ref[...] = (acc / denom[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(denom)


def _dq_kernel(*refs, scale, causal, bq, bk, seq_len, n_k, has_seg):
    inputs, qs_ref, ks_ref, (dq_ref,) = _split_refs(refs, 7, has_seg, 1)
    q_ref, k_ref, v_ref, slope_ref, do_ref, lse_ref, d_ref = inputs
    qi = pl.program_id(2)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...][:, None], d_ref[...][:, None]
    slope = slope_ref[0]
    q_pos = qi * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    q_seg = qs_ref[...][:, None] if has_seg else None

    def body(kb, dq):
        ks = pl.ds(pl.multiple_of(kb * bk, bk), bk)
        k_pos = kb * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        k, v = k_ref[ks, :], v_ref[ks, :]
        k_seg = ks_ref[ks][None, :] if has_seg else None
        _, ds = backward_block(
            q,
            k,
            v,
            do,
            lse,
            delta,
            q_pos,
            k_pos,
            q_seg,
            k_seg,
            slope,
            scale=scale,
            causal=causal,
            seq_len=seq_len,
        )
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    K = q.shape[-1]
    n = _n_key_blocks(qi, bq=bq, bk=bk, n_k=n_k, causal=causal)
    dq = lax.fori_loop(0, n, body, jnp.zeros((bq, K), jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkdv_kernel(*refs, scale, causal, bq, bk, seq_len, n_q, has_seg):
    inputs, qs_ref, ks_ref, (dk_ref, dv_ref) = _split_refs(refs, 7, has_seg, 2)
    q_ref, k_ref, v_ref, slope_ref, do_ref, lse_ref, d_ref = inputs
    ki = pl.program_id(2)
    k, v = k_ref[...], v_ref[...]
    slope = slope_ref[0]
    k_pos = ki * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    k_seg = ks_ref[...][None, :] if has_seg else None

    def body(qb, carry):
        dk, dv = carry
        qs = pl.ds(pl.multiple_of(qb * bq, bq), bq)
        q_pos = qb * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
        q, do = q_ref[qs, :], do_ref[qs, :]
        q_seg = qs_ref[qs][:, None] if has_seg else None
        p, ds = backward_block(
            q,
            k,
            v,
            do,
            lse_ref[qs][:, None],
            d_ref[qs][:, None],
            q_pos,
            k_pos,
            q_seg,
            k_seg,
            slope,
            scale=scale,
            causal=causal,
            seq_len=seq_len,
        )
        dv = dv + jnp.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dk = dk + jnp.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32)
        return dk, dv

    K = k.shape[-1]
    # causal: query blocks before this key block see none of it
    first = lax.div(ki * bk, bq) if causal else 0
    zeros = jnp.zeros((bk, K), jnp.float32)
    dk, dv = lax.fori_loop(first, n_q, body, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _specs(B, H, G, Sp, K, bq, bk, has_seg, *, over_keys=False):
    """BlockSpecs for grid (B, H, blocks): q-side blocked for dq/fwd, k-side for dkdv."""
    R = H // G
    if over_keys:
        q_spec = pl.BlockSpec((None, Sp, None, K), lambda b, h, i: (b, 0, h, 0))
        kv_spec = pl.BlockSpec((None, bk, None, K), lambda b, h, i: (b, i, h // R, 0))
        row_spec = pl.BlockSpec((None, None, Sp), lambda b, h, i: (b, h, 0))
        qs_spec = pl.BlockSpec((None, Sp), lambda b, h, i: (b, 0))
        ks_spec = pl.BlockSpec((None, bk), lambda b, h, i: (b, i))
    else:
        q_spec = pl.BlockSpec((None, bq, None, K), lambda b, h, i: (b, i, h, 0))
        kv_spec = pl.BlockSpec((None, Sp, None, K), lambda b, h, i: (b, 0, h // R, 0))
        row_spec = pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))
        qs_spec = pl.BlockSpec((None, bq), lambda b, h, i: (b, i))
        ks_spec = pl.BlockSpec((None, Sp), lambda b, h, i: (b, 0))
    slope_spec = pl.BlockSpec((1,), lambda b, h, i: (h,))
    seg_specs = [qs_spec, ks_spec] if has_seg else []
    return q_spec, kv_spec, row_spec, slope_spec, seg_specs


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9, 10))
def _flash(q, k, v, slopes, segment_ids, scale, causal, bq, bk, interpret, poison_outputs):
    return _forward(q, k, v, slopes, segment_ids, scale, causal, bq, bk, interpret, poison_outputs)[
        0
    ]


def _forward(q, k, v, slopes, segment_ids, scale, causal, bq, bk, interpret, poison_outputs):
    B, S, H, K = q.shape
    G = k.shape[2]
    Sp = math.lcm(bq, bk) * pl.cdiv(S, math.lcm(bq, bk))
    has_seg = segment_ids is not None
    qp, kp, vp = (pad_axis(x, Sp, 1) for x in (q, k, v))
    q_spec, kv_spec, row_spec, slope_spec, seg_specs = _specs(B, H, G, Sp, K, bq, bk, has_seg)
    segs = [pad_axis(segment_ids, Sp, 1)] * 2 if has_seg else []
    kernel = functools.partial(
        _fwd_kernel,
        scale=scale,
        causal=causal,
        bq=bq,
        bk=bk,
        seq_len=S,
        n_k=Sp // bk,
        has_seg=has_seg,
    )
    out_shape = [
        jax.ShapeDtypeStruct((B, Sp, H, K), q.dtype),
        jax.ShapeDtypeStruct((B, H, Sp), jnp.float32),
    ]
    args = [qp, kp, vp, slopes, *segs]
    in_specs = [q_spec, kv_spec, kv_spec, slope_spec, *seg_specs]
    bufs, buf_specs, aliases = poison(out_shape, [q_spec, row_spec], len(args), poison_outputs)
    o, lse = pl.pallas_call(
        kernel,
        grid=(B, H, Sp // bq),
        in_specs=[*in_specs, *buf_specs],
        out_specs=[q_spec, row_spec],
        out_shape=out_shape,
        input_output_aliases=aliases,
        interpret=interpret,
        name="mpt_flash_fwd",
    )(*args, *bufs)
    return o[:, :S], (q, k, v, slopes, segment_ids, o, lse)


def _flash_fwd(q, k, v, slopes, segment_ids, scale, causal, bq, bk, interpret, poison_outputs):
    return _forward(q, k, v, slopes, segment_ids, scale, causal, bq, bk, interpret, poison_outputs)


def _flash_bwd(scale, causal, bq, bk, interpret, poison_outputs, residuals, do):
    q, k, v, slopes, segment_ids, o_padded, lse = residuals
    B, S, H, K = q.shape
    G = k.shape[2]
    Sp = o_padded.shape[1]
    has_seg = segment_ids is not None
    qp, kp, vp, dop = (pad_axis(x, Sp, 1) for x in (q, k, v, do))
    # D_i = rowsum(dO_i * O_i), the softmax-gradient correction term
    delta = jnp.einsum("bshk,bshk->bhs", dop.astype(jnp.float32), o_padded.astype(jnp.float32))
    segs = [pad_axis(segment_ids, Sp, 1)] * 2 if has_seg else []
    common = dict(scale=scale, causal=causal, bq=bq, bk=bk, seq_len=S, has_seg=has_seg)
    args = [qp, kp, vp, slopes, dop, lse, delta, *segs]

    q_spec, kv_spec, row_spec, slope_spec, seg_specs = _specs(B, H, G, Sp, K, bq, bk, has_seg)
    out_shape = [jax.ShapeDtypeStruct((B, Sp, H, K), q.dtype)]
    bufs, buf_specs, aliases = poison(out_shape, [q_spec], len(args), poison_outputs)
    (dq,) = pl.pallas_call(
        functools.partial(_dq_kernel, n_k=Sp // bk, **common),
        grid=(B, H, Sp // bq),
        in_specs=[
            *(q_spec, kv_spec, kv_spec, slope_spec, q_spec, row_spec, row_spec),
            *seg_specs,
            *buf_specs,
        ],
        out_specs=[q_spec],
        out_shape=out_shape,
        input_output_aliases=aliases,
        interpret=interpret,
        name="mpt_flash_dq",
    )(*args, *bufs)

    q_spec, kv_spec, row_spec, slope_spec, seg_specs = _specs(
        B, H, G, Sp, K, bq, bk, has_seg, over_keys=True
    )
    # per query head; heads sharing a kv head are summed below
    head_kv_spec = pl.BlockSpec((None, bk, None, K), lambda b, h, i: (b, i, h, 0))
    out_shape = [jax.ShapeDtypeStruct((B, Sp, H, K), jnp.float32)] * 2
    bufs, buf_specs, aliases = poison(out_shape, [head_kv_spec] * 2, len(args), poison_outputs)
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, n_q=Sp // bq, **common),
        grid=(B, H, Sp // bk),
        in_specs=[
            *(q_spec, kv_spec, kv_spec, slope_spec, q_spec, row_spec, row_spec),
            *seg_specs,
            *buf_specs,
        ],
        out_specs=[head_kv_spec, head_kv_spec],
        out_shape=out_shape,
        input_output_aliases=aliases,
        interpret=interpret,
        name="mpt_flash_dkdv",
    )(*args, *bufs)
    R = H // G
    dk = dk[:, :S].reshape(B, S, G, R, K).sum(axis=3).astype(k.dtype)
    dv = dv[:, :S].reshape(B, S, G, R, K).sum(axis=3).astype(v.dtype)
    seg_grad = None if segment_ids is None else jnp.zeros(segment_ids.shape, jax.dtypes.float0)
    return dq[:, :S], dk, dv, jnp.zeros_like(slopes), seg_grad


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(
    q_BSHK: jax.Array,
    k_BSGK: jax.Array,
    v_BSGK: jax.Array,
    *,
    alibi_slopes: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    causal: bool = True,
    softmax_scale: float | None = None,
    block_q: int = 64,
    block_k: int = 64,
    interpret: bool = False,
    _poison_outputs: bool = False,
) -> jax.Array:
    """Fused attention (B, S, H, K) with in-kernel ALiBi; differentiable in q, k and v.

    _poison_outputs (tests only): kernel outputs start as NaN, so unwritten elements show.
    """
    _, S, H, K = q_BSHK.shape
    if k_BSGK.shape[1] != S:
        raise ValueError("flash_attention: queries and keys must have the same length")
    if H % k_BSGK.shape[2]:
        raise ValueError(f"flash_attention: {H} heads are not a multiple of {k_BSGK.shape[2]}")
    scale = 1.0 / math.sqrt(K) if softmax_scale is None else float(softmax_scale)
    slopes = (
        jnp.zeros((H,), jnp.float32)
        if alibi_slopes is None
        else jnp.asarray(alibi_slopes, jnp.float32)
    )
    seg = None if segment_ids is None else segment_ids.astype(jnp.int32)
    # Triton tiles need power-of-two widths: zero columns change neither q.k nor p.v (MPT-30B: 112)
    K_pad = pl.next_power_of_2(K)
    q, k, v = (pad_axis(x, K_pad, 3) for x in (q_BSHK, k_BSGK, v_BSGK))
    out = _flash(q, k, v, slopes, seg, scale, causal, block_q, block_k, interpret, _poison_outputs)
    return out[..., :K]
