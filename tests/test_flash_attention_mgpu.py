"""The Hopper (Mosaic GPU) kernels on a CPU host: they lower for CUDA, their block plans cover
exactly the visible keys, their block math, driven through the same plan and score functions,
matches the XLA reference, and (jax 0.11) the kernels themselves run in the Mosaic GPU
interpreter and match it too. Their numbers on a GPU: tests/test_gpu.py."""

import math
import re

import jax
import jax.numpy as jnp
import mosaic_gpu_interpreter
import numpy as np
import pytest
from helpers import lower_for_cuda, out_and_grads_fn, relative_error

import mpt_jax.attention as attention_lib
from mpt_jax.attention import alibi_slopes, attention, attention_qkv
from mpt_jax.kernels import flash_attention_mgpu as hopper

LOG2E = math.log2(math.e)


def _lowered(fn, *avals) -> str:
    return lower_for_cuda(jax.jit(fn), *avals).as_text()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("alibi", [True, False])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "dtype"),
    [(4, 4, 128, jnp.bfloat16), (6, 2, 64, jnp.float16), (4, 1, 128, jnp.bfloat16)],
)
def test_forward_and_backward_lower_to_two_mosaic_kernels(
    causal, alibi, heads, kv_heads, head_dim, dtype
):
    B, S = 2, 512
    q = jax.ShapeDtypeStruct((B, S, heads, head_dim), dtype)
    kv = jax.ShapeDtypeStruct((B, S, kv_heads, head_dim), dtype)
    slopes = alibi_slopes(heads) if alibi else None

    def forward(q, k, v):
        return hopper.flash_attention_mgpu(q, k, v, alibi_slopes=slopes, causal=causal)

    def grads(q, k, v):
        loss = lambda *a: forward(*a).astype(jnp.float32).sum()
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    fwd_text, bwd_text = _lowered(forward, q, kv, kv), _lowered(grads, q, kv, kv)
    kernels = re.compile(r"stablehlo\.custom_call @mosaic_gpu")
    assert len(kernels.findall(fwd_text)) == 1
    assert len(kernels.findall(bwd_text)) == 2  # forward; dq and dk/dv in one launch
    assert "mpt_flash_mgpu_bwd" in bwd_text
    # memory linear in the sequence: no (S, S) array outside the kernels
    assert f"{S}x{S}" not in fwd_text and f"{S}x{S}" not in bwd_text
    # gradients come back in the inputs' shapes: GQA's sum over heads happens in the kernel
    assert f"tensor<{B}x{S}x{kv_heads}x{head_dim}x" in bwd_text


@pytest.mark.parametrize(
    ("causal", "kv_heads", "head_dim", "launches", "names"),
    [
        (True, 2, 128, 2, ("mpt_flash_mgpu_dq_x2", "mpt_flash_mgpu_dkdv_x2")),
        (False, 1, 64, 1, ("mpt_flash_mgpu_bwd_x2",)),
    ],
)
def test_two_warpgroup_backward_lowers(causal, kv_heads, head_dim, launches, names):
    # two compute warpgroups per dq and dk/dv program sharing one stream of blocks: 128 query
    # rows (keys) per program; in one launch or two
    q = jax.ShapeDtypeStruct((2, 512, 4, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 512, kv_heads, head_dim), jnp.bfloat16)
    tiling = hopper.HopperTiling(bwd_warpgroups=2, bwd_launches=launches)

    def loss(q, k, v):
        kw = dict(alibi_slopes=alibi_slopes(4), causal=causal, tiling=tiling)
        return hopper.flash_attention_mgpu(q, k, v, **kw).astype(jnp.float32).sum()

    text = _lowered(jax.grad(loss, argnums=(0, 1, 2)), q, kv, kv)
    assert len(re.findall(r"stablehlo\.custom_call @mosaic_gpu", text)) == 1 + launches
    # named apart from the one-warpgroup kernels, for profiles
    assert all(name in text for name in names)


