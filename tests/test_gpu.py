"""GPU checks: fused attention (cuDNN, our Pallas kernels, tokamax) against XLA, model parity."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import (
    forward,
    out_and_grads_fn,
    packed_segments,
    random_hf_tensors,
    relative_error,
    write_hf_folder,
)
from mpt_numpy_reference import mpt_forward

from mpt_jax import MPTForCausalLM, from_pretrained
from mpt_jax.attention import alibi_slopes, attention, attention_qkv
from mpt_jax.config import ModelConfig
from mpt_jax.kernels import flash_attention as flash_attention_module
from mpt_jax.kernels import flash_attention_mgpu as hopper
from mpt_jax.kernels.flash_attention import (
    Tiling,
    Tilings,
    flash_attention,
    flash_attention_qkv,
)

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize(("heads", "kv_heads", "segments"), [(16, 16, False), (12, 4, True)])
def test_cudnn_attention_matches_xla_reference(heads, kv_heads, segments):
    rng = np.random.default_rng(0)
    B, S, K = 2, 256, 64
    q = jnp.asarray(rng.standard_normal((B, S, heads, K)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((B, S, kv_heads, K)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((B, S, kv_heads, K)), jnp.bfloat16)
    seg = jnp.asarray(packed_segments(B, S)) if segments else None
    kw = dict(alibi_slopes=alibi_slopes(heads), segment_ids=seg, causal=True)
    ref = attention(q, k, v, impl="xla", **kw).astype(jnp.float32)
    out = jax.jit(lambda q, k, v: attention(q, k, v, impl="cudnn", **kw))(q, k, v)
    err = float(jnp.abs(out.astype(jnp.float32) - ref).max())
    assert err < 2e-2, err


def test_model_parity_on_gpu_fp32_and_bf16(tmp_path):
    cfg = ModelConfig(
        d_model=256,
        n_heads=4,
        n_layers=2,
        vocab_size=512,
        max_seq_len=128,
        alibi=True,
        learned_pos_emb=False,
        no_bias=True,
    )
    tensors = random_hf_tensors(cfg)
    folder = write_hf_folder(cfg, tensors, tmp_path / "m")
    ids = np.random.default_rng(0).integers(0, 512, (2, 128))
    ref = mpt_forward(cfg.to_dict(), tensors, ids)
    with jax.default_matmul_precision("highest"):
        fp32 = forward(from_pretrained(folder, attn_impl="xla"), ids)
    assert np.abs(fp32 - ref).max() <= 1e-4
    for impl in ("xla", "cudnn", "pallas_gpu"):
        bf16 = forward(from_pretrained(folder, dtype=jnp.bfloat16, attn_impl=impl), ids)
        rel = np.linalg.norm(bf16.astype(np.float64) - ref) / np.linalg.norm(ref)
        assert rel <= 1e-2, (impl, rel)


def test_memory_statistics_on_gpu():
    from mpt_jax.memory import memory_in_use_gib

    x = jnp.ones((256, 2**20), jnp.float32)  # 1 GiB
    memory = memory_in_use_gib(jax.local_devices())
    assert memory["memory_gib"] >= 1.0 and memory["peak_memory_gib"] >= memory["memory_gib"]
    del x


def test_train_gradient_runs_under_jit_on_gpu():
    cfg = ModelConfig(
        d_model=128,
        n_heads=2,
        n_layers=2,
        vocab_size=256,
        max_seq_len=64,
        alibi=True,
        learned_pos_emb=False,
        scan_layers=True,
    )
    model = MPTForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    graphdef, params = nnx.split(model, nnx.Param)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 64)))

    from mpt_jax.loss import causal_lm_loss

    loss, grads = jax.jit(
        jax.value_and_grad(lambda p: causal_lm_loss(nnx.merge(graphdef, p)(ids), ids))
    )(params)
    assert np.isfinite(float(loss)) and abs(float(loss) - np.log(256)) < 2.0
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("D", [2048, 2560])  # MPT-1B's width, and MPT-3B's (not a power of 2)
def test_fused_norm_kernels_match_the_model_norm_on_gpu(D):
    from mpt_jax.kernels.layer_norm import fused_norm
    from mpt_jax.model import _norm

    rng = np.random.default_rng(D)
    x, g_skip = (jnp.asarray(rng.standard_normal((4, 1000, D)) * 3 + 1, jnp.float32) for _ in "ab")
    h, g_y = (jnp.asarray(rng.standard_normal((4, 1000, D)), jnp.bfloat16) for _ in "ab")
    scale = jnp.asarray(1 + 0.2 * rng.standard_normal(D), jnp.float32)

    def loss(norm):
        def total(x, h, scale):
            s, y = norm(x, h, scale)
            return (s * g_skip).sum() + (y.astype(jnp.float32) * g_y).sum(), y

        return jax.jit(jax.value_and_grad(total, argnums=(0, 1, 2), has_aux=True))

    def xla(x, h, scale):
        s = x + h
        return s, _norm(s.astype(jnp.bfloat16), scale, None, 1e-5, False, jnp.bfloat16)

    def ours(x, h, scale):
        return fused_norm(x, scale, h=h, eps=1e-5, dtype=jnp.bfloat16, skip=True)

    (_, y), grads = loss(ours)(x, h, scale)
    (_, ref_y), ref_grads = loss(xla)(x, h, scale)
    assert relative_error(y, ref_y) < 1e-2
    for ours_grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert relative_error(ours_grad, ref_grad) < 1e-2


def test_auto_picks_the_pallas_kernel_for_alibi_and_cudnn_without():
    from mpt_jax.attention import auto_impl

    q = jnp.zeros((1, 128, 4, 64), jnp.bfloat16)
    assert auto_impl(q, 0.0, alibi=True) == "pallas_gpu"
    assert auto_impl(q, 0.0, alibi=False) == "cudnn"
    assert auto_impl(q.astype(jnp.float32), 0.0, alibi=True) == "xla"


GPU_ATTENTION = {
    # name: (attention impl, Tilings of our kernel or None)
    "pallas_gpu": ("pallas_gpu", None),
    "pallas_gpu_own_tilings": (
        "pallas_gpu",
        # dk/dv accumulators of a 128-key block would not fit 4 warps' registers at head dim 128
        Tilings(fwd=Tiling(128, 64, 8, 2), dq=Tiling(64, 32), dkv=Tiling(32, 64, 4, 2)),
    ),
    "tokamax": ("tokamax", None),
    # q, k and v read in place from one fused (B, S, H + 2G, K) array, as the model calls it
    "pallas_gpu_fused_qkv": ("pallas_gpu_fused_qkv", None),
    # the same with GQA's dk/dv grouped (one program per kv head's key block), which these
    # small shapes would not choose by themselves; head dims 128 and 64 only
    "pallas_gpu_fused_qkv_grouped_dkdv": ("pallas_gpu_fused_qkv", None),
}


def _for_head_dim(tilings: Tilings, head_dim: int) -> Tilings:
    """Blocks divided by head_dim / 128 above 128, as default_tilings does (shared memory)."""
    div = max(head_dim // 128, 1)

    def shrink(t: Tiling) -> Tiling:
        return Tiling(t.block_q // div, t.block_k // div, t.num_warps, t.num_stages)

    return Tilings(shrink(tilings.fwd), shrink(tilings.dq), shrink(tilings.dkv))


@pytest.mark.parametrize("head_dim", [128, 112, 64, 256])
@pytest.mark.parametrize("name", sorted(GPU_ATTENTION))
def test_fused_attention_matches_xla_reference_in_bf16(name, head_dim, monkeypatch):
    impl, tilings = GPU_ATTENTION[name]
    if name.endswith("_grouped_dkdv"):
        if head_dim not in (128, 64):
            pytest.skip("grouped dk/dv: head dims 128 and 64 only")
        monkeypatch.setattr(flash_attention_module, "_MIN_GROUPED_PROGRAMS", 0)
    tilings = tilings and _for_head_dim(tilings, head_dim)
    if impl == "tokamax":
        pytest.importorskip("tokamax")
    rng = np.random.default_rng(head_dim)
    B, S, H, G, K = 2, 1000, 16, 4, head_dim
    q, k, v = (jnp.asarray(rng.standard_normal((B, S, n, K)), jnp.bfloat16) for n in (H, G, G))
    do = jnp.asarray(rng.standard_normal((B, S, H, K)), jnp.float32)
    kw = dict(alibi_slopes=alibi_slopes(H), segment_ids=jnp.asarray(packed_segments(B, S)))

    def attend(q, k, v, impl):
        if impl == "pallas_gpu" and tilings is not None:  # the XLA reference stays XLA
            return flash_attention(q, k, v, causal=True, tilings=tilings, **kw)
        if impl == "pallas_gpu_fused_qkv":
            qkv = jnp.concatenate([q, k, v], axis=2)
            return flash_attention_qkv(qkv, n_kv_heads=k.shape[2], causal=True, **kw)
        return attention(q, k, v, impl=impl, causal=True, **kw)

    def out_and_grads(impl, *qkv):
        return out_and_grads_fn(functools.partial(attend, impl=impl), do)(*qkv)

    # the reference in fp32 from the same bf16 inputs
    ref = out_and_grads("xla", *(x.astype(jnp.float32) for x in (q, k, v)))
    # tokamax broadcasts its mask ranges by rank promotion, also in a kernel's backward (traced
    # after attention() returns); conftest makes rank promotion an error
    with jax.numpy_rank_promotion("allow"):
        ours = out_and_grads(impl, q, k, v)
        hlo = jax.jit(lambda q, k, v: attend(q, k, v, impl)).lower(q, k, v)
    kernels = sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo.as_text("hlo"))))
    for label, x, r in zip(
        ("out", "dq", "dk", "dv"), (ours[0], *ours[1]), (ref[0], *ref[1]), strict=True
    ):
        assert x.dtype == jnp.bfloat16, (label, x.dtype)
        assert np.isfinite(x).all(), (label, kernels)
        rel = relative_error(x, r)
        assert rel <= 2e-2, (label, rel, kernels)


# 64-key forward blocks in 4-slot rings, 4-slot backward rings
DEEP_RINGS = {"block_kv": 64, "stages": 4, "bwd_stages": 4}
HOPPER_CASES = {
    # causal, ALiBi, H, G, K, q k v read from one fused array (as the model calls it),
    # a tiling other than the default (what `bench_attention.py --tune-hopper` tries)
    "causal_alibi_gqa_128": (True, True, 16, 4, 128, False, None),
    "causal_alibi_gqa_128_fused_qkv": (True, True, 16, 4, 128, True, None),
    "causal_alibi_64": (True, True, 8, 8, 64, False, None),
    "causal_no_alibi_gqa_128": (True, False, 8, 2, 128, False, None),
    "not_causal_alibi_mqa_64": (False, True, 8, 1, 64, False, None),
    "causal_alibi_gqa_128_bwd_x2": (True, True, 16, 4, 128, False, {"bwd_warpgroups": 2}),
    "causal_alibi_gqa_128_deep_rings": (True, True, 16, 4, 128, False, DEEP_RINGS),
    "causal_alibi_gqa_128_two_bwd_launches": (True, True, 16, 4, 128, False, {"bwd_launches": 2}),
}


@pytest.mark.parametrize("case", sorted(HOPPER_CASES))
def test_hopper_kernels_match_xla_reference_in_bf16(case):
    if not str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9"):
        pytest.skip("our Mosaic GPU kernels are written for Hopper (sm90)")
    causal, alibi, H, G, K, fused, tiling_fields = HOPPER_CASES[case]
    rng = np.random.default_rng(K + H)
    B, S = 2, 1024
    q, k, v = (jnp.asarray(rng.standard_normal((B, S, n, K)), jnp.bfloat16) for n in (H, G, G))
    do = jnp.asarray(rng.standard_normal((B, S, H, K)), jnp.float32)
    kw = dict(alibi_slopes=alibi_slopes(H) if alibi else None, causal=causal)

    def attend(q, k, v, impl):
        if fused and impl == "pallas_mgpu":
            qkv = jnp.concatenate([q, k, v], axis=2)
            return attention_qkv(qkv, n_kv_heads=G, impl=impl, **kw)
        if tiling_fields and impl == "pallas_mgpu":
            tiling = hopper.HopperTiling(**tiling_fields)
            return hopper.flash_attention_mgpu(q, k, v, tiling=tiling, **kw)
        return attention(q, k, v, impl=impl, **kw)

    def out_and_grads(impl, *qkv):
        return out_and_grads_fn(functools.partial(attend, impl=impl), do)(*qkv)

    ref = out_and_grads("xla", *(x.astype(jnp.float32) for x in (q, k, v)))
    ours = out_and_grads("pallas_mgpu", q, k, v)
    for label, x, r in zip(
        ("out", "dq", "dk", "dv"), (ours[0], *ours[1]), (ref[0], *ref[1]), strict=True
    ):
        assert x.dtype == jnp.bfloat16, (label, x.dtype)
        rel = relative_error(x, r)  # NaN (an unwritten or unsynchronized block) never passes
        assert rel <= 2e-2, (label, rel)
