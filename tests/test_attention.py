"""attention(): ALiBi slopes, GQA, segment masking, the ALiBi form, argument errors, tokamax."""

import math
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import out_and_grads_fn, packed_segments, relative_error

from mpt_jax.attention import alibi_slopes, attention


def closed_form_slopes(n: int, bias_max: float = 8) -> np.ndarray:
    """The ALiBi paper's slopes: geometric for powers of two, interleaved otherwise."""

    def pow2(m: int) -> list[float]:
        return [2.0 ** (-bias_max * (h + 1) / m) for h in range(m)]

    if math.log2(n).is_integer():
        return np.array(pow2(n))
    closest = 2 ** math.floor(math.log2(n))
    return np.array(pow2(closest) + pow2(2 * closest)[0::2][: n - closest])


@pytest.mark.parametrize("n_heads", [1, 4, 8, 12, 16, 20, 32, 40, 56, 64])
def test_alibi_slopes_closed_form(n_heads):
    np.testing.assert_allclose(alibi_slopes(n_heads), closed_form_slopes(n_heads), rtol=1e-6)
    assert alibi_slopes(n_heads).dtype == np.float32


def test_alibi_slopes_match_transformers():
    torch = pytest.importorskip("torch")
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    for n_heads in (12, 16, 20):
        bias = build_mpt_alibi_tensor(n_heads, 8, alibi_bias_max=8)  # (H, 1, S): slope * (j - 7)
        theirs = (bias[:, 0, 0] / -7.0).to(torch.float32).numpy()
        np.testing.assert_allclose(alibi_slopes(n_heads), theirs, rtol=1e-6)


def _qkv(B=2, S=20, H=8, G=8, K=16, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((B, S, H, K)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, S, G, K)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, S, G, K)), jnp.float32)
    return q, k, v


