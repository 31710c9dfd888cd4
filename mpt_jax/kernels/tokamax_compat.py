"""The Pallas names tokamax 0.0.12 calls that jax 0.11 removed, put back with jax 0.10's meaning.

tokamax 0.0.12 (its newest release) was written against jax 0.10: its Triton kernels call
`pl.dot`, and its Mosaic GPU kernels pass `plgpu.kernel` the `out_shape` and `scratch_shapes`
aliases of `out_type` and `scratch_types`, relying on 0.10's default *lane* lowering semantics.
jax 0.11 removed the three names and made *warpgroup* semantics the default: under the GPU
image's jax 0.11.2 tokamax's Mosaic GPU kernel did not trace (H200, 2026-11-28), nor does its
Triton one (lowered for CUDA on a CPU host). `install()` adds what is missing and leaves a jax
that has the names untouched (0.10: it changes nothing).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl


def pallas_dot(a, b, trans_a=False, trans_b=False, allow_tf32=None, precision=None):
    """jax 0.10's `pl.dot`: a @ b of 2-D blocks, either transposed, accumulated in float32
    (int32 for integer blocks)."""
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError("pl.dot: `a` and `b` must be 2D arrays")
    if allow_tf32 is not None:
        if precision is not None:
            raise ValueError("pl.dot: give allow_tf32 or precision, not both")
        precision = lax.Precision.HIGH if allow_tf32 else lax.Precision.HIGHEST
    integer = jnp.issubdtype(jnp.result_type(a.dtype, b.dtype), jnp.integer)
    contract = ((0 if trans_a else 1,), (1 if trans_b else 0,))
    return lax.dot_general(
        a,
        b,
        (contract, ((), ())),
        precision=precision,
        preferred_element_type=jnp.int32 if integer else jnp.float32,
    )


def kernel_with_aliases(kernel, compiler_params_type, lane_semantics):
    """`plgpu.kernel` that also takes 0.10's `out_shape` and `scratch_shapes`.

    A call that uses them was written for 0.10, whose default lowering semantics were lane: it
    gets lane semantics where it left them at this jax's default (an explicit request for the
    new default cannot be told from it; tokamax 0.0.12 makes none).
    """
    default_semantics = compiler_params_type().lowering_semantics

    @functools.wraps(kernel)
    def wrapped(*args, out_shape=None, scratch_shapes=None, **kwargs):
        if out_shape is None and scratch_shapes is None:
            return kernel(*args, **kwargs)
        if out_shape is not None:
            kwargs["out_type"] = out_shape
        if scratch_shapes is not None:
            kwargs["scratch_types"] = scratch_shapes
        params = kwargs.get("compiler_params") or compiler_params_type()
        if params.lowering_semantics == default_semantics:
            params = dataclasses.replace(params, lowering_semantics=lane_semantics)
        kwargs["compiler_params"] = params
        return kernel(*args, **kwargs)

    wrapped.takes_jax_0_10_aliases = True
    return wrapped


def install() -> list[str]:
    """Adds what tokamax needs and this jax lacks; returns the names it added."""
    added = []
    if not hasattr(pl, "dot"):
        pl.dot = pallas_dot  # a removed name: nothing else in this jax can be calling it
        added.append("pl.dot")
    try:
        from jax.experimental.pallas import mosaic_gpu as plgpu
    except ImportError:  # pragma: no cover - a jax without Mosaic GPU
        return added
    takes = inspect.signature(plgpu.kernel).parameters
    wrapped = getattr(plgpu.kernel, "takes_jax_0_10_aliases", False)
    if not wrapped and "out_shape" not in takes and "scratch_shapes" not in takes:
        plgpu.kernel = kernel_with_aliases(
            plgpu.kernel, plgpu.CompilerParams, plgpu.LoweringSemantics.Lane
        )
        added.append("plgpu.kernel(out_shape=, scratch_shapes=)")
    return added