def test_a_sequence_shorter_than_the_rings_lowers():
    # one 128-key block against two ring slots: the streaming warpgroup's static prologue
    # must not slice keys past the sequence (it did, and tracing failed)
    q = jax.ShapeDtypeStruct((1, 128, 2, 64), jnp.bfloat16)

    def loss(q, k, v):
        out = hopper.flash_attention_mgpu(q, k, v, alibi_slopes=alibi_slopes(2))
        return out.astype(jnp.float32).sum()

    text = _lowered(jax.grad(loss, argnums=(0, 1, 2)), q, q, q)
    assert len(re.findall(r"stablehlo\.custom_call @mosaic_gpu", text)) == 2


def _visible(q0, bq, k0, bk):
    """(bq, bk) bool: query i sees key j under the causal mask."""
    return (q0 + np.arange(bq))[:, None] >= (k0 + np.arange(bk))[None, :]


@pytest.mark.parametrize(("bq", "bk"), [(64, 64), (64, 128), (128, 64), (64, 192)])
def test_causal_block_plans_cover_exactly_the_visible_keys(bq, bk):
    S = 768
    n_kv, n_q = S // bk, S // bq
    for q0 in range(0, S, bq):
        free_end, end = hopper.key_steps(q0, block_q=bq, block_kv=bk, n_kv=n_kv, causal=True)
        for step in range(n_kv):
            seen = _visible(q0, bq, step * bk, bk)
            assert (step < end) == seen.any(), (q0, step)
            assert (step < free_end) == seen.all(), (q0, step)
    for k0 in range(0, S, bk):
        first, free_first = hopper.query_steps(k0, block_q=bq, block_kv=bk, n_q=n_q, causal=True)
        for qb in range(n_q):
            seen = _visible(qb * bq, bq, k0, bk)
            assert (qb >= first) == seen.any(), (k0, qb)
            assert (qb >= free_first) == seen.all(), (k0, qb)
    assert hopper.key_steps(64, block_q=bq, block_kv=bk, n_kv=n_kv, causal=False) == (n_kv, n_kv)
    assert hopper.query_steps(64, block_q=bq, block_kv=bk, n_q=n_q, causal=False) == (0, 0)