def naive(q, k, v, slopes, causal, scale, key_form=False):
    """Dense per-head reference repeating kv heads; key_form: ALiBi as llm-foundry's torch path."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    S, H = q.shape[1], q.shape[2]
    r = H // k.shape[2]
    k, v = np.repeat(k, r, axis=2), np.repeat(v, r, axis=2)
    s = np.einsum("bshk,bthk->bhst", q, k) * scale
    i, j = np.arange(S)[:, None], np.arange(S)[None, :]
    if slopes is not None:
        dist = (j - (S - 1)) if key_form else -np.abs(i - j)
        s = s + np.asarray(slopes, np.float64)[None, :, None, None] * dist
    if causal:
        s = np.where(i >= j, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhst,bthk->bshk", p, v)


@pytest.mark.parametrize(("H", "G"), [(8, 8), (8, 2), (6, 1)])
@pytest.mark.parametrize("causal", [True, False])
def test_xla_attention_matches_naive_reference(H, G, causal):
    q, k, v = _qkv(H=H, G=G)
    slopes = alibi_slopes(H)
    out = attention(q, k, v, alibi_slopes=slopes, causal=causal, impl="xla", softmax_scale=0.3)
    ref = naive(q, k, v, slopes, causal, 0.3)
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5)
    if causal:  # MPT's key-position ALiBi gives the same causal softmax
        np.testing.assert_allclose(ref, naive(q, k, v, slopes, True, 0.3, key_form=True), atol=1e-9)


def test_segment_ids_confine_attention_to_each_document():
    q, k, v = _qkv(B=1, S=12)
    seg = jnp.asarray([[0] * 5 + [1] * 7])
    out = np.asarray(attention(q, k, v, alibi_slopes=alibi_slopes(8), segment_ids=seg))
    first = attention(q[:, :5], k[:, :5], v[:, :5], alibi_slopes=alibi_slopes(8))
    second = attention(q[:, 5:], k[:, 5:], v[:, 5:], alibi_slopes=alibi_slopes(8))
    np.testing.assert_allclose(out[:, :5], np.asarray(first), atol=1e-6)
    np.testing.assert_allclose(out[:, 5:], np.asarray(second), atol=1e-6)


def test_default_scale_and_argument_errors():
    q, k, v = _qkv(K=16)
    default = attention(q, k, v, impl="xla")
    explicit = attention(q, k, v, impl="xla", softmax_scale=0.25)
    np.testing.assert_array_equal(np.asarray(default), np.asarray(explicit))
    with pytest.raises(
        ValueError,
        match="must be one of auto, xla, cudnn, pallas_gpu, pallas_mgpu, pallas_tpu, tokamax",
    ):
        attention(q, k, v, impl="flash")
    with pytest.raises(ValueError, match="'pallas_tpu': attention dropout is not supported"):
        attention(q, k, v, impl="pallas_tpu", dropout_rate=0.1, dropout_key=jax.random.key(0))
    with pytest.raises(ValueError, match="not a multiple of 3 kv heads"):
        attention(q, k[:, :, :3], v[:, :, :3])
    with pytest.raises(ValueError, match="needs a dropout_key"):
        attention(q, k, v, dropout_rate=0.1)


@pytest.mark.parametrize("impl", ["xla", "pallas_gpu", "pallas_tpu"])
def test_inconsistent_arguments_are_one_line_naming_them(impl):
    # the kernels would pad or clamp them: a missing slope read from a neighbouring head,
    # segment ids or a head dim padded with zeros
    q, k, v = _qkv(H=4, G=2, K=16)
    B, S = q.shape[:2]
    for kwargs, message in [
        (dict(alibi_slopes=alibi_slopes(3)), r"alibi_slopes must have shape \(4,\), one per"),
        (dict(segment_ids=jnp.ones((B, S - 1), jnp.int32)), r"segment_ids must have shape"),
        (dict(k_BTGK=k[..., :8], v_BTGK=v[..., :8]), "k and v must have q's batch and head dim"),
        (dict(v_BTGK=v[:, :-1]), "k and v must have one shape"),
        (dict(q_BSHK=q[0]), r"q, k and v must be \(batch, seq, heads, head_dim\)"),
        (dict(q_BSHK=q.astype(jnp.int32)), "q must be floating point, got int32"),
    ]:
        args = {"q_BSHK": q, "k_BTGK": k, "v_BTGK": v, **kwargs}
        with pytest.raises(ValueError, match=f"attention: {message}"):
            attention(args.pop("q_BSHK"), args.pop("k_BTGK"), args.pop("v_BTGK"), impl=impl, **args)


def test_auto_is_the_xla_reference_on_cpu():
    from mpt_jax.attention import auto_impl

    q = jnp.zeros((1, 8, 2, 16), jnp.bfloat16)
    assert auto_impl(q, 0.0, alibi=True) == "xla" and auto_impl(q, 0.0, alibi=False) == "xla"


def test_auto_picks_the_pallas_tpu_kernel_on_a_tpu(monkeypatch):
    from mpt_jax.attention import auto_impl

    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    for dtype in (jnp.bfloat16, jnp.float16, jnp.float32):
        q = jnp.zeros((1, 8, 2, 112), dtype)
        assert auto_impl(q, 0.0, alibi=True) == "pallas_tpu"
        assert auto_impl(q, 0.0, alibi=False) == "pallas_tpu"
    assert auto_impl(jnp.zeros((1, 8, 2, 64), jnp.bfloat16), 0.1, alibi=True) == "xla"
    assert auto_impl(jnp.zeros((1, 8, 2, 512), jnp.bfloat16), 0.0, alibi=True) == "xla"
    # queries that are the last S of T keys: the kernels take S == T only, so auto goes to XLA
    q, k, v = _qkv(K=16)
    slopes = jnp.linspace(0.5, 0.01, q.shape[2])
    q_tail = q[:, -3:]
    ours = attention(q_tail, k, v, alibi_slopes=slopes)
    full = attention(q, k, v, alibi_slopes=slopes, impl="xla")[:, -3:]
    np.testing.assert_allclose(np.asarray(ours), np.asarray(full), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"'pallas_tpu': needs equal query and key lengths"):
        attention(q_tail, k, v, alibi_slopes=slopes, impl="pallas_tpu")


TOKAMAX_CASES = {
    # B, S, H, G, K, ALiBi, segments, causal
    "alibi_causal_6_heads": (2, 200, 6, 6, 16, True, False, True),
    "alibi_gqa_8_over_2_packed_ragged": (2, 200, 8, 2, 32, True, True, True),
    "mqa_packed_not_causal_no_alibi": (2, 200, 4, 1, 16, False, True, False),
}


@pytest.mark.parametrize("case", sorted(TOKAMAX_CASES))
def test_tokamax_matches_xla_forward_and_gradients(case):
    pytest.importorskip("tokamax")
    B, S, H, G, K, alibi, segments, causal = TOKAMAX_CASES[case]
    q, k, v = _qkv(B=B, S=S, H=H, G=G, K=K, seed=len(case))  # fresh inputs per case
    do = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
    kw = dict(
        alibi_slopes=alibi_slopes(H) if alibi else None,
        segment_ids=jnp.asarray(packed_segments(B, S)) if segments else None,
        causal=causal,
        softmax_scale=0.3,
    )
    tokamax = out_and_grads_fn(lambda q, k, v: attention(q, k, v, impl="tokamax", **kw), do)
    out, grads = tokamax(q, k, v)
    ref_out, ref_grads = out_and_grads_fn(lambda q, k, v: attention(q, k, v, impl="xla", **kw), do)(
        q, k, v
    )
    assert out.shape == (B, S, H, K) and out.dtype == jnp.float32
    for name, ours, ref in zip(
        ("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads), strict=True
    ):
        err = relative_error(ours, ref)
        assert err <= 1e-5, (name, err)


def test_tokamax_argument_errors(monkeypatch):
    q, k, v = _qkv(H=4, G=2)
    with monkeypatch.context() as m:
        for name in [n for n in sys.modules if n.split(".")[0] == "tokamax"] + ["tokamax"]:
            m.setitem(sys.modules, name, None)  # as if not installed
        with pytest.raises(ImportError, match=r"pip install 'mpt-jax\[tokamax\]'"):
            attention(q, k, v, impl="tokamax")
    pytest.importorskip("tokamax")
    with pytest.raises(ValueError, match="'tokamax' supports ALiBi only with causal attention"):
        attention(q, k, v, impl="tokamax", alibi_slopes=alibi_slopes(4), causal=False)
    with pytest.raises(ValueError, match="'tokamax': attention dropout is not supported"):
        attention(q, k, v, impl="tokamax", dropout_rate=0.1, dropout_key=jax.random.key(0))
    with pytest.raises(ValueError, match="query_offset and kv_mask need impl 'xla'"):
        attention(q, k, v, impl="tokamax", query_offset=0)
    # its XLA reference wants fp16 products with fp32 results, which XLA's CPU lacks
    half = [x.astype(jnp.float16) for x in (q, k, v)]
    with pytest.raises(ValueError, match="'tokamax': float16 runs on a GPU only"):
        attention(*half, impl="tokamax")


def test_tokamax_falls_back_when_a_gpu_kernel_does_not_trace(monkeypatch):
    pytest.importorskip("tokamax")
    from tokamax._src.ops.attention import api as tokamax_api

    import mpt_jax.attention as attention_lib

    def mosaic_gpu(*args, **kwargs):  # as tokamax 0.0.12's fails on a sequence of 1000 (H200)
        raise ValueError("einshape: the sequence is not a multiple of the block")

    impls = dict(tokamax_api.IMPLEMENTATIONS, mosaic_gpu=mosaic_gpu)
    impls["triton"] = tokamax_api.IMPLEMENTATIONS["xla"]  # runs on this CPU
    monkeypatch.setattr(tokamax_api, "IMPLEMENTATIONS", impls)
    monkeypatch.setattr(attention_lib, "backend", lambda: "gpu")
    q, k, v = _qkv(H=4, G=2)
    kw = dict(alibi_slopes=alibi_slopes(4), causal=True)
    out = attention(q, k, v, impl="tokamax", **kw)
    assert relative_error(out, attention(q, k, v, impl="xla", **kw)) <= 1e-5
    impls["triton"] = mosaic_gpu  # the last implementation's own error reaches the caller
    with pytest.raises(ValueError, match="not a multiple of the block"):
        attention(q, k, v, impl="tokamax", **kw)


MESH_CASES = {
    # impl, fused qkv, H, G: heads split over tensor (2) wherever H and G allow it
    "pallas_gpu_fused_mha": ("pallas_gpu", True, 4, 4),
    "pallas_gpu_fused_gqa": ("pallas_gpu", True, 4, 2),  # split q, k and v: 2 + 1 heads each
    "pallas_gpu_mqa": ("pallas_gpu", False, 4, 1),  # q split, the one kv head whole
    "pallas_gpu_gqa_4_over_3_heads_whole": ("pallas_gpu", False, 6, 3),  # 3 kv heads: no split
    "tokamax_gqa": ("tokamax", False, 4, 2),
}


@pytest.mark.parametrize("case", sorted(MESH_CASES))
def test_kernels_on_a_mesh_split_by_batch_and_heads_give_the_single_device_results(case):
    """sharding.device_local hands each device its batch rows and heads, ALiBi slopes with them;
    sharded inputs and outputs give the single-device XLA reference's output and gradients."""
    from mpt_jax import sharding
    from mpt_jax.attention import attention_qkv
    from mpt_jax.config import MeshConfig

    impl, fused, H, G = MESH_CASES[case]
    if impl == "tokamax":
        pytest.importorskip("tokamax")
    B, S, K = 4, 40, 16
    q, k, v = _qkv(B=B, S=S, H=H, G=G, K=K, seed=len(case))
    qkv = jnp.concatenate([q, k, v], axis=2)
    do = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape), jnp.float32)
    kw = dict(alibi_slopes=alibi_slopes(H), segment_ids=jnp.asarray(packed_segments(B, S)))

    def attend(impl):
        if fused:
            return lambda qkv: attention_qkv(qkv, n_kv_heads=G, impl=impl, **kw)
        return lambda qkv: attention(*jnp.split(qkv, [H, H + G], axis=2), impl=impl, **kw)

    ref_out, (ref_grad,) = out_and_grads_fn(attend("xla"), do)(qkv)
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=1, tensor=2), jax.devices()[:4])
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None, "tensor"))
    on_mesh = out_and_grads_fn(sharding.traced_on(mesh, attend(impl)), do)
    lowered = on_mesh.lower(jax.device_put(qkv, split)).as_text()
    # the per-device computation's first argument: q's (or the fused array's) block
    block = re.search(r"manual_computation\(.*?\(%arg\d+: tensor<([\dx]+)xf32>", lowered)
    dims = [int(d) for d in block.group(1).split("x")]
    assert (dims[0], dims[-2]) == (B // 2, H if G % 2 and G > 1 else H // 2)
    out, (grad,) = on_mesh(jax.device_put(qkv, split))
    assert relative_error(out, ref_out) < 1e-5
    assert relative_error(grad, ref_grad) < 1e-5
