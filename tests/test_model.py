"""MPT model: NumPy-reference parity for every feature, causality, scan, bf16, init, dropout."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import forward, packed_segments, random_hf_tensors, write_hf_folder
from mpt_numpy_reference import mpt_forward

from mpt_jax import MPTForCausalLM, from_pretrained
from mpt_jax.config import ModelConfig
from mpt_jax.loss import causal_lm_loss

BASE = dict(d_model=64, n_heads=8, n_layers=2, vocab_size=120, max_seq_len=32)

FEATURE_CONFIGS = {
    "qk_ln+clip_qkv": dict(qk_ln=True, clip_qkv=0.4, alibi=True, learned_pos_emb=False),
    "gqa": dict(
        attn_type="grouped_query_attention",
        kv_n_heads=2,
        qk_ln=True,
        alibi=True,
        learned_pos_emb=False,
    ),
    "mqa": dict(attn_type="multiquery_attention", alibi=True, learned_pos_emb=False, no_bias=True),
    "sequence_id": dict(attn_uses_sequence_id=True, alibi=True, learned_pos_emb=False),
    "learned_pos+biases+logit_scale": dict(logit_scale=0.7, n_layers=3),
    "mptglu+silu+untied": dict(
        ffn_type="mptglu",
        ffn_act_fn="silu",
        expansion_ratio=2.5,
        logit_scale="inv_sqrt_d_model",
        tie_word_embeddings=False,
    ),
    "rmsnorm+relu": dict(norm_type="rmsnorm", ffn_act_fn="relu", no_bias=True),
    "12_heads_layernorm_alibi": dict(
        d_model=96,
        n_heads=12,
        norm_type="layernorm",
        alibi=True,
        learned_pos_emb=False,
        alibi_bias_max=6,
        softmax_scale=0.2,
    ),
    "scan+gqa+seq_id": dict(
        scan_layers=True,
        attn_type="grouped_query_attention",
        kv_n_heads=4,
        attn_uses_sequence_id=True,
        alibi=True,
        learned_pos_emb=False,
    ),
}


def _ids(cfg, batch=2, seq=24, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, seq), dtype=np.int32)


@pytest.mark.parametrize("name", sorted(FEATURE_CONFIGS))
def test_matches_independent_numpy_reference(name, tmp_path):
    cfg = ModelConfig(**{**BASE, **FEATURE_CONFIGS[name]})
    tensors = random_hf_tensors(cfg, seed=1)
    folder = write_hf_folder(cfg, tensors, tmp_path / "m")
    model = from_pretrained(folder, scan_layers=cfg.scan_layers)
    assert model.config == cfg
    ids = _ids(cfg)
    seg = packed_segments(*ids.shape) if cfg.attn_uses_sequence_id else None
    ours = forward(model, ids, seg)
    ref = mpt_forward(cfg.to_dict(), tensors, ids, seg)
    assert np.abs(ours - ref).max() <= 1e-4, np.abs(ours - ref).max()
    if seg is not None:  # the mask matters: without it the logits differ
        unmasked = forward(model, ids)
        assert np.abs(unmasked - ref).max() > 1e-2


@pytest.mark.parametrize("fields", [dict(alibi=True, learned_pos_emb=False), dict()])
def test_causality(fields):
    cfg = ModelConfig(**{**BASE, **fields})
    model = MPTForCausalLM(cfg, rngs=nnx.Rngs(3))
    ids = _ids(cfg, seq=20)
    t = 11
    changed = ids.copy()
    changed[:, t + 1 :] = (changed[:, t + 1 :] + 7) % cfg.vocab_size
    a, b = forward(model, ids), forward(model, changed)
    np.testing.assert_allclose(a[:, : t + 1], b[:, : t + 1], atol=1e-6, rtol=0)
    assert np.abs(a[:, t + 1 :] - b[:, t + 1 :]).max() > 1e-3


def test_packed_documents_are_independent_with_sequence_id():
    cfg = ModelConfig(**BASE, attn_uses_sequence_id=True, alibi=True, learned_pos_emb=False)
    model = MPTForCausalLM(cfg, rngs=nnx.Rngs(0))
    ids = _ids(cfg, batch=1, seq=24)
    seg = np.zeros_like(ids)
    seg[:, 10:] = 1
    packed = forward(model, ids, seg)
    alone = forward(model, ids[:, 10:])  # ALiBi is relative: no position offset
    np.testing.assert_allclose(packed[:, 10:], alone, atol=2e-5, rtol=0)


def test_scan_equals_unrolled_forward_and_gradients():
    fields = dict(BASE, n_layers=3, alibi=True, learned_pos_emb=False, qk_ln=True)
    unrolled = MPTForCausalLM(ModelConfig(**fields), rngs=nnx.Rngs(5))
    scanned = MPTForCausalLM(ModelConfig(**fields, scan_layers=True), rngs=nnx.Rngs(5))
    # the same seed gives the same parameters, layer for layer
    for (n1, t1), (n2, t2) in zip(unrolled.hf_tensors(), scanned.hf_tensors(), strict=True):
        assert n1 == n2 and np.array_equal(t1, t2), n1
    ids = jnp.asarray(_ids(unrolled.config))

    def loss_and_grads(model):
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(p):
            return causal_lm_loss(nnx.merge(graphdef, p)(ids), ids)

        value, grads = jax.jit(jax.value_and_grad(loss))(params)
        return value, nnx.merge(graphdef, grads)

    l1, g1 = loss_and_grads(unrolled)
    l2, g2 = loss_and_grads(scanned)
    np.testing.assert_allclose(forward(unrolled, ids), forward(scanned, ids), atol=1e-5)
    assert abs(float(l1) - float(l2)) < 1e-6
    for (n1, t1), (_, t2) in zip(g1.hf_tensors(), g2.hf_tensors(), strict=True):
        np.testing.assert_allclose(t1, t2, atol=1e-6, err_msg=n1)


def test_bf16_compute_within_1e2_of_fp32(tmp_path):
    cfg = ModelConfig(**{**BASE, "n_layers": 3}, alibi=True, learned_pos_emb=False)
    folder = write_hf_folder(cfg, random_hf_tensors(cfg), tmp_path / "m")
    ids = jnp.asarray(_ids(cfg))
    fp32 = forward(from_pretrained(folder), ids).astype(np.float64)
    bf16_model = from_pretrained(folder, dtype=jnp.bfloat16)
    out = forward(bf16_model, ids)
    assert out.dtype == jnp.bfloat16
    assert bf16_model.wte.embedding[...].dtype == jnp.float32  # parameters stay fp32
    rel = np.linalg.norm(np.asarray(out, np.float64) - fp32) / np.linalg.norm(fp32)
    assert 0 < rel <= 1e-2, rel


def test_low_precision_layernorm_runs_in_compute_dtype_plain_layernorm_in_fp32():
    from mpt_jax.model import Norm

    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8)), jnp.bfloat16)
    for norm_type, expected in (
        ("low_precision_layernorm", jnp.bfloat16),
        ("layernorm", jnp.float32),
    ):
        cfg = ModelConfig(**BASE, norm_type=norm_type)
        assert (
            Norm(8, cfg, names=(None,), dtype=jnp.bfloat16, param_dtype=jnp.float32)(x).dtype
            == expected
        )


def _eager_and_jitted(fn, *args):
    """[fn(*args), jax.jit(fn)(*args)]: training runs jitted, where XLA may drop a cast pair
    that eager mode keeps (closed-over modules are constants under jit)."""
    return [fn(*args), jax.jit(fn)(*args)]


def _torch_low_precision_norm(torch, x, weight, bias, eps, rms):
    """llm-foundry's LPLayerNorm / LPRMSNorm under bf16 autocast: x and the parameters cast to
    bf16, then `F.layer_norm`, or `rms_norm`'s torch ops, with autocast off (norm.py)."""
    x, weight = torch.tensor(x).bfloat16(), torch.tensor(weight).bfloat16()
    if rms:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight
    bias = None if bias is None else torch.tensor(bias).bfloat16()
    return torch.nn.functional.layer_norm(x, x.shape[-1:], weight, bias, eps)


