"""tokamax_compat: the Pallas names tokamax 0.0.12 calls, and its GPU kernels lowered for CUDA.

Under the CI's jax 0.10 the names exist and `install()` adds nothing; `make test-gpu-stack` runs
the same tests under the GPU image's jax 0.11.2, where they are gone.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import lower_for_cuda
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.sharding import NamedSharding, PartitionSpec

import mpt_jax.attention as attention_lib
from mpt_jax import sharding
from mpt_jax.attention import alibi_slopes, attention
from mpt_jax.config import MeshConfig
from mpt_jax.kernels import tokamax_compat


@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
def test_pallas_dot_is_jax_0_10s_pl_dot(trans_a, trans_b):
    rng = np.random.default_rng(int(trans_a) * 2 + int(trans_b))
    a = rng.standard_normal((8, 16) if not trans_a else (16, 8)).astype(np.float32)
    b = rng.standard_normal((16, 4) if not trans_b else (4, 16)).astype(np.float32)
    expected = (a.T if trans_a else a) @ (b.T if trans_b else b)
    a16, b16 = jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16)
    got = tokamax_compat.pallas_dot(a16, b16, trans_a, trans_b)
    assert got.dtype == jnp.float32 and got.shape == (8, 4)  # accumulated in float32
    np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-2, atol=5e-2)
    exact = tokamax_compat.pallas_dot(jnp.asarray(a), jnp.asarray(b), trans_a, trans_b, True)
    np.testing.assert_allclose(np.asarray(exact), expected, rtol=1e-5, atol=1e-5)
    ints = tokamax_compat.pallas_dot(jnp.ones((2, 3), jnp.int8), jnp.ones((3, 2), jnp.int8))
    assert ints.dtype == jnp.int32 and int(ints[0, 0]) == 3
    with pytest.raises(ValueError, match="2D arrays"):
        tokamax_compat.pallas_dot(jnp.ones((2, 2, 2)), jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="allow_tf32 or precision"):
        tokamax_compat.pallas_dot(a16, b16, allow_tf32=True, precision=jax.lax.Precision.HIGHEST)


def test_install_adds_what_this_jax_lacks_once():
    tokamax_compat.install()
    assert tokamax_compat.install() == []
    added = getattr(plgpu.kernel, "takes_jax_0_10_aliases", False)
    if jax.__version_info__ < (0, 11):  # the names still exist: nothing was added
        assert pl.dot is not tokamax_compat.pallas_dot and not added
    else:
        assert pl.dot is tokamax_compat.pallas_dot and added


def test_kernel_aliases_reach_a_real_mosaic_gpu_kernel_with_lane_semantics():
    """A kernel written for jax 0.10 (out_shape, scratch_shapes, default semantics) lowers."""
    calls = []

    def recorded_kernel(*args, **kwargs):
        calls.append(kwargs)
        return plgpu.kernel(*args, **kwargs)

    kernel = tokamax_compat.kernel_with_aliases(
        recorded_kernel, plgpu.CompilerParams, plgpu.LoweringSemantics.Lane
    )

    def copy(x_ref, o_ref, smem, barrier):
        plgpu.copy_gmem_to_smem(x_ref, smem, barrier)
        plgpu.barrier_wait(barrier)
        plgpu.copy_smem_to_gmem(smem, o_ref)
        plgpu.wait_smem_to_gmem(0)

    shape = jax.ShapeDtypeStruct((64, 64), jnp.bfloat16)

    @jax.jit
    def run(x):
        return kernel(
            copy,
            out_shape=shape,
            scratch_shapes=[plgpu.SMEM((64, 64), jnp.bfloat16), plgpu.Barrier()],
            compiler_params=plgpu.CompilerParams(approx_math=True),
        )(x)

    text = lower_for_cuda(run, shape).as_text()
    assert "mosaic_gpu" in text
    (used,) = calls
    assert used["out_type"] is shape and len(used["scratch_types"]) == 2
    assert "out_shape" not in used and "scratch_shapes" not in used
    params = used["compiler_params"]
    assert params.lowering_semantics == plgpu.LoweringSemantics.Lane and params.approx_math
    # a call in this jax's own terms passes through untouched
    kernel(copy, out_type=shape, scratch_types=[])
    assert calls[-1] == {"out_type": shape, "scratch_types": []}


@pytest.mark.parametrize("on_mesh", [False, True])
@pytest.mark.parametrize("name", ["mosaic_gpu", "triton"])
def test_tokamax_gpu_kernels_lower_for_a_hopper_gpu(monkeypatch, name, on_mesh):
    """`attention(impl="tokamax")` forward and backward as an H200 host builds them: tokamax's
    own kernel runs (no fallback), the ALiBi bias is the key-only (1, H, 1, S) one. On a mesh
    splitting batch and heads (2 x 2), it runs per device on half the rows and heads."""
    pytest.importorskip("tokamax")
    from tokamax._src import gpu_utils

    # what tokamax asks of the local device, answered as an H200 would
    for check, answer in [
        ("has_mosaic_gpu_support", True),
        ("has_triton_support", True),
        ("is_sm90", True),
        ("is_sm100", False),
    ]:
        monkeypatch.setattr(gpu_utils, check, lambda *a, answer=answer: answer)
    monkeypatch.setattr(attention_lib, "backend", lambda: "gpu")
    monkeypatch.setattr(attention_lib, "_TOKAMAX_IMPLEMENTATIONS", {"gpu": (name,)})
    B, S, H, K = 2, 512, 4, 128
    mesh = jax.sharding.AbstractMesh((1,), ("gpu",))
    split = None
    if on_mesh:
        mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=1, tensor=2), jax.devices()[:4])
        split = NamedSharding(mesh, PartitionSpec("data", None, "tensor"))
    q = jax.ShapeDtypeStruct((B, S, H, K), jnp.bfloat16, sharding=split)
    slopes = alibi_slopes(H)

    def loss(q, k, v):
        out = attention(q, k, v, impl="tokamax", alibi_slopes=slopes, causal=True)
        return out.astype(jnp.float32).sum()

    # tokamax's Triton backward broadcasts by rank promotion, traced after attention() returns;
    # conftest makes rank promotion an error
    with jax.numpy_rank_promotion("allow"):
        grad = sharding.traced_on(mesh, jax.grad(loss, argnums=(0, 1, 2)))
        text = lower_for_cuda(jax.jit(grad), q, q, q, mesh=mesh).as_text()
    targets = re.findall(r"custom_call @([\w$.]+)", text)
    if name == "mosaic_gpu":
        assert targets and all(t.startswith("mosaic_gpu") for t in targets)
    else:
        assert targets and all("triton" in t for t in targets)
    assert len(targets) >= 2  # the forward, and a backward of its own
    local_heads = H // 2 if on_mesh else H
    assert f"tensor<1x{local_heads}x1x{S}xf32>" in text  # the key-only ALiBi bias
    assert ("manual_computation" in text) == on_mesh
