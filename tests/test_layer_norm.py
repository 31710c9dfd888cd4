"""The Pallas norm kernels (Triton lowering; interpret mode on CPU) against the model's XLA norm."""

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import relative_error

from mpt_jax import MPTForCausalLM, model, sharding
from mpt_jax.config import ConfigError, MeshConfig, ModelConfig
from mpt_jax.kernels.layer_norm import fused_norm

FAST_COMPILE = {"xla_backend_optimization_level": 0}
f32, bf16 = jnp.float32, jnp.bfloat16

CASES = {
    # rows, D, rms, norm dtype, bias, h (a block output added first), skip, rows per bwd program
    "low_precision_layernorm_add_skip": ((2, 37), 128, False, bf16, False, bf16, True, 8),
    "layernorm_bias_d96_not_a_power_of_two": ((3, 11), 96, False, f32, True, None, False, 4),
    "low_precision_rmsnorm_d160_skip": ((45,), 160, True, bf16, False, None, True, 16),
    "rmsnorm_add_f32_one_row_per_program": ((2, 5), 64, True, f32, False, f32, True, 1),
    "low_precision_layernorm_bias_d80_add": ((1, 70), 80, False, bf16, True, bf16, False, 32),
}


def _reference(x, scale, bias, h, *, eps, rms, dtype, skip):
    """The model's XLA path: Norm.with_skip / Norm.__call__ with the xla impl."""
    s = x if h is None else x + h
    y = model._norm(s.astype(dtype), scale, bias, eps, rms, dtype)
    return (s, y) if skip else y


def _value_and_grads(norm, x, scale, bias, h, g_skip, g_y, skip):
    """(y, (dx, dscale[, dbias][, dh])) of the loss sum(s g_skip) + sum(y g_y), jitted."""

    def loss(x, scale, bias, h):
        out = norm(x, scale, bias, h)
        s, y = out if skip else (None, out)
        total = (y.astype(f32) * g_y).sum()
        if skip:
            total += (s * g_skip).sum()
        return total, y

    argnums = (0, 1) + ((2,) if bias is not None else ()) + ((3,) if h is not None else ())
    grad = jax.value_and_grad(loss, argnums=argnums, has_aux=True)
    (_, y), grads = jax.jit(grad, compiler_options=FAST_COMPILE)(x, scale, bias, h)
    return y, grads


@pytest.mark.parametrize("case", CASES)
def test_fused_norm_matches_the_model_norm_forward_and_gradients(case):
    lead, D, rms, dtype, with_bias, h_dtype, skip, rows_bwd = CASES[case]
    rng = np.random.default_rng(zlib.crc32(case.encode()))  # fresh inputs per case
    # a residual stream with an offset and spread, so centring and scaling both matter
    x = jnp.asarray(3 * rng.standard_normal((*lead, D)) + 1.5, f32)
    scale = jnp.asarray(1 + 0.2 * rng.standard_normal(D), f32)
    bias = jnp.asarray(0.1 * rng.standard_normal(D), f32) if with_bias else None
    h = None if h_dtype is None else jnp.asarray(rng.standard_normal((*lead, D)), h_dtype)
    g_skip = jnp.asarray(rng.standard_normal((*lead, D)), f32)
    g_y = jnp.asarray(rng.standard_normal((*lead, D)), f32)
    kw = dict(eps=1e-5, rms=rms, dtype=dtype, skip=skip)

    def ours(x, scale, bias, h):
        kernel_kw = dict(rows_bwd=rows_bwd, interpret=True, _poison_outputs=True)
        return fused_norm(x, scale, bias, h=h, **kw, **kernel_kw)

    args = (x, scale, bias, h, g_skip, g_y, skip)
    y, grads = _value_and_grads(ours, *args)
    ref_y, ref_grads = _value_and_grads(functools.partial(_reference, **kw), *args)
    assert y.dtype == ref_y.dtype == dtype
    # bf16: the kernels round where the model rounds; only float32 summation order differs
    tol = 1e-5 if dtype == f32 else 1e-2
    assert relative_error(y, ref_y) < tol
    assert len(grads) == len(ref_grads) == 2 + with_bias + (h is not None)
    for i, (ours_grad, ref_grad) in enumerate(zip(grads, ref_grads, strict=True)):
        assert ours_grad.dtype == ref_grad.dtype, i
        assert relative_error(ours_grad, ref_grad) < tol, i