def _simulate(q, k, v, do, slopes, causal, t: hopper.HopperTiling):
    """The three kernels' block loops in numpy, through their plan, bias and score functions.

    Returns o, lse2 and the gradients dq, dk, dv, float32; every block's products as the
    kernels form them (the forward q k^T, dk/dv keys-first k q^T), in float32.
    """
    B, S, H, K = q.shape
    G = k.shape[2]
    R = H // G
    scale = 1 / math.sqrt(K)
    st = hopper._Static(scale * LOG2E, causal, slopes is not None)
    slopes = np.zeros(H, np.float32) if slopes is None else np.asarray(slopes)

    def line(slope2, n, offset):
        return hopper._alibi_line(slope2, jnp.arange(n), offset, st)

    def scores2(s, row_bias, col_bias, offset, slope2, masked, keys_first=False):
        rows, cols = np.arange(s.shape[0])[:, None], np.arange(s.shape[1])[None, :]
        d = (rows - cols if keys_first else cols - rows) + offset  # the kernels' _distance
        out = hopper._scores2(
            jnp.asarray(s), row_bias, col_bias, lambda: jnp.asarray(d), slope2, st, masked=masked
        )
        return np.asarray(out)

    o = np.zeros(q.shape, np.float32)
    lse2 = np.zeros((B, H, S), np.float32)
    bq, bk = t.block_q, t.block_kv
    for b in range(B):
        for h in range(H):
            g, slope2 = h // R, slopes[h] * LOG2E
            for q0 in range(0, S, bq):
                free_end, end = hopper.key_steps(
                    q0, block_q=bq, block_kv=bk, n_kv=S // bk, causal=causal
                )
                m = np.full(bq, -np.inf, np.float32)
                denom = np.zeros(bq, np.float32)
                acc = np.zeros((bq, K), np.float32)
                for step in range(int(end)):
                    keys, offset = slice(step * bk, (step + 1) * bk), step * bk - q0
                    s = q[b, q0 : q0 + bq, h] @ k[b, keys, g].T
                    key_part = line(slope2, bk, offset)
                    s2 = scores2(s, None, key_part, offset, slope2, step >= free_end)
                    m_new = np.maximum(m, s2.max(axis=1))
                    p = np.exp2(s2 - m_new[:, None])
                    corr = np.exp2(m - m_new)
                    acc = acc * corr[:, None] + p @ v[b, keys, g]
                    denom = denom * corr + p.sum(axis=1)
                    m = m_new
                o[b, q0 : q0 + bq, h] = acc / denom[:, None]
                lse2[b, h, q0 : q0 + bq] = np.asarray(
                    hopper._minus(m + np.log2(denom), line(slope2, bq, 0))
                )

    delta = np.einsum("bshk,bshk->bhs", o, do)
    dq = np.zeros(q.shape, np.float32)
    bq, bk = t.bwd_block_q, t.bwd_block_kv
    for b in range(B):
        for h in range(H):
            g, slope2 = h // R, slopes[h] * LOG2E
            for q0 in range(0, S, bq):
                rows = slice(q0, q0 + bq)
                free_end, end = hopper.key_steps(
                    q0, block_q=bq, block_kv=bk, n_kv=S // bk, causal=causal
                )
                neg_lse = hopper._lse_bias(jnp.asarray(lse2[b, h, rows]), line(slope2, bq, 0))
                for step in range(int(end)):
                    keys, offset = slice(step * bk, (step + 1) * bk), step * bk - q0
                    s = q[b, rows, h] @ k[b, keys, g].T
                    key_part = line(slope2, bk, offset)
                    p = np.exp2(scores2(s, neg_lse, key_part, offset, slope2, step >= free_end))
                    dp = do[b, rows, h] @ v[b, keys, g].T
                    ds = p * (dp - delta[b, h, rows][:, None])
                    dq[b, rows, h] += ds @ k[b, keys, g] * scale

    dk, dv = np.zeros(k.shape, np.float32), np.zeros(v.shape, np.float32)
    for b in range(B):
        for g in range(G):
            for k0 in range(0, S, bk):
                keys = slice(k0, k0 + bk)
                first, free_first = hopper.query_steps(
                    k0, block_q=bq, block_kv=bk, n_q=S // bq, causal=causal
                )
                for r in range(R):
                    h = g * R + r
                    slope2 = slopes[h] * LOG2E
                    key_part = line(slope2, bk, 0)
                    for qb in range(int(first), S // bq):
                        rows, offset = slice(qb * bq, (qb + 1) * bq), k0 - qb * bq
                        query_part = line(slope2, bq, -offset)
                        lse = jnp.asarray(lse2[b, h, rows])
                        col_bias = hopper._lse_bias(lse, query_part)
                        s_t = k[b, keys, g] @ q[b, rows, h].T
                        masked = qb < free_first
                        p_t = np.exp2(
                            scores2(
                                s_t, key_part, col_bias, offset, slope2, masked, keys_first=True
                            )
                        )
                        dv[b, keys, g] += p_t @ do[b, rows, h]
                        dp_t = v[b, keys, g] @ do[b, rows, h].T
                        ds_t = p_t * (dp_t - delta[b, h, rows][None, :])
                        dk[b, keys, g] += ds_t @ q[b, rows, h] * scale
    return o, lse2, dq, dk, dv


@pytest.mark.parametrize(
    ("causal", "alibi", "heads", "kv_heads", "tiling"),
    [
        (True, True, 4, 2, hopper.HopperTiling()),
        (True, True, 2, 2, hopper.HopperTiling(block_q=64, block_kv=64, bwd_block_kv=128)),
        (False, True, 2, 1, hopper.HopperTiling(bwd_block_q=128)),
        (True, False, 2, 2, hopper.HopperTiling()),
    ],
)
def test_block_math_through_the_kernels_plans_matches_xla(causal, alibi, heads, kv_heads, tiling):
    rng = np.random.default_rng(7)
    B, S, K = 1, 256, 16
    q = rng.standard_normal((B, S, heads, K)).astype(np.float32)
    k = rng.standard_normal((B, S, kv_heads, K)).astype(np.float32)
    v = rng.standard_normal((B, S, kv_heads, K)).astype(np.float32)
    do = rng.standard_normal((B, S, heads, K)).astype(np.float32)
    slopes = alibi_slopes(heads) * 4 if alibi else None  # steeper than MPT's: ALiBi matters here
    o, lse2, dq, dk, dv = _simulate(q, k, v, do, slopes, causal, tiling)

    def reference(q, k, v):
        return attention(q, k, v, impl="xla", alibi_slopes=slopes, causal=causal)

    ref, vjp = jax.vjp(reference, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    ref_dq, ref_dk, ref_dv = vjp(jnp.asarray(do))
    assert relative_error(o, ref) < 1e-5
    for ours, theirs in ((dq, ref_dq), (dk, ref_dk), (dv, ref_dv)):
        assert relative_error(ours, theirs) < 1e-4
    # the saved log-sum-exp is in log2 units of the true (ALiBi'd, scaled) scores
    i, j = np.arange(S)[:, None], np.arange(S)[None, :]
    scores = np.einsum("bihk,bjhk->bhij", q, np.repeat(k, heads // kv_heads, axis=2)) / math.sqrt(K)
    if alibi:
        scores = scores - slopes[None, :, None, None] * np.abs(i - j)
    if causal:
        scores = np.where(i >= j, scores, -np.inf)
    top = scores.max(axis=-1, keepdims=True)
    lse = (top + np.log(np.exp(scores - top).sum(axis=-1, keepdims=True)))[..., 0]
    np.testing.assert_allclose(lse2, lse * LOG2E, rtol=1e-5, atol=1e-5)


def test_unsupported_inputs_and_tilings_are_named():
    ok = ((2, 512, 4, 128), (2, 512, 2, 128))
    assert hopper.unsupported_reason(*ok, jnp.bfloat16) is None
    assert "dtype float32" in hopper.unsupported_reason(*ok, jnp.float32)
    assert "head dim 112" in hopper.unsupported_reason(
        (2, 512, 4, 112), (2, 512, 2, 112), "bfloat16"
    )
    assert "sequence length 500" in hopper.unsupported_reason(
        (2, 500, 4, 128), (2, 500, 2, 128), "bfloat16"
    )
    assert "segment ids" in hopper.unsupported_reason(
        *ok, jnp.bfloat16, segment_ids=np.zeros((2, 512))
    )
    q = jnp.zeros((1, 512, 2, 112), jnp.bfloat16)
    with pytest.raises(ValueError, match="flash_attention_mgpu: unsupported input: head dim 112"):
        hopper.flash_attention_mgpu(q, q, q)
    with pytest.raises(ValueError, match="block_kv: must be a multiple of 64"):
        hopper.HopperTiling(block_kv=96)
    with pytest.raises(ValueError, match="block_kv: must be a multiple of block_q"):
        hopper.HopperTiling(block_q=128, block_kv=64)
    with pytest.raises(ValueError, match=r"HopperTiling\.stages: must be at least 2"):
        hopper.HopperTiling(stages=1)
    with pytest.raises(ValueError, match=r"HopperTiling\.bwd_stages: must be at least 2"):
        hopper.HopperTiling(bwd_stages=1)
    with pytest.raises(ValueError, match=r"HopperTiling\.bwd_stages: must be at least 2"):
        hopper.HopperTiling(bwd_stages=0)
    assert hopper.HopperTiling(stages=3).backward_stages == 3
    assert hopper.HopperTiling(stages=3, bwd_stages=4).backward_stages == 4
    with pytest.raises(ValueError, match="bwd_warpgroups: must be 1 or 2"):
        hopper.HopperTiling(bwd_warpgroups=3)
    # two backward warpgroups of 128 keys: programs of 256 keys
    two = hopper.HopperTiling(bwd_block_kv=128, bwd_warpgroups=2)
    assert "sequence length 384 (needs a multiple of 256)" in hopper.unsupported_reason(
        (1, 384, 2, 128), (1, 384, 2, 128), "bfloat16", tiling=two
    )
    q = jnp.zeros((1, 512, 2, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="'pallas_mgpu': needs a Hopper GPU"):
        attention(q, q, q, impl="pallas_mgpu")


def test_fused_qkv_path_reads_the_projection_in_place_and_the_model_reaches_it(monkeypatch):
    from flax import nnx

    from mpt_jax import MPTForCausalLM
    from mpt_jax.config import ModelConfig

    monkeypatch.setattr(attention_lib, "backend", lambda: "gpu")  # as a GPU host builds it
    B, S, H, G, K = 2, 256, 4, 2, 64
    qkv = jax.ShapeDtypeStruct((B, S, H + 2 * G, K), jnp.bfloat16)

    def fused(qkv):
        kw = dict(n_kv_heads=G, alibi_slopes=alibi_slopes(H), impl="pallas_mgpu")
        return attention_lib.attention_qkv(qkv, **kw)

    def grad(qkv):
        return jax.grad(lambda x: fused(x).astype(jnp.float32).sum())(qkv)

    fwd_text = _lowered(fused, qkv)
    # the kernel takes the fused projection itself: nothing sliced out of it first
    assert "stablehlo.slice" not in fwd_text
    assert re.search(r"custom_call @mosaic_gpu\S*\(%arg0, %arg0, %arg0, ", fwd_text)
    bwd_text = _lowered(grad, qkv)
    fused_type = f"tensor<{B}x{S}x{H + 2 * G}x{K}xbf16>"
    backward = re.findall(r"custom_call @mosaic_gpu.*", bwd_text)[1]
    # dq, dk and dv written into the fused gradient by one launch: nothing concatenated
    assert len(re.findall(r"custom_call @mosaic_gpu", bwd_text)) == 2
    assert backward.endswith(f"-> {fused_type}") and "concatenate" not in bwd_text
    assert fused_type in bwd_text.split("return")[-1]

    cfg = ModelConfig(
        d_model=256,
        n_heads=4,
        n_layers=2,
        vocab_size=128,
        max_seq_len=S,
        alibi=True,
        learned_pos_emb=False,
        no_bias=True,
        attn_impl="pallas_mgpu",
    )
    model = MPTForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    graphdef, params = nnx.split(model)
    ids = jax.ShapeDtypeStruct((B, S), jnp.int32)
    text = _lowered(lambda p, ids: nnx.merge(graphdef, p)(ids), params, ids)
    assert len(re.findall(r"custom_call @mosaic_gpu", text)) == cfg.n_layers


# 64-key forward blocks (each tile's first warpgroup needs a block fewer), 128 x 128 backward
# blocks, 3-slot rings
SMALL_BLOCKS = hopper.HopperTiling(64, 64, 128, 128, stages=3)
TWO_BACKWARD_WARPGROUPS = hopper.HopperTiling(bwd_warpgroups=2)
# backward rings of 4 slots (as many as a 256-long sequence has 64-row blocks), forward ones of 2
DEEP_BACKWARD_RINGS = hopper.HopperTiling(bwd_stages=4)
# dq and dk/dv in two launches, the fused gradient concatenated
TWO_BACKWARD_LAUNCHES = hopper.HopperTiling(bwd_launches=2)


@pytest.mark.skipif(
    mosaic_gpu_interpreter.unavailable() is not None,
    reason=f"{mosaic_gpu_interpreter.unavailable()}; make test-gpu-stack runs it",
)
@pytest.mark.parametrize(
    ("B", "S", "H", "G", "K", "causal", "alibi", "dtype", "fused", "tiling"),
    [
        (1, 256, 4, 2, 64, True, True, jnp.bfloat16, False, None),  # GQA, causal ALiBi: MPT's
        (1, 256, 4, 1, 128, True, True, jnp.bfloat16, True, None),  # MQA, the fused Wqkv path
        (1, 384, 2, 2, 64, False, True, jnp.float16, False, None),
        (2, 256, 2, 2, 64, True, False, jnp.bfloat16, False, None),
        (1, 128, 3, 3, 64, True, True, jnp.bfloat16, False, None),  # fewer blocks than slots
        (1, 512, 2, 1, 64, True, True, jnp.bfloat16, False, SMALL_BLOCKS),
        (1, 512, 4, 2, 64, True, True, jnp.bfloat16, False, TWO_BACKWARD_WARPGROUPS),
        (1, 256, 2, 1, 64, True, True, jnp.bfloat16, False, DEEP_BACKWARD_RINGS),
        (1, 256, 4, 2, 64, True, True, jnp.bfloat16, True, TWO_BACKWARD_LAUNCHES),
    ],
)
def test_kernels_run_in_the_mosaic_gpu_interpreter_and_match_xla(
    B, S, H, G, K, causal, alibi, dtype, fused, tiling, monkeypatch
):
    """The three kernels as written, warpgroups, TMA rings and mbarriers simulated on CPU.

    The interpreter fails a kernel that deadlocks or whose warpgroups skip a barrier phase, and
    leaves unwritten outputs NaN. What it does not model: register layouts (values keep their
    logical layout) and asynchrony (wgmma and TMA complete in order). Its race detector is off:
    it flags the ring hand-over every warp-specialized pipeline makes (a generic-proxy read, an
    mbarrier arrive, then a TMA write into the slot), Pallas' own included.
    """
    keys = jax.random.split(jax.random.key(S * H + G + K), 4)
    q = jax.random.normal(keys[0], (B, S, H, K), dtype)
    k = jax.random.normal(keys[1], (B, S, G, K), dtype)
    v = jax.random.normal(keys[2], (B, S, G, K), dtype)
    do = jax.random.normal(keys[3], (B, S, H, K), jnp.float32)
    slopes = alibi_slopes(H) if alibi else None
    kw = dict(alibi_slopes=slopes, causal=causal)
    hopper_kw = dict(kw, tiling=tiling)
    with mosaic_gpu_interpreter.interpreted(deadline_s=60):
        if fused:  # as the model reaches them: attention_qkv on a GPU host
            monkeypatch.setattr(attention_lib, "backend", lambda: "gpu")
            if tiling is None:
                fused_fn = lambda qkv: attention_qkv(qkv, n_kv_heads=G, impl="pallas_mgpu", **kw)
            else:
                fused_fn = lambda qkv: hopper.flash_attention_mgpu_qkv(
                    qkv, n_kv_heads=G, **hopper_kw
                )
            qkv_grads = out_and_grads_fn(fused_fn, do)
            out, (dqkv,) = qkv_grads(jnp.concatenate([q, k, v], axis=2))
            grads = jnp.split(dqkv, [H, H + G], axis=2)
        else:
            out, grads = out_and_grads_fn(
                lambda *a: hopper.flash_attention_mgpu(*a, **hopper_kw), do
            )(q, k, v)
    reference = out_and_grads_fn(lambda *a: attention(*a, impl="xla", **kw), do)
    ref_out, ref_grads = reference(*(x.astype(jnp.float32) for x in (q, k, v)))
    tolerance = 2e-2 if dtype == jnp.bfloat16 else 5e-3
    names = ("out", "dq", "dk", "dv")
    for name, ours, ref in zip(names, (out, *grads), (ref_out, *ref_grads), strict=True):
        assert ours.shape == ref.shape and ours.dtype == dtype, name
        assert relative_error(ours, ref) < tolerance, name


@pytest.mark.parametrize("compute_warpgroups", [1, 2])
def test_register_budgets_fit_the_register_file(compute_warpgroups):
    # setmaxnreg moves registers between warpgroups of one program: what the compute warpgroups
    # raise theirs to and the streaming one keeps must fit 64 Ki registers (512 per thread of
    # one warpgroup), each a multiple of 8 within PTX's 24..256
    per_compute = hopper._compute_registers(compute_warpgroups)
    budgets = [per_compute] * compute_warpgroups + [hopper._MEMORY_REGISTERS]
    assert sum(budgets) <= 512 and all(24 <= r <= 256 and r % 8 == 0 for r in budgets)
    assert sum(budgets) > 512 - 8 * compute_warpgroups or per_compute == 256  # none left idle
