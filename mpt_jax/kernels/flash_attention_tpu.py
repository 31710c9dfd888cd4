"""FlashAttention-2 style Pallas TPU (Mosaic) kernels with ALiBi computed in-kernel.

The contract of kernels/flash_attention.py (the GPU kernels): q (B, S, H, K), k and v
(B, S, G, K), ALiBi slopes (H,) adding -slope_h * |i - j| from iotas (no bias tensor, no bias
gradient), segment ids (B, S), causal block skipping, ragged sequence tails padded and masked;
score and mask math is shared through kernels/common.py.

TPU layout: q, k and v stay (B, S, heads * Kp), a free reshape of (B, S, heads, Kp), and a block
is one head's (rows, Kp) tile: the head dim sits on the 128-wide lane axis, zero-padded to a
multiple of 128 (64 -> 128, 80/96/112 -> 128), rows on sublanes. No (B, H, S, K) transpose.
Forward and dq: grid (B, H, query block, key block); the key axis runs sequentially on one core
while the running max, denominator and accumulator live in VMEM scratch. dk/dv: grid
(B, G, key block, query head in group, query block), so the R query heads of a kv head
accumulate into one VMEM tile and dk, dv come out in k's layout without a per-head buffer.
Causal: blocks above the diagonal skip their compute and their index maps repeat the last
block needed, so the pipeline fetches nothing for them; key blocks past the sequence and
padded query blocks are skipped the same way.
Per-row statistics (max, denominator, log-sum-exp, dO.O) are (rows, 1) float32 columns.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from mpt_jax.kernels.common import (
    MASKED,
    TN_DIMS,
    Heads,
    backward_block,
    check_arrays,
    pad_axis,
    poison,
    scores,
)

_LANES = 128


def _last_key_block(i, *, bq, bk, causal, seq_len):
    """Last key block query block i needs: the diagonal when causal, else the last real key."""
    last = (seq_len - 1) // bk
    if not causal:
        return last
    return jnp.minimum(lax.div(i * bq + bq - 1, bk), last)


def _first_query_block(j, *, bq, bk, causal):
    """First query block that sees key block j (causal: the one holding the diagonal)."""
    return lax.div(j * bk, bq) if causal else 0


def _positions(i, j, bq, bk):
    """Query positions as a (bq, 1) column and key positions as a (1, bk) row."""
    q_pos = i * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    return q_pos, k_pos


def _fwd_kernel(slopes_ref, q_ref, k_ref, v_ref, *refs, scale, causal, bq, bk, seq_len, has_seg):
    # refs: [q segments, k segments], [poison buffers], o, lse, then scratch m, l, acc
    o_ref, lse_ref, m_scr, l_scr, acc_scr = refs[-5:]
    h, i, j = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    geometry = dict(bq=bq, bk=bk, causal=causal)

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, MASKED, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    @pl.when(j <= _last_key_block(i, seq_len=seq_len, **geometry))
    def _step():
        q_seg, k_seg = (refs[0][...], refs[1][...]) if has_seg else (None, None)
        s = scores(
            q_ref[...],
            k_ref[...],
            *_positions(i, j, bq, bk),
            q_seg,
            k_seg,
            slopes_ref[h],
            scale=scale,
            causal=causal,
            seq_len=seq_len,
        )
        m_prev = m_scr[...]
        m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        p = jnp.exp(s - m_new)
        corr = jnp.exp(m_prev - m_new)
        l_scr[...] = corr * l_scr[...] + p.sum(axis=1, keepdims=True)
        v = v_ref[...]
        pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        acc_scr[...] = corr * acc_scr[...] + pv
        m_scr[...] = m_new

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        denom = jnp.maximum(l_scr[...], 1e-30)
        o_ref[...] = (acc_scr[...] / denom).astype(o_ref.dtype)
        lse_ref[...] = m_scr[...] + jnp.log(denom)


def _dq_kernel(
    slopes_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, d_ref, *refs, scale, causal, bq, bk, seq_len,
    has_seg
):  # fmt: skip
    dq_ref, dq_scr = refs[-2:]
    h, i, j = pl.program_id(1), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    @pl.when(j <= _last_key_block(i, bq=bq, bk=bk, causal=causal, seq_len=seq_len))
    def _step():
        q_seg, k_seg = (refs[0][...], refs[1][...]) if has_seg else (None, None)
        k = k_ref[...]
        _, ds = backward_block(
            q_ref[...],
            k,
            v_ref[...],
            do_ref[...],
            lse_ref[...],
            d_ref[...],
            *_positions(i, j, bq, bk),
            q_seg,
            k_seg,
            slopes_ref[h],
            scale=scale,
            causal=causal,
            seq_len=seq_len,
        )
        dq_scr[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (dq_scr[...] * scale).astype(dq_ref.dtype)


def _dkdv_kernel(
    slopes_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, d_ref, *refs, scale, causal, bq, bk, seq_len,
    has_seg
):  # fmt: skip
    dk_ref, dv_ref, dk_scr, dv_scr = refs[-4:]
    g, j, r, i = pl.program_id(1), pl.program_id(2), pl.program_id(3), pl.program_id(4)
    n_rep, n_q = pl.num_programs(3), pl.num_programs(4)

    @pl.when((r == 0) & (i == 0))
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    first = _first_query_block(j, bq=bq, bk=bk, causal=causal)
    needed = (i >= first) & (i * bq < seq_len) & (j * bk < seq_len)

    @pl.when(needed)
    def _step():
        q_seg, k_seg = (refs[0][...], refs[1][...]) if has_seg else (None, None)
        q, do = q_ref[...], do_ref[...]
        p, ds = backward_block(
            q,
            k_ref[...],
            v_ref[...],
            do,
            lse_ref[...],
            d_ref[...],
            *_positions(i, j, bq, bk),
            q_seg,
            k_seg,
            slopes_ref[g * n_rep + r],
            scale=scale,
            causal=causal,
            seq_len=seq_len,
        )
        dv_scr[...] += lax.dot_general(
            p.astype(do.dtype), do, TN_DIMS, preferred_element_type=jnp.float32
        )
        dk_scr[...] += lax.dot_general(
            ds.astype(q.dtype), q, TN_DIMS, preferred_element_type=jnp.float32
        )

    @pl.when((r == n_rep - 1) & (i == n_q - 1))
    def _finish():
        dk_ref[...] = (dk_scr[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _call(kernel, grid, semantics, in_specs, args, out_specs, out_shape, scratch, name, cfg):
    """pallas_call with the TPU grid spec, and NaN-poisoned outputs when cfg asks for them."""
    bufs, buf_specs, aliases = poison(out_shape, out_specs, len(args), cfg.poison)
    return pl.pallas_call(
        kernel,
        grid_spec=pl.GridSpec(
            grid=grid,
            in_specs=[*in_specs, *buf_specs],
            out_specs=out_specs,
            scratch_shapes=scratch,
        ),
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
        interpret=cfg.interpret,
        name=name,
    )(*args, *bufs)


class _Cfg(NamedTuple):
    """Static kernel settings (hashable: a custom_vjp non-differentiable argument)."""

    scale: float
    causal: bool
    bq: int
    bk: int
    seq_len: int  # before padding
    interpret: Any
    poison: bool


def _seg_args(segment_ids, Sp):
    """Segment ids as a (B, Sp, 1) query column array and a (B, 1, Sp) key row array."""
    if segment_ids is None:
        return []
    seg = pad_axis(segment_ids, Sp, 1)
    return [seg[:, :, None], seg[:, None, :]]


def _fwd_specs(H, G, Kp, cfg, has_seg):
    """BlockSpecs for the grid (B, H, query block i, key block j)."""
    R, bq, bk = H // G, cfg.bq, cfg.bk
    last_j = functools.partial(
        _last_key_block, bq=bq, bk=bk, causal=cfg.causal, seq_len=cfg.seq_len
    )
    # a skipped key block maps to the block already resident: no DMA for it
    kv_block = lambda i, j: jnp.minimum(j, last_j(i))
    q_spec = pl.BlockSpec((None, bq, Kp), lambda b, h, i, j: (b, i, h))
    kv_spec = pl.BlockSpec((None, bk, Kp), lambda b, h, i, j: (b, kv_block(i, j), h // R))
    row_spec = pl.BlockSpec((None, None, bq, 1), lambda b, h, i, j: (b, h, i, 0))
    seg_specs = [
        pl.BlockSpec((None, bq, 1), lambda b, h, i, j: (b, i, 0)),
        pl.BlockSpec((None, 1, bk), lambda b, h, i, j: (b, 0, kv_block(i, j))),
    ]
    return q_spec, kv_spec, row_spec, seg_specs if has_seg else []


def _dkdv_specs(H, G, Kp, cfg, has_seg):
    """BlockSpecs for the grid (B, G, key block j, query head r of the group, query block i)."""
    R, bq, bk = H // G, cfg.bq, cfg.bk
    last_i = (cfg.seq_len - 1) // bq
    first_i = functools.partial(_first_query_block, bq=bq, bk=bk, causal=cfg.causal)
    # a skipped query block maps to one already resident or fetched next anyway
    q_block = lambda i, j: jnp.minimum(jnp.maximum(i, first_i(j)), last_i)
    q_spec = pl.BlockSpec((None, bq, Kp), lambda b, g, j, r, i: (b, q_block(i, j), g * R + r))
    kv_spec = pl.BlockSpec((None, bk, Kp), lambda b, g, j, r, i: (b, j, g))
    row_spec = pl.BlockSpec(
        (None, None, bq, 1), lambda b, g, j, r, i: (b, g * R + r, q_block(i, j), 0)
    )
    seg_specs = [
        pl.BlockSpec((None, bq, 1), lambda b, g, j, r, i: (b, q_block(i, j), 0)),
        pl.BlockSpec((None, 1, bk), lambda b, g, j, r, i: (b, 0, j)),
    ]
    return q_spec, kv_spec, row_spec, seg_specs if has_seg else []


_SLOPES = pl.BlockSpec(memory_space=pltpu.SMEM)  # (H,) float32 scalars, whole array
_FWD_SEMANTICS = ("parallel", "parallel", "parallel", "arbitrary")
_DKDV_SEMANTICS = ("parallel", "parallel", "parallel", "arbitrary", "arbitrary")


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, slopes, segments, cfg):
    return _forward(q, k, v, slopes, segments, cfg)[0]


def _forward(q, k, v, slopes, segments, cfg):
    """q (B, Sp, H, Kp), k and v (B, Sp, G, Kp), padded; segments from _seg_args."""
    B, Sp, H, Kp = q.shape
    G = k.shape[2]
    bq, bk = cfg.bq, cfg.bk
    q_spec, kv_spec, row_spec, seg_specs = _fwd_specs(H, G, Kp, cfg, bool(segments))
    kernel = functools.partial(
        _fwd_kernel,
        scale=cfg.scale,
        causal=cfg.causal,
        bq=bq,
        bk=bk,
        seq_len=cfg.seq_len,
        has_seg=bool(segments),
    )
    o, lse = _call(
        kernel,
        (B, H, Sp // bq, Sp // bk),
        _FWD_SEMANTICS,
        [_SLOPES, q_spec, kv_spec, kv_spec, *seg_specs],
        [slopes, *(x.reshape(B, Sp, -1) for x in (q, k, v)), *segments],
        [q_spec, row_spec],
        [
            jax.ShapeDtypeStruct((B, Sp, H * Kp), q.dtype),
            jax.ShapeDtypeStruct((B, H, Sp, 1), jnp.float32),
        ],
        [pltpu.VMEM((bq, 1), jnp.float32)] * 2 + [pltpu.VMEM((bq, Kp), jnp.float32)],
        "mpt_flash_tpu_fwd",
        cfg,
    )
    o = o.reshape(B, Sp, H, Kp)
    return o, (q, k, v, slopes, segments, o, lse)


def _flash_fwd(q, k, v, slopes, segments, cfg):
    return _forward(q, k, v, slopes, segments, cfg)


def _flash_bwd(cfg, residuals, do):
    q, k, v, slopes, segments, o, lse = residuals
    B, Sp, H, Kp = q.shape
    G = k.shape[2]
    R, bq, bk = H // G, cfg.bq, cfg.bk
    has_seg = bool(segments)
    # D_i = rowsum(dO_i * O_i), the softmax-gradient correction term, as (B, H, Sp, 1) columns
    delta = jnp.einsum("bshk,bshk->bhs", do.astype(jnp.float32), o.astype(jnp.float32))[..., None]
    q2, k2, v2, do2 = (x.reshape(B, Sp, -1) for x in (q, k, v, do))
    args = [slopes, q2, k2, v2, do2, lse, delta, *segments]
    static = dict(scale=cfg.scale, causal=cfg.causal, bq=bq, bk=bk, seq_len=cfg.seq_len)

    q_spec, kv_spec, row_spec, seg_specs = _fwd_specs(H, G, Kp, cfg, has_seg)
    (dq,) = _call(
        functools.partial(_dq_kernel, **static, has_seg=has_seg),
        (B, H, Sp // bq, Sp // bk),
        _FWD_SEMANTICS,
        [_SLOPES, q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *seg_specs],
        args,
        [q_spec],
        [jax.ShapeDtypeStruct((B, Sp, H * Kp), q.dtype)],
        [pltpu.VMEM((bq, Kp), jnp.float32)],
        "mpt_flash_tpu_dq",
        cfg,
    )

    q_spec, kv_spec, row_spec, seg_specs = _dkdv_specs(H, G, Kp, cfg, has_seg)
    dk, dv = _call(
        functools.partial(_dkdv_kernel, **static, has_seg=has_seg),
        (B, G, Sp // bk, R, Sp // bq),
        _DKDV_SEMANTICS,
        [_SLOPES, q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *seg_specs],
        args,
        [kv_spec, kv_spec],
        [
            jax.ShapeDtypeStruct((B, Sp, G * Kp), k.dtype),
            jax.ShapeDtypeStruct((B, Sp, G * Kp), v.dtype),
        ],
        [pltpu.VMEM((bk, Kp), jnp.float32)] * 2,
        "mpt_flash_tpu_dkdv",
        cfg,
    )
    seg_grads = [jnp.zeros(x.shape, jax.dtypes.float0) for x in segments]
    return (
        dq.reshape(q.shape),
        dk.reshape(k.shape),
        dv.reshape(v.shape),
        jnp.zeros_like(slopes),
        seg_grads,
    )


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention_tpu(
    q_BSHK: jax.Array,
    k_BSGK: jax.Array,
    v_BSGK: jax.Array,
    *,
    alibi_slopes: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    causal: bool = True,
    softmax_scale: float | None = None,
    block_q: int = 256,
    block_k: int = 256,
    interpret: bool | pltpu.InterpretParams = False,
    _poison_outputs: bool = False,
) -> jax.Array:
    """Fused attention (B, S, H, K) on TPU with in-kernel ALiBi; differentiable in q, k and v.

    interpret: True runs the kernels through Pallas' generic interpreter (any backend),
    a pltpu.InterpretParams through the TPU simulator. _poison_outputs: tests only, kernel
    outputs start as NaN so that unwritten elements show.
    """
    _, S, H, K = q_BSHK.shape
    G = k_BSGK.shape[2]
    if k_BSGK.shape[1] != S:
        raise ValueError("flash_attention_tpu: queries and keys must have the same length")
    if H % G:
        raise ValueError(f"flash_attention_tpu: {H} heads are not a multiple of {G}")
    heads = Heads(H, G, fused=False)
    check_arrays("flash_attention_tpu", q_BSHK, k_BSGK, v_BSGK, alibi_slopes, segment_ids, heads)
    if not interpret and (block_q % 16 or block_k % _LANES):
        raise ValueError(
            "flash_attention_tpu: block_q must be a multiple of 16 and block_k of 128 on a TPU, "
            f"got {block_q} and {block_k}"
        )
    scale = 1.0 / math.sqrt(K) if softmax_scale is None else float(softmax_scale)
    slopes = (
        jnp.zeros((H,), jnp.float32)
        if alibi_slopes is None
        else jnp.asarray(alibi_slopes, jnp.float32)
    )
    dtype = q_BSHK.dtype
    # Mosaic lacks fp16 arithmetic on most TPU generations; fp16 runs in fp32 (here and on CPU)
    compute = jnp.float32 if dtype == jnp.float16 else dtype
    Sp = math.lcm(block_q, block_k) * pl.cdiv(S, math.lcm(block_q, block_k))
    Kp = _LANES * pl.cdiv(K, _LANES)
    q, k, v = (
        pad_axis(pad_axis(x.astype(compute), Kp, 3), Sp, 1) for x in (q_BSHK, k_BSGK, v_BSGK)
    )
    segments = [] if segment_ids is None else _seg_args(segment_ids.astype(jnp.int32), Sp)
    cfg = _Cfg(scale, causal, block_q, block_k, S, interpret, _poison_outputs)
    out = _flash(q, k, v, slopes, segments, cfg)
    return out[:, :S, :, :K].astype(dtype)