@pytest.mark.parametrize(
    "norm_type, no_bias, D",
    [
        ("low_precision_layernorm", False, 96),
        ("low_precision_layernorm", True, 2048),
        ("low_precision_rmsnorm", True, 160),
    ],
)
def test_low_precision_norms_round_as_llm_foundry_does_in_bf16(norm_type, no_bias, D):
    torch = pytest.importorskip("torch")
    from mpt_jax.model import Norm

    rng = np.random.default_rng(D)  # fresh inputs per case
    # the float32 residual stream, with an offset and spread so centring and scaling matter
    # 256 rows: enough for XLA's CPU reduction fusion, which dropped cast pairs under jit
    x = (3.0 * rng.standard_normal((256, D)) + 1.5).astype(np.float32)
    cfg = ModelConfig(**{**BASE, "norm_type": norm_type, "no_bias": no_bias})
    norm = Norm(D, cfg, names=(None,), dtype=jnp.bfloat16, param_dtype=jnp.float32)
    norm.scale[...] = jnp.asarray(1.0 + 0.3 * rng.standard_normal(D), jnp.float32)
    if norm.bias is not None:
        norm.bias[...] = jnp.asarray(0.2 * rng.standard_normal(D), jnp.float32)
    bias = None if norm.bias is None else np.asarray(norm.bias[...])
    rms = norm_type.endswith("rmsnorm")
    expected = _torch_low_precision_norm(torch, x, np.asarray(norm.scale[...]), bias, 1e-5, rms)
    expected = expected.float().numpy()
    for ours in _eager_and_jitted(lambda x: norm(x), jnp.asarray(x)):
        assert ours.dtype == jnp.bfloat16
        ours = np.asarray(ours, np.float32)
        # bit for bit but where float32 summation order tips a statistic (torch and XLA add in
        # different orders): then one bf16 unit in the last place, or a hair for outputs near 0
        differs = ours != expected
        assert differs.mean() <= 1e-3, differs.mean()
        one_ulp = 2.0 ** (np.floor(np.log2(np.abs(expected) + 1e-30)) - 7)
        assert np.all(np.abs(ours - expected) <= np.maximum(one_ulp, 1e-4))