def test_fused_norm_statistics_are_per_row():
    # rows of very different offset and spread: a statistic shared across rows would show
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 64)) * np.array([1, 10, 100, 0.1, 5, 2])[:, None]
    x = jnp.asarray(x + np.array([0, -50, 7, 3, 1000, -1])[:, None], f32)
    y = fused_norm(x, jnp.ones(64, f32), eps=1e-6, rows_fwd=4, interpret=True)
    np.testing.assert_allclose(np.asarray(y).mean(axis=1), 0, atol=1e-4)
    np.testing.assert_allclose(np.asarray(y).std(axis=1), 1, rtol=1e-4)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(scale=jnp.ones(32)), r"fused_norm: scale \(32,\) do not match x's last axis \(64\)"),
        (dict(bias=jnp.ones(63)), r"fused_norm: scale \(64,\), bias \(63,\) do not match"),
        (dict(rows_bwd=0), "rows_fwd and rows_bwd must be >= 1"),
        (dict(h=jnp.ones((4, 32))), r"fused_norm: h \(4, 32\) does not match x \(4, 64\)"),
    ],
)
def test_fused_norm_refuses_bad_arguments_in_one_line(kw, message):
    args = dict(scale=jnp.ones(64), bias=None) | kw
    scale, bias = args.pop("scale"), args.pop("bias")
    with pytest.raises(ValueError, match=message):
        fused_norm(jnp.ones((4, 64)), scale, bias, eps=1e-5, **args)


def test_fused_norm_refuses_rows_wider_than_one_register_vector():
    x = jax.ShapeDtypeStruct((2, 20000), f32)
    with pytest.raises(ValueError, match="last axis 20000 is wider than 16384"):
        jax.eval_shape(lambda x: fused_norm(x, jnp.ones(20000), eps=1e-5), x)


_MODEL_FIELDS = dict(
    d_model=96, n_heads=4, n_layers=2, vocab_size=100, max_seq_len=48, attn_impl="xla"
)


@functools.cache
def _model_logits_and_grads(
    norm_impl: str, norm_type: str, scan_layers: bool, dtype, remat: str, pure: bool = False
):
    cfg = ModelConfig(
        **_MODEL_FIELDS, norm_impl=norm_impl, norm_type=norm_type, scan_layers=scan_layers
    )
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 100, (2, 40)))
    # one seed: the same weights
    module = MPTForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=dtype, remat=remat)
    graphdef, params = nnx.split(module, nnx.Param)

    def loss(p):
        if pure:  # train.mixed_precision PURE: every parameter, so the stream too, in bf16
            p = jax.tree.map(lambda x: x.astype(dtype), p)
        logits = nnx.merge(graphdef, p)(ids)
        return jnp.mean(jax.nn.logsumexp(logits.astype(f32), axis=-1)), logits

    grad = jax.value_and_grad(loss, has_aux=True)
    # PURE's case compiles optimized: XLA's fusions are where a bf16 stream lost roundings
    options = {} if pure else FAST_COMPILE
    (_, logits), grads = jax.jit(grad, compiler_options=options)(params)
    return logits, jax.tree.leaves(grads)


