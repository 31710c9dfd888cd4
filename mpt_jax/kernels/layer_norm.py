"""LayerNorm / RMSNorm as Pallas kernels (Triton lowering) that read the residual stream once.

Shapes: R rows (every axis of x but the last, flattened), D features. x keeps its own dtype (the
float32 residual stream under amp) and is rounded to the norm's dtype inside the kernel, as the
model's `x.astype(dtype)` before its norm does; statistics are float32, and the kernels round
where the model's norm (`mpt_jax.model._norm_forward`) rounds. A pre-LN block adds its output h to
the stream right before the next norm, so the kernels take that add too.

- forward: reads x (and h), writes y (R, D) in the norm's dtype, 1/σ (R,) float32, x + h when it
  is wanted, and the stream rounded to the norm's dtype when that is narrower (bf16 under amp),
  for the backward. XLA wrote the sum, read it back, and wrote and re-read a float32 x̂ (CSE
  with the backward's recomputation of it).
- backward: reads that (or the stream), 1/σ, dy and, with `skip`, the gradient the stream gets
  from the rest of the model, and writes the stream's whole gradient: the norm's input gradient
  rounded to the norm's dtype (what the model's cast passes back) plus the skip gradient, and h's
  gradient, the same in h's dtype. Scale and bias gradients leave as float32 partial sums, one
  row per program. XLA took a column reduction, a second pass and a separate cast for these.

Each program takes `rows` consecutive rows, one at a time, each as one vector of D rounded up to a
power of two with the tail masked, so D need not be a power of two.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mpt_jax.kernels.common import poison

MAX_WIDTH = 16384  # a row is one register vector: MPT-30B's 7168 rounds up to 8192


@dataclasses.dataclass(frozen=True)
class _Norm:
    """What the kernels are specialized on."""

    eps: float
    rms: bool
    dtype: Any  # the normalization's dtype (bf16 for the low_precision norms)
    x_dtype: Any  # the stream's
    h_dtype: Any  # that of a block output to add to x first, None without one
    skip: bool  # x (+ h) is also returned; its gradient through that output enters the backward
    has_bias: bool
    rows_fwd: int
    rows_bwd: int
    interpret: bool
    poison_outputs: bool

    @property
    def has_h(self) -> bool:
        return self.h_dtype is not None

    @property
    def saves_rounded(self) -> bool:
        """The backward reads the stream rounded to the norm's dtype, written by the forward,
        when that is narrower (amp: bf16 instead of the float32 stream)."""
        return jnp.dtype(self.dtype).itemsize < jnp.dtype(self.x_dtype).itemsize

    @property
    def writes_sum(self) -> bool:
        """The forward writes x + h: returned with skip, or the backward's input."""
        return self.has_h and (self.skip or not self.saves_rounded)

    def round(self, v: jax.Array) -> jax.Array:
        """v (float32) rounded to the norm's dtype, back in float32."""
        return v.astype(self.dtype).astype(jnp.float32)


def _width(D: int) -> int:
    return pl.next_power_of_2(D)