def _autodiff_norm(x, scale, bias, eps, rms, dtype):
    """The norm as plain jnp, differentiated by JAX: the reference for the custom backward."""
    x32 = x.astype(dtype).astype(jnp.float32)
    if rms:
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    else:
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(jnp.mean(jnp.square(x32 - mean), -1, keepdims=True) + eps)
    y = y.astype(dtype) * scale.astype(dtype)[None, None]
    return y if bias is None else y + bias.astype(dtype)[None, None]


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_norm_gradients_match_autodiff(rms, dtype):
    from mpt_jax.model import _norm

    rng = np.random.default_rng(int(rms) + 2 * (dtype == jnp.bfloat16))  # fresh per case
    x = jnp.asarray(3.0 + 2.0 * rng.standard_normal((3, 5, 96)), jnp.float32)  # offset: centring
    scale = jnp.asarray(1.0 + 0.3 * rng.standard_normal(96), jnp.float32)
    bias = None if rms else jnp.asarray(0.1 * rng.standard_normal(96), jnp.float32)
    g = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

    def grads(norm, compute_dtype):
        def loss(x, scale, bias):
            y = norm(x.astype(compute_dtype), scale, bias, 1e-5, rms, compute_dtype)
            return jnp.sum(y.astype(jnp.float32) * g)

        return jax.grad(loss, argnums=(0, 1, 2))(x, scale, bias)

    ours = grads(_norm, dtype)
    # the reference in float32 whatever the compute dtype
    ref = grads(_autodiff_norm, jnp.float32)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for name, a, b in zip(("dx", "dscale", "dbias"), ours, ref, strict=True):
        if b is None:
            assert a is None
            continue
        assert a.dtype == b.dtype, name
        err = float(jnp.abs(a - b).max() / jnp.abs(b).max())
        assert err <= tol, (name, err)


ACTIVATIONS_IN_FLOAT64 = {
    "gelu": lambda x: 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0))),
    "silu": lambda x: x / (1.0 + np.exp(-x)),
}