@pytest.mark.parametrize(
    ("norm_type", "scan_layers", "dtype", "remat"),
    [
        ("low_precision_layernorm", False, f32, "none"),
        ("low_precision_layernorm", True, bf16, "none"),  # amp: bf16 norms of the fp32 stream
        ("rmsnorm", True, f32, "full"),  # the kernels' custom_vjp inside jax.checkpoint
    ],
)
def test_model_with_pallas_norms_gives_the_xla_logits_and_gradients(
    norm_type, scan_layers, dtype, remat
):
    ref_logits, ref_grads = _model_logits_and_grads("xla", norm_type, scan_layers, dtype, remat)
    logits, grads = _model_logits_and_grads("pallas_gpu", norm_type, scan_layers, dtype, remat)
    tol = 1e-5 if dtype == f32 else 2e-2
    assert relative_error(logits, ref_logits) < tol
    assert len(grads) == len(ref_grads)
    for ours, ref in zip(grads, ref_grads, strict=True):
        assert relative_error(ours, ref) < tol


@pytest.mark.parametrize(
    ("norm_type", "scan_layers"),
    [("low_precision_layernorm", True), ("low_precision_rmsnorm", False)],
)
def test_with_a_bf16_stream_pallas_and_xla_norms_round_alike(norm_type, scan_layers):
    # both round where torch's ops do, the stream's adds included, even where XLA fuses an add
    # into a norm's float32 statistics (casts there and back it drops; reduce_precision it keeps)
    ref_logits, ref_grads = _model_logits_and_grads(
        "xla", norm_type, scan_layers, bf16, "none", True
    )
    logits, grads = _model_logits_and_grads(
        "pallas_gpu", norm_type, scan_layers, bf16, "none", True
    )
    assert logits.dtype == bf16
    differs = np.asarray(logits, f32) != np.asarray(ref_logits, f32)
    if norm_type.endswith("rmsnorm"):  # a sum of squares: the same in either order here
        assert not differs.any()
    # LayerNorm's mean may tip a row by its float32 summation order (one row of 80 did);
    # with the roundings XLA dropped, three quarters of the logits differed
    assert differs.mean() <= 0.02, differs.mean()
    for ours, ref in zip(grads, ref_grads, strict=True):
        assert relative_error(ours, ref) < 1e-2


def test_pallas_kernels_on_a_mesh_split_by_batch_give_the_single_device_gradients():
    # the kernels run per device on its rows and heads (sharding.device_local); the gradients of the
    # replicated scales (and the loss) are summed over the devices by shard_map's transpose
    cfg = ModelConfig(
        **(_MODEL_FIELDS | dict(attn_impl="pallas_gpu", alibi=True, learned_pos_emb=False)),
        norm_impl="pallas_gpu",
    )
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 100, (8, 40)))
    graphdef, params = nnx.split(MPTForCausalLM(cfg, rngs=nnx.Rngs(0)), nnx.Param)

    def loss(p, ids):
        return jnp.mean(jax.nn.logsumexp(nnx.merge(graphdef, p)(ids), axis=-1))

    grad = jax.value_and_grad(loss)
    ref_loss, ref_grads = jax.jit(grad, compiler_options=FAST_COMPILE)(params, ids)
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), jax.devices()[:8])
    on_mesh = jax.jit(
        sharding.traced_on(mesh, grad),
        in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
        compiler_options=FAST_COMPILE,
    )
    # the (interpreted) kernels run in shard_map's per-device computations
    assert "manual_computation" in on_mesh.lower(params, ids).as_text()
    mesh_loss, mesh_grads = on_mesh(params, ids)
    assert relative_error(mesh_loss, ref_loss) < 1e-6
    for ours, ref in zip(jax.tree.leaves(mesh_grads), jax.tree.leaves(ref_grads), strict=True):
        assert relative_error(ours, ref) < 1e-5


def test_norm_impl_is_validated():
    with pytest.raises(ConfigError, match=r"model\.norm_impl"):
        ModelConfig.from_dict({"norm_impl": "triton"})


def test_a_bias_on_an_rmsnorm_is_refused():
    from mpt_jax.kernels.layer_norm import fused_norm

    x, w = jnp.ones((2, 8)), jnp.ones(8)
    # llm-foundry's RMSNorm has no bias, and the model drops one: the kernel added it
    with pytest.raises(ValueError, match=r"^fused_norm: bias with rms=True; RMSNorm has no bias$"):
        fused_norm(x, w, w, eps=1e-5, rms=True, interpret=True)