def _compiler_params(D: int) -> plgpu.CompilerParams:
    # a row spreads over the threads, 8 floats a thread up to D = 4096 (at most 16 warps)
    return plgpu.CompilerParams(num_warps=min(max(_width(D) // 256, 1), 16), num_stages=1)


def _load_row(ref, row, cols, mask):
    """Row `row` of a (R, D) ref, or the (D,) ref itself for row None, as (width,) float32."""
    at = ref.at[cols] if row is None else ref.at[row, cols]
    return plgpu.load(at, mask=mask, other=0.0).astype(jnp.float32)


def _centred_and_rstd(x, mask, D: int, n: _Norm):
    """(x less its mean, or x for RMSNorm, with the masked tail 0; 1/σ) of one row.

    RMSNorm rounds each step to the norm's dtype, as the model's norm (llm-foundry's ops)."""
    if not n.rms:
        xc = jnp.where(mask, x - jnp.sum(x) / D, 0.0)
        return xc, lax.rsqrt(jnp.sum(xc * xc) / D + n.eps)
    mean_square = n.round(jnp.sum(n.round(x * x)) / D)
    return x, n.round(lax.rsqrt(n.round(mean_square + n.eps)))


def _forward_kernel(*refs, n: _Norm, R: int):
    x_ref, h_ref, scale_ref, bias_ref, y_ref, rstd_ref, sum_ref, rounded_ref = _unpack(
        refs, ["x", "h", "scale", "bias"], ["y", "rstd", "sum", "rounded"], n
    )
    D = x_ref.shape[1]
    cols = jnp.arange(_width(D))
    mask = cols < D
    scale = n.round(_load_row(scale_ref, None, cols, mask))
    bias = None if bias_ref is None else n.round(_load_row(bias_ref, None, cols, mask))
    first = pl.program_id(0) * n.rows_fwd

    @pl.loop(0, n.rows_fwd)
    def _(r):
        row = first + r

        @pl.when(row < R)
        def _():
            x = _load_row(x_ref, row, cols, mask)
            if h_ref is not None:  # x + h in the stream's dtype, as the model adds them
                x = (x + _load_row(h_ref, row, cols, mask)).astype(n.x_dtype).astype(jnp.float32)
                if sum_ref is not None:
                    plgpu.store(sum_ref.at[row, cols], x.astype(sum_ref.dtype), mask=mask)
            x = n.round(x)
            if rounded_ref is not None:
                plgpu.store(rounded_ref.at[row, cols], x.astype(rounded_ref.dtype), mask=mask)
            xc, rstd = _centred_and_rstd(x, mask, D, n)
            # as the model: LayerNorm rounds once, RMSNorm x̂ and then x̂ times scale
            y = n.round(xc * rstd) * scale if n.rms else xc * rstd * scale
            if bias is not None:
                y = y + bias
            plgpu.store(y_ref.at[row, cols], y.astype(y_ref.dtype), mask=mask)
            rstd_ref[row] = rstd


def _backward_kernel(*refs, n: _Norm, R: int):
    x_ref, scale_ref, rstd_ref, dy_ref, skip_ref, dx_ref, dh_ref, dscale_ref, dbias_ref = _unpack(
        refs, ["x", "scale", "rstd", "dy", "skip"], ["dx", "dh", "dscale", "dbias"], n
    )
    D = x_ref.shape[1]
    cols = jnp.arange(_width(D))
    mask = cols < D
    scale = n.round(_load_row(scale_ref, None, cols, mask))
    program = pl.program_id(0)
    first = program * n.rows_bwd

    def row_body(r, sums):
        d_scale, d_bias = sums
        row = first + r
        live = mask & (row < R)  # the last program's rows past R read and write nothing
        at = jnp.minimum(row, R - 1)
        x = n.round(_load_row(x_ref, at, cols, live))
        g = _load_row(dy_ref, at, cols, live)
        rstd = rstd_ref[at]
        xc, _ = _centred_and_rstd(x, live, D, n)
        xhat = xc * rstd
        d_xhat = g * scale
        proj = jnp.sum(d_xhat * xhat) / D
        centred = d_xhat if n.rms else d_xhat - jnp.sum(d_xhat) / D
        dx = n.round(rstd * (centred - xhat * proj))  # the gradient of x cast to the dtype
        if skip_ref is not None:
            dx = dx + _load_row(skip_ref, at, cols, live)
        dx = dx.astype(dx_ref.dtype)
        plgpu.store(dx_ref.at[at, cols], dx, mask=live)
        if dh_ref is not None:  # h entered as h.astype(x.dtype): its gradient is cast back
            plgpu.store(dh_ref.at[at, cols], dx.astype(dh_ref.dtype), mask=live)
        return d_scale + g * (n.round(xhat) if n.rms else xhat), d_bias + g

    zeros = jnp.zeros(cols.shape, jnp.float32)
    d_scale, d_bias = lax.fori_loop(0, n.rows_bwd, row_body, (zeros, zeros))
    plgpu.store(dscale_ref.at[program, cols], d_scale, mask=mask)
    if dbias_ref is not None:
        plgpu.store(dbias_ref.at[program, cols], d_bias, mask=mask)


_PRESENT = {
    "h": lambda n: n.has_h,
    "sum": lambda n: n.writes_sum,
    "rounded": lambda n: n.saves_rounded,
    "dh": lambda n: n.has_h,
    "bias": lambda n: n.has_bias,
    "dbias": lambda n: n.has_bias,
    "skip": lambda n: n.skip,
}


def _present(names: list[str], n: _Norm) -> list[str]:
    return [name for name in names if _PRESENT.get(name, lambda n: True)(n)]


def _unpack(refs, inputs: list[str], outputs: list[str], n: _Norm) -> list:
    """The refs in the order of `inputs + outputs`, None for those this kernel goes without.

    Poisoned buffers (tests) come between the inputs and the outputs they are aliased to."""
    ins, outs = _present(inputs, n), _present(outputs, n)
    first_out = len(refs) - len(outs)
    named = dict(zip(ins, refs[: len(ins)], strict=True))
    named |= dict(zip(outs, refs[first_out:], strict=True))
    return [named.get(name) for name in inputs + outputs]


def _whole(shape) -> pl.BlockSpec:
    return pl.BlockSpec(shape, lambda i: (0,) * len(shape))


def _call(kernel, n: _Norm, rows: int, args, out_shape, name):
    """pallas_call over ceil(R / rows) programs, every operand whole (kernels index rows)."""
    R, D = args[0].shape
    out_specs = [_whole(s.shape) for s in out_shape]
    bufs, buf_specs, aliases = poison(out_shape, out_specs, len(args), n.poison_outputs)
    return pl.pallas_call(
        functools.partial(kernel, n=n, R=R),
        grid=(pl.cdiv(R, rows),),
        in_specs=[*(_whole(a.shape) for a in args), *buf_specs],
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        interpret=n.interpret,
        compiler_params=_compiler_params(D),
        name=name,
    )(*args, *bufs)


def _forward(x, h, scale, bias, n: _Norm):
    """(y, 1/σ, the stream x + h or x, what the backward reads: the stream or it rounded)."""
    R, D = x.shape
    args = [a for a in (x, h, scale, bias) if a is not None]
    out_shape = [jax.ShapeDtypeStruct((R, D), n.dtype), jax.ShapeDtypeStruct((R,), jnp.float32)]
    if n.writes_sum:
        out_shape.append(jax.ShapeDtypeStruct((R, D), x.dtype))
    if n.saves_rounded:
        out_shape.append(jax.ShapeDtypeStruct((R, D), n.dtype))
    y, rstd, *more = _call(_forward_kernel, n, n.rows_fwd, args, out_shape, "mpt_norm_fwd")
    stream = more.pop(0) if n.writes_sum else (x if not n.has_h else None)
    return y, rstd, stream, (more[0] if n.saves_rounded else stream)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _norm(x, h, scale, bias, n: _Norm):
    y, _, stream, _ = _forward(x, h, scale, bias, n)
    return (stream, y) if n.skip else y


def _norm_fwd(x, h, scale, bias, n: _Norm):
    y, rstd, stream, saved = _forward(x, h, scale, bias, n)
    return ((stream, y) if n.skip else y), (saved, scale, bias, rstd)


def _norm_bwd(n: _Norm, residuals, g):
    saved, scale, bias, rstd = residuals
    g_skip, dy = g if n.skip else (None, g)
    R, D = saved.shape
    programs = pl.cdiv(R, n.rows_bwd)
    args = [saved, scale, rstd, dy] + ([g_skip.astype(n.x_dtype)] if n.skip else [])
    partial_sums = jax.ShapeDtypeStruct((programs, D), jnp.float32)
    out_shape = [jax.ShapeDtypeStruct((R, D), n.x_dtype)]
    if n.has_h:
        out_shape.append(jax.ShapeDtypeStruct((R, D), n.h_dtype))
    out_shape.append(partial_sums)
    if n.has_bias:
        out_shape.append(partial_sums)
    outs = _call(_backward_kernel, n, n.rows_bwd, args, out_shape, "mpt_norm_bwd")
    dx, dh = outs[0], (outs[1] if n.has_h else None)
    d_scale, *d_bias = outs[2:] if n.has_h else outs[1:]
    d_bias = d_bias[0].sum(axis=0).astype(bias.dtype) if n.has_bias else None
    return dx, dh, d_scale.sum(axis=0).astype(scale.dtype), d_bias


_norm.defvjp(_norm_fwd, _norm_bwd)


def fused_norm(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array | None = None,
    *,
    h: jax.Array | None = None,
    eps: float,
    rms: bool = False,
    dtype: Any = None,
    skip: bool = False,
    rows_fwd: int = 1,
    rows_bwd: int = 32,
    interpret: bool = False,
    _poison_outputs: bool = False,
):
    """LayerNorm (RMSNorm if rms) of s = x + h (x without h) over the last axis D, in `dtype`
    (None: x's); scale and bias (D,); h is added in x's dtype.

    Returns y (x's shape, `dtype`), or (s, y) with skip: the backward then adds the gradient that
    the returned s receives (the residual path) to the norm's input gradient in the same kernel,
    so the model's skip connection costs no separate pass.
    rows_fwd/rows_bwd: rows per program. _poison_outputs (tests only): outputs start as NaN.
    """
    D = x.shape[-1]
    if scale.shape != (D,) or (bias is not None and bias.shape != (D,)):
        shapes = f"scale {scale.shape}" + ("" if bias is None else f", bias {bias.shape}")
        raise ValueError(f"fused_norm: {shapes} do not match x's last axis ({D})")
    if h is not None and h.shape != x.shape:
        raise ValueError(f"fused_norm: h {h.shape} does not match x {x.shape}")
    if rms and bias is not None:  # llm-foundry's RMSNorm has none, and the model gives none
        raise ValueError("fused_norm: bias with rms=True; RMSNorm has no bias")
    if _width(D) > MAX_WIDTH:
        raise ValueError(f"fused_norm: x's last axis {D} is wider than {MAX_WIDTH}")
    if rows_fwd < 1 or rows_bwd < 1:
        raise ValueError(
            f"fused_norm: rows_fwd and rows_bwd must be >= 1, got {rows_fwd}, {rows_bwd}"
        )
    n = _Norm(
        eps=float(eps),
        rms=rms,
        dtype=jnp.dtype(dtype or x.dtype),
        x_dtype=jnp.dtype(x.dtype),
        h_dtype=None if h is None else jnp.dtype(h.dtype),
        skip=skip,
        has_bias=bias is not None,
        rows_fwd=rows_fwd,
        rows_bwd=rows_bwd,
        interpret=interpret,
        poison_outputs=_poison_outputs,
    )
    flat_h = None if h is None else h.reshape(-1, D)
    out = _norm(x.reshape(-1, D), flat_h, scale, bias, n)
    if skip:  # the stream through the custom_vjp: its gradient from the residual path enters it
        return out[0].reshape(x.shape), out[1].reshape(x.shape)
    return out.reshape(x.shape)