@pytest.mark.parametrize("name", ["gelu", "silu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_activation_forward_rounds_once_and_gradient_matches_autodiff(name, dtype):
    from mpt_jax.model import _ACTIVATIONS

    act = _ACTIVATIONS[name]
    plain = {"gelu": lambda x: jax.nn.gelu(x, approximate=False), "silu": jax.nn.silu}[name]
    x = jnp.linspace(-8.0, 8.0, 4001, dtype=jnp.float32)
    x_in = x.astype(dtype)
    y, jitted = _eager_and_jitted(act, x_in)
    np.testing.assert_array_equal(np.asarray(jitted, np.float32), np.asarray(y, np.float32))
    assert y.dtype == dtype
    # float32 math rounded once, as torch's CUDA kernels under autocast: the correctly rounded
    # result (op-by-op bf16 math missed 30% of them). Below x = -5, 1 + erf cancels in float32,
    # in torch's formula as in ours, so GELU's tiny values there are compared loosely.
    exact = ACTIVATIONS_IN_FLOAT64[name](np.asarray(x_in, np.float64))
    correctly_rounded = np.asarray(jnp.asarray(exact, jnp.float32).astype(dtype), np.float64)
    if dtype == jnp.bfloat16:
        above = np.asarray(x) >= -5.0
        assert (np.asarray(y, np.float64) == correctly_rounded)[above].mean() >= 0.99
    rtol = 1e-5 if dtype == jnp.float32 else 2.0**-8  # bf16: within one unit in the last place
    np.testing.assert_allclose(np.asarray(y, np.float64), exact, rtol=rtol, atol=1e-6)
    ref = jax.vmap(jax.grad(plain))(x)
    ours = jax.vmap(jax.grad(lambda x: act(x.astype(dtype)).astype(jnp.float32)))(x)
    tol = 1e-6 if dtype == jnp.float32 else 1e-2  # bf16: the input and the result rounded
    assert float(jnp.abs(ours - ref).max()) <= tol


def test_silu_in_bf16_matches_torch_bit_for_bit():
    torch = pytest.importorskip("torch")
    from mpt_jax.model import _ACTIVATIONS

    x = np.random.default_rng(7).standard_normal(20000).astype(np.float32) * 4
    expected = torch.nn.functional.silu(torch.tensor(x).bfloat16()).float().numpy()
    for ours in _eager_and_jitted(_ACTIVATIONS["silu"], jnp.asarray(x, jnp.bfloat16)):
        np.testing.assert_array_equal(np.asarray(ours, np.float32), expected)


def _biased_dense(rng, dtype):
    from mpt_jax.model import Dense

    dense = Dense(
        (256,),
        (4, 96),
        ("embed", "heads", "kv"),
        lambda key, shape: 0.06 * jax.random.normal(key, shape),
        use_bias=True,
        dtype=dtype,
        param_dtype=jnp.float32,
        rngs=nnx.Rngs(0),
    )
    dense.bias[...] = jnp.asarray(0.5 * rng.standard_normal((4, 96)), jnp.float32)
    return dense


def test_biased_projection_rounds_once_as_torch_linear_does_in_bf16():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    dense = _biased_dense(rng, jnp.bfloat16)
    x = rng.standard_normal((2, 32, 256)).astype(np.float32)
    # autocast: x, weight and bias cast to bf16, then F.linear (addmm: x W^T + b in float32)
    weight = torch.tensor(np.asarray(dense.kernel[...]).reshape(256, 384).T).bfloat16()
    bias = torch.tensor(np.asarray(dense.bias[...]).reshape(384)).bfloat16()
    expected = torch.nn.functional.linear(torch.tensor(x).bfloat16(), weight, bias).float().numpy()
    for ours in _eager_and_jitted(lambda x: dense(x), jnp.asarray(x)):
        ours = np.asarray(ours, np.float32).reshape(2, 32, 384)
        # bit for bit but where float32 summation order tips a rounding (rounding x W and then
        # adding b in bf16 differed in 30% of outputs)
        differs = ours != expected
        assert differs.mean() <= 1e-3, differs.mean()
        one_ulp = 2.0 ** (np.floor(np.log2(np.abs(expected) + 1e-30)) - 7)
        assert np.all(np.abs(ours - expected) <= one_ulp)


def test_biased_projection_gradients_match_autodiff_and_multiply_in_bf16():
    from mpt_jax.model import _biased_dot

    rng = np.random.default_rng(12)
    x = jnp.asarray(rng.standard_normal((2, 32, 256)), jnp.float32)
    kernel = jnp.asarray(0.06 * rng.standard_normal((256, 4, 96)), jnp.float32)
    bias = jnp.asarray(0.5 * rng.standard_normal((4, 96)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((2, 32, 4, 96)), jnp.float32)
    dims = (((2,), (0,)), ((), ()))

    def ours(x, kernel, bias):
        bf16 = jnp.bfloat16
        y = _biased_dot(x.astype(bf16), kernel.astype(bf16), bias.astype(bf16), dims)
        return jnp.sum(y.astype(jnp.float32) * g)

    def reference(x, kernel, bias):
        return jnp.sum((jnp.einsum("bsd,dhk->bshk", x, kernel) + bias[None, None]) * g)

    grads = jax.grad(ours, argnums=(0, 1, 2))(x, kernel, bias)
    ref = jax.grad(reference, argnums=(0, 1, 2))(x, kernel, bias)
    for name, a, b in zip(("dx", "dkernel", "dbias"), grads, ref, strict=True):
        assert a.dtype == b.dtype, name
        assert float(jnp.abs(a - b).max() / jnp.abs(b).max()) <= 1e-2, name
    # every matmul of the backward takes bf16 operands: autodiff of the float32-output matmul
    # fed it a float32 gradient, which XLA's GPU compiler multiplies in float32
    jaxpr = jax.make_jaxpr(jax.grad(ours, argnums=(0, 1, 2)))(x, kernel, bias)
    dots = [e for e in _all_eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
    assert len(dots) == 3  # the forward, dx and dkernel: none run twice
    for eqn in dots:
        assert {v.aval.dtype for v in eqn.invars} == {jnp.dtype(jnp.bfloat16)}, eqn


@pytest.mark.parametrize("remat, forward_matmuls", [("dots_saveable", 1), ("full", 2)])
def test_dots_saveable_keeps_the_biased_projection(remat, forward_matmuls):
    from mpt_jax.model import REMAT_POLICIES

    rng = np.random.default_rng(13)
    graphdef, state = nnx.split(_biased_dense(rng, jnp.bfloat16))

    def loss(x, state):
        return jnp.sum(jax.nn.gelu(nnx.merge(graphdef, state)(x)).astype(jnp.float32))

    x = jnp.ones((4, 256), jnp.float32)
    step = jax.grad(jax.checkpoint(loss, policy=REMAT_POLICIES[remat]), argnums=1)
    # the projection's float32-output matmul: run once and kept, or run again in the backward
    jaxpr = jax.make_jaxpr(step)(x, state).jaxpr
    found = [
        e
        for e in _all_eqns(jaxpr)
        if e.primitive.name == "dot_general" and e.params["preferred_element_type"] == jnp.float32
    ]
    assert len(found) == forward_matmuls


def _all_eqns(jaxpr):
    """Every equation of a jaxpr and of its sub-jaxprs (custom_vjp, pjit, ...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(sub, "jaxpr", sub)  # a closed jaxpr's, or a jaxpr itself
                if hasattr(inner, "eqns"):
                    yield from _all_eqns(inner)


def test_init_statistics_match_llm_foundry_kaiming_default():
    d, L = 256, 4
    cfg = ModelConfig(d_model=d, n_heads=4, n_layers=L, vocab_size=4096, max_seq_len=512)
    tensors = dict(MPTForCausalLM(cfg, rngs=nnx.Rngs(0)).hf_tensors())
    resid = math.sqrt(2 * L)
    expected_std = {
        "attn.Wqkv.weight": math.sqrt(2 / d),
        "attn.out_proj.weight": math.sqrt(2 / d) / resid,
        "ffn.up_proj.weight": math.sqrt(2 / d),
        "ffn.down_proj.weight": math.sqrt(2 / (4 * d)) / resid,
    }
    for suffix, std in expected_std.items():
        values = np.concatenate(
            [tensors[f"transformer.blocks.{i}.{suffix}"].ravel() for i in range(L)]
        )
        assert abs(values.std() / std - 1) < 0.02, suffix
        assert abs(values.mean()) < 0.05 * std, suffix
    for emb in ("transformer.wte.weight", "transformer.wpe.weight"):
        assert abs(tensors[emb].std() / math.sqrt(2 / d) - 1) < 0.02, emb
    for name, t in tensors.items():
        if name.endswith(".bias"):
            assert not t.any(), name
        elif "norm" in name:
            assert np.all(t == 1), name
    # independent draws per layer
    w0, w1 = (tensors[f"transformer.blocks.{i}.attn.Wqkv.weight"] for i in (0, 1))
    assert abs(np.corrcoef(w0.ravel(), w1.ravel())[0, 1]) < 0.02


def test_init_config_variants():
    base = dict(d_model=128, n_heads=4, n_layers=2, vocab_size=2048, max_seq_len=16)

    def tensors(init_config):
        cfg = ModelConfig.from_dict({**base, "init_config": init_config})
        return dict(MPTForCausalLM(cfg, rngs=nnx.Rngs(0)).hf_tensors())

    assert abs(tensors({"emb_init_std": 0.02})["transformer.wte.weight"].std() / 0.02 - 1) < 0.02
    wte = tensors({"emb_init_uniform_lim": 0.1})["transformer.wte.weight"]
    assert wte.min() >= -0.1 and wte.max() <= 0.1 and wte.std() > 0.05
    small = tensors({"name": "small_init_"})
    std = math.sqrt(2 / (5 * 128))
    assert abs(small["transformer.blocks.0.ffn.up_proj.weight"].std() / std - 1) < 0.03
    down = small["transformer.blocks.0.ffn.down_proj.weight"].std()
    assert abs(down / (std / math.sqrt(4)) - 1) < 0.03  # residual: / sqrt(2 * n_layers)
    baseline = tensors({"name": "baseline_", "init_std": 0.01, "init_div_is_residual": False})
    assert abs(baseline["transformer.blocks.1.attn.out_proj.weight"].std() / 0.01 - 1) < 0.03


def test_sequence_longer_than_max_seq_len_is_refused():
    model = MPTForCausalLM(ModelConfig(**BASE), rngs=nnx.Rngs(0))
    with pytest.raises(
        ValueError, match=r"input_ids: sequence length 33 exceeds model\.max_seq_len \(32\)"
    ):
        model(jnp.zeros((1, 33), jnp.int32))


def test_dropout_only_with_key_and_reproducible():
    cfg = ModelConfig(**BASE, resid_pdrop=0.2, emb_pdrop=0.1, attn_pdrop=0.3)
    model = MPTForCausalLM(cfg, rngs=nnx.Rngs(0))
    ids = jnp.asarray(_ids(cfg))
    quiet = ModelConfig(**BASE)
    same_weights = MPTForCausalLM(quiet, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(forward(model, ids), forward(same_weights, ids))
    k1, k2 = jax.random.key(1), jax.random.key(2)
    a, b, c = (np.asarray(model(ids, dropout_key=k)) for k in (k1, k1, k2))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3 and np.abs(a - np.asarray(model(ids))).max() > 1e-3


def test_embedding_fraction_scales_embedding_gradient_only():
    fields = dict(**BASE, tie_word_embeddings=False, learned_pos_emb=False, alibi=True)
    ids = jnp.asarray(_ids(ModelConfig(**fields)))

    def wte_grad(fraction):
        model = MPTForCausalLM(ModelConfig(**fields, embedding_fraction=fraction), rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model, nnx.Param)
        fn = lambda p: causal_lm_loss(nnx.merge(graphdef, p)(ids), ids)
        value, grads = jax.jit(jax.value_and_grad(fn))(params)
        return float(value), np.asarray(grads["wte"]["embedding"][...])

    l_full, g_full = wte_grad(1.0)
    l_frac, g_frac = wte_grad(0.25)
    assert l_full == pytest.approx(l_frac, abs=1e-6)
    np.testing.assert_allclose(g_frac, 0.25 * g_full, rtol=1e-4, atol=1e-9)


def test_bf16_embedding_with_positions_and_fraction_rounds_as_torch():
    torch = pytest.importorskip("torch")
    # train.mixed_precision PURE: the embedding tables are bf16, so is the stream they start
    fields = dict(**BASE, embedding_fraction=0.3)
    model = MPTForCausalLM(ModelConfig(**fields), rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    graphdef, params = nnx.split(model, nnx.Param)
    bf16_model = nnx.merge(graphdef, jax.tree.map(lambda p: p.astype(jnp.bfloat16), params))
    ids = np.asarray(_ids(model.config))
    positions = jnp.arange(ids.shape[1])[None]
    pos_emb = bf16_model.wpe(positions)

    def embed(ids, pos_emb):
        return bf16_model._embed(ids, pos_emb, None)

    # llm-foundry: x = wte[ids] + wpe[pos]; x = x * f + x.detach() * (1 - f), each op in bf16
    wte = torch.tensor(np.asarray(params["wte"]["embedding"][...])).bfloat16()
    wpe = torch.tensor(np.asarray(params["wpe"]["embedding"][...])).bfloat16()
    x = wte[torch.tensor(ids)] + wpe[torch.arange(ids.shape[1])][None]
    expected = (x * 0.3 + x.detach() * (1 - 0.3)).float().numpy()
    for ours in _eager_and_jitted(embed, jnp.asarray(ids), pos_emb):
        assert ours.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(ours, np.float32), expected)


def test_loss_matches_torch_cross_entropy_with_ignore_index():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 7, 11)).astype(np.float32)
    labels = rng.integers(0, 11, (3, 7))
    labels[0, 2] = labels[2, 5] = -100
    targets = np.roll(labels, -1, axis=1)
    targets[:, -1] = -100
    ref = torch.nn.functional.cross_entropy(
        torch.tensor(logits).reshape(-1, 11), torch.tensor(targets).reshape(-1), ignore_index=-100
    )
    ours = causal_lm_loss(jnp.asarray(logits), jnp.asarray(labels))
    assert float(ours) == pytest.approx(float(ref), rel=1e-6)
    everything_ignored = np.full((2, 4), -100)
    assert (
        float(causal_lm_loss(jnp.asarray(logits[:2, :4]), jnp.asarray(everything_ignored))) == 0.0
    )


def test_chunked_loss_gradients_equal_autodiff_of_the_scaled_bf16_logits():
    from mpt_jax.loss import chunked_cross_entropy_sum, cross_entropy_sum
    from mpt_jax.rounding import scaled

    rng = np.random.default_rng(3)
    h = jnp.asarray(rng.standard_normal((2, 20, 32)), jnp.bfloat16)
    w = jnp.asarray(0.3 * rng.standard_normal((32, 50)), jnp.bfloat16)
    targets = jnp.asarray(rng.integers(0, 50, (2, 20)))
    scale = 0.3  # not a bf16 number: its rounding would show

    def whole(h, w):  # the model's head and loss, differentiated by JAX
        return cross_entropy_sum(scaled(jnp.einsum("bsd,dv->bsv", h, w), scale), targets)[0]

    def chunked(h, w):
        return chunked_cross_entropy_sum(h, w, targets, chunk=8, logit_scale=scale)[0]

    ours = jax.grad(chunked, argnums=(0, 1))(h, w)
    ref = jax.grad(whole, argnums=(0, 1))(h, w)
    np.testing.assert_allclose(float(chunked(h, w)), float(whole(h, w)), rtol=1e-6)
    for a, b in zip(ours, ref, strict=True):
        assert a.dtype == b.dtype == jnp.bfloat16
        # the same products in another order of chunks: at most a bf16 ulp apart
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=8e-3)
        assert np.mean(np.asarray(a) != np.asarray(b)) < 0.05
