"""The Pallas flash-attention kernels, GPU and TPU (interpret mode on CPU), against XLA."""

import functools
import math
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import lower_for_cuda, out_and_grads_fn, relative_error
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from mpt_jax import MPTForCausalLM
from mpt_jax.attention import alibi_slopes, attention
from mpt_jax.config import ModelConfig
from mpt_jax.kernels import flash_attention as fa
from mpt_jax.kernels.common import poison
from mpt_jax.kernels.flash_attention import Tiling, Tilings, default_tilings, flash_attention
from mpt_jax.kernels.flash_attention_tpu import flash_attention_tpu

KERNELS = {"pallas_gpu": flash_attention, "pallas_tpu": flash_attention_tpu}

# interpret-mode kernels are large XLA while loops; the LLVM backend dominates their compile time
# and optimizing it buys nothing at these sizes
FAST_COMPILE = {"xla_backend_optimization_level": 0}

f32, bf16, f16 = jnp.float32, jnp.bfloat16, jnp.float16
CASES = {
    # B, S, H, G, K, segments, causal, dtype, (block_q, block_k)
    "gqa_6_over_3_segments_ragged_k64": (2, 100, 6, 3, 64, True, True, f32, (32, 32)),
    "12_heads_k96": (1, 64, 12, 12, 96, False, True, f32, (32, 32)),
    "mqa_3_heads_not_causal_segments_k80": (1, 80, 3, 1, 80, True, False, f32, (32, 32)),
    "5_heads_ragged_k128_blocks_16x32": (1, 97, 5, 5, 128, False, True, f32, (16, 32)),
    "mqa_not_causal_k256": (1, 40, 2, 1, 256, False, False, f32, (16, 16)),
    "bf16_gqa_segments_k128_blocks_32x64": (1, 130, 4, 2, 128, True, True, bf16, (32, 64)),
    "bf16_not_causal_segments_k64_blocks_64x32": (2, 70, 6, 2, 64, True, False, bf16, (64, 32)),
    "fp16_k112_mpt30b": (1, 64, 2, 2, 112, False, True, f16, (32, 32)),
}


def _assert_matches_reference(
    kernel, B, S, H, G, K, with_segments, causal, dtype, seed_name, slopes=None, scale=0.2
):
    """kernel(q, k, v, **kw) against the XLA reference: output and dq, dk, dv."""
    rng = np.random.default_rng(zlib.crc32(seed_name.encode()))  # fresh inputs per case
    q = jnp.asarray(rng.standard_normal((B, S, H, K)), dtype)
    k = jnp.asarray(rng.standard_normal((B, S, G, K)), dtype)
    v = jnp.asarray(rng.standard_normal((B, S, G, K)), dtype)
    seg = jnp.asarray(np.sort(rng.integers(0, 3, (B, S)), axis=1)) if with_segments else None
    do = jnp.asarray(rng.standard_normal((B, S, H, K)), jnp.float32)
    slopes = alibi_slopes(H) if slopes is None else slopes
    kw = dict(alibi_slopes=slopes, segment_ids=seg, causal=causal, softmax_scale=scale)

    ours = functools.partial(kernel, interpret=True, _poison_outputs=True, **kw)
    out, grads = out_and_grads_fn(ours, do, FAST_COMPILE)(q, k, v)
    reference = out_and_grads_fn(
        lambda q, k, v: attention(q, k, v, impl="xla", **kw), do, FAST_COMPILE
    )
    ref, ref_grads = reference(q, k, v)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    assert out.dtype == dtype and out.shape == (B, S, H, K)
    assert relative_error(out, ref) < tol
    for g, r, label in zip(grads, ref_grads, ("dq", "dk", "dv"), strict=True):
        assert g.dtype == r.dtype and g.shape == r.shape, label
        assert relative_error(g, r) < tol, label


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("impl", sorted(KERNELS))
def test_forward_and_gradients_match_reference(impl, name):
    *case, (bq, bk) = CASES[name]
    kernel = functools.partial(KERNELS[impl], block_q=bq, block_k=bk)
    _assert_matches_reference(kernel, *case, seed_name=f"{impl}/{name}")


def test_mpt_30b_slopes_at_the_default_128_query_blocks_keep_the_fp32_tolerance():
    # the steepest slopes of 64 heads (0.92 to 0.71) over the default 128-query blocks at the
    # model's scale: the key-only causal ALiBi grows with slope x rows from its anchor, and
    # float32 rounds it (anchored at the first query, dk was 1.27e-5 off for these inputs)
    assert default_tilings(128).fwd.block_q == 128
    case = (1, 256, 4, 4, 128, False, True, f32)  # B, S, H, G, K, segments, causal, dtype
    slopes = alibi_slopes(64)[:4]
    seed_name = "mpt30b_4heads_s256_k128_seed0"
    _assert_matches_reference(flash_attention, *case, seed_name, slopes=slopes, scale=None)


GQA_CASES = sorted(name for name, case in CASES.items() if case[2] != case[3])


@pytest.mark.parametrize("name", GQA_CASES)
def test_grouped_dkdv_sums_each_kv_heads_query_heads_in_one_program(monkeypatch, name):
    # grouped: one dk/dv program per key block of each kv head, its R query heads summed in
    # registers (test_forward_and_gradients_match_reference runs these small cases per query
    # head: too few programs to group)
    monkeypatch.setattr(fa, "_MIN_GROUPED_PROGRAMS", 0)
    *case, (bq, bk) = CASES[name]
    kernel = functools.partial(flash_attention, block_q=bq, block_k=bk)
    _assert_matches_reference(kernel, *case, seed_name=f"grouped/{name}")


@pytest.mark.parametrize("causal", [True, False])
def test_gpu_kernels_with_their_own_tilings_agree_with_reference(causal):
    # the forward's log-sum-exp crosses into backward kernels with other query blocks, and
    # causal blocks below the diagonal skip their masks: both must stay exact
    tilings = Tilings(
        fwd=Tiling(32, 16, num_warps=4, num_stages=2), dq=Tiling(16, 32), dkv=Tiling(16, 64)
    )
    kernel = functools.partial(flash_attention, tilings=tilings)
    _assert_matches_reference(kernel, 2, 150, 6, 2, 32, True, causal, jnp.float32, f"t{causal}")


@pytest.mark.parametrize(
    "n_blocks, H, per_head, last_first",
    [
        (16, 16, 1 << 20, True),
        (64, 16, 4 << 20, True),
        (7, 6, 3 << 20, False),
        (3, 5, 64 << 20, True),
    ],
)
def test_launch_order_runs_every_block_once_grouped_and_costliest_first(
    n_blocks, H, per_head, last_first
):
    order = fa._Order.build(n_blocks, H, per_head, last_block_first=last_first)
    g = order.group
    assert H % g == 0
    # the largest group within the L2 budget (one head when even one exceeds it)
    assert g == 1 or g * per_head <= fa.L2_GROUP_BYTES
    assert all(H % d or d * per_head > fa.L2_GROUP_BYTES for d in range(g + 1, H + 1))
    grid = order.grid(H, B=1)
    assert grid[:2] == (n_blocks * g, H // g)
    seen = []
    for grp in range(grid[1]):
        blocks = [int(order.block(t)) for t in range(grid[0])]
        heads = {int(order.head(t, grp)) for t in range(grid[0])}
        assert heads == set(range(grp * g, grp * g + g))  # a group's programs share its heads
        # axis 0 launches fastest: within a group, the costliest causal blocks start first
        assert blocks == sorted(blocks, reverse=last_first)
        seen += [(b, int(order.head(t, grp))) for t, b in enumerate(blocks)]
    assert sorted(seen) == [(b, h) for b in range(n_blocks) for h in range(H)]


def test_group_sizes_at_the_benchmark_shapes():
    # bf16 keys and values of one head: 1 MiB at seq 2048 (16 heads share L2), 4 MiB at 8192
    fwd = Tiling(128, 32)
    assert fa._order(16, 2048, 128, 2, fwd, over_keys=False, causal=True).group == 16
    assert fa._order(16, 8192, 128, 2, fwd, over_keys=False, causal=True).group == 4
    assert fa._order(16, 8192, 128, 2, fwd, over_keys=True, causal=True).last_block_first is False


@pytest.mark.parametrize("causal", [True, False])
def test_gpu_kernels_in_several_head_groups_agree_with_reference(monkeypatch, causal):
    # 8 query heads over 2 kv heads (4 each) in groups of 4, then of 2: groups and kv heads
    # align differently; in the other tests every head fits one group
    B, S, H, G, K = 1, 100, 8, 2, 32
    tilings = Tilings(fwd=Tiling(32, 16), dq=Tiling(16, 32), dkv=Tiling(16, 32))
    Sp = tilings.padded_length(S)
    for group in (4, 2):
        monkeypatch.setattr(fa, "L2_GROUP_BYTES", group * 2 * Sp * K * 4)  # float32 K and V
        order = fa._order(H, Sp, K, 4, tilings.fwd, over_keys=False, causal=causal)
        assert order.group == group
        kernel = functools.partial(flash_attention, tilings=tilings)
        name = f"groups{group}{causal}"
        _assert_matches_reference(kernel, B, S, H, G, K, True, causal, jnp.float32, name)


@pytest.mark.parametrize(
    "B, S, H, G, K, with_segments, causal, dtype",
    [
        (2, 100, 6, 3, 64, True, True, f32),  # GQA, ragged tail
        (2, 90, 3, 3, 64, True, True, f32),  # MHA (dk, dv in dq's array in place), ragged tail
        (1, 64, 4, 4, 112, False, True, bf16),  # MPT-30B's head dim, zero-padded
        (1, 80, 3, 1, 32, True, False, f32),  # MQA, not causal
    ],
)
def test_fused_qkv_kernel_matches_the_kernel_on_split_heads(
    B, S, H, G, K, with_segments, causal, dtype
):
    rng = np.random.default_rng(zlib.crc32(f"fused{H}{G}{K}".encode()))
    qkv = jnp.asarray(rng.standard_normal((B, S, H + 2 * G, K)), dtype)
    seg = jnp.asarray(np.sort(rng.integers(0, 3, (B, S)), axis=1)) if with_segments else None
    do = jnp.asarray(rng.standard_normal((B, S, H, K)), jnp.float32)
    kw = dict(alibi_slopes=alibi_slopes(H), segment_ids=seg, causal=causal, interpret=True)
    kw |= dict(block_q=32, block_k=16, _poison_outputs=True)

    def split(qkv):
        q, k, v = jnp.split(qkv, [H, H + G], axis=2)
        return flash_attention(q, k, v, **kw)

    fused = functools.partial(fa.flash_attention_qkv, n_kv_heads=G, **kw)
    out, (grad,) = out_and_grads_fn(fused, do, FAST_COMPILE)(qkv)
    ref, (ref_grad,) = out_and_grads_fn(split, do, FAST_COMPILE)(qkv)
    # the same kernels on the same numbers: equal to the bit in fp32; in bf16 XLA's CPU code for
    # the two interpreted programs may round an element differently (one unit in the last place:
    # bf16 keeps 8 significant bits)
    ulp = 2.0**-7 if dtype == bf16 else 0.0
    assert_close = functools.partial(np.testing.assert_allclose, rtol=ulp, atol=0)
    assert_close(np.asarray(out, np.float32), np.asarray(ref, np.float32))
    assert grad.shape == qkv.shape and grad.dtype == qkv.dtype
    assert_close(np.asarray(grad, np.float32), np.asarray(ref_grad, np.float32))


@pytest.mark.parametrize(("G", "grouped"), [(4, True), (2, True), (2, False)])
def test_fused_qkv_kernel_reads_the_heads_in_place_and_names_a_bad_head_count(
    monkeypatch, G, grouped
):
    monkeypatch.setattr(fa, "_MIN_GROUPED_PROGRAMS", 0 if grouped else 1 << 30)
    B, S, H, K = 1, 256, 4, 64
    qkv = jax.ShapeDtypeStruct((B, S, H + 2 * G, K), jnp.bfloat16)

    def loss(qkv):
        out = fa.flash_attention_qkv(qkv, n_kv_heads=G, alibi_slopes=alibi_slopes(H))
        return out.astype(jnp.float32).sum()

    text = lower_for_cuda(jax.jit(jax.grad(loss)), qkv).as_text()
    ops = re.findall(r"stablehlo\.(\w+)", text)
    # no slices of q, k and v copied for the kernels
    assert ops.count("custom_call") == 3 and "slice" not in ops
    if grouped:  # dk/dv writes into dq's (B, S, N, K) output in place: no concatenation, and
        # with GQA no per-query-head dk and dv summed afterwards (the kernel sums them)
        assert ops.count("concatenate") == 0 and "reduce" not in ops
        assert re.search(r"output_operand_aliases", text)
    else:  # GQA per query head: float32 dk and dv summed over each group, then concatenated
        assert ops.count("concatenate") == 1 and "reduce" in ops
    with pytest.raises(ValueError, match="n_kv_heads=5"):
        fa.flash_attention_qkv(jnp.zeros((B, S, 3 * H, K)), n_kv_heads=5)


@pytest.mark.parametrize(("G", "grouped"), [(4, True), (1, False)])
def test_gqa_dkdv_groups_when_the_programs_are_enough_to_balance(G, grouped):
    # at batch 8, seq 2048, 16 heads and the default 64-key dk/dv blocks: 4 kv heads make
    # 1024 grouped programs (no per-query-head gradients to sum); MQA would make 256 programs
    # of 16 heads each, so it keeps one program per query head
    B, S, H, K = 8, 2048, 16, 128
    qkv = jax.ShapeDtypeStruct((B, S, H + 2 * G, K), jnp.bfloat16)

    def loss(qkv):
        out = fa.flash_attention_qkv(qkv, n_kv_heads=G, alibi_slopes=alibi_slopes(H))
        return out.astype(jnp.float32).sum()

    ops = re.findall(r"stablehlo\.(\w+)", lower_for_cuda(jax.jit(jax.grad(loss)), qkv).as_text())
    assert (ops.count("concatenate") == 0) == grouped and ("reduce" not in ops) == grouped


def test_gpu_kernels_lower_to_triton_for_cuda_on_any_host():
    # the Pallas -> Triton lowering runs in Python: a primitive Triton lacks fails here, on CPU,
    # before a GPU ever sees the kernels (interpret mode does not exercise it)
    B, S, H, G, K = 1, 1000, 4, 2, 112
    q = jax.ShapeDtypeStruct((B, S, H, K), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((B, S, G, K), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((B, S), jnp.int32)
    tilings = Tilings(fwd=Tiling(128, 64, 8, 2), dq=Tiling(64, 32), dkv=Tiling(32, 128, 4, 4))

    def loss(q, k, v, seg):
        out = flash_attention(
            q, k, v, alibi_slopes=alibi_slopes(H), segment_ids=seg, tilings=tilings
        )
        return out.astype(jnp.float32).sum()

    text = lower_for_cuda(jax.jit(jax.value_and_grad(loss, (0, 1, 2))), q, kv, kv, seg).as_text()
    launches = re.findall(
        r'name = "(mpt_flash_\w+)", num_stages = (\d+) : i32, num_warps = (\d+)', text
    )
    assert sorted(launches) == [
        ("mpt_flash_dkdv", "4", "4"),
        ("mpt_flash_dq", "3", "4"),  # Triton's defaults
        ("mpt_flash_fwd", "2", "8"),
    ]
    # the softmax is exp2 (one MUFU op per score), never libdevice's longer expf
    assert "__nv_exp2f" in text and "__nv_expf" not in text


def _triton_modules(monkeypatch, capsys, loss, *args) -> dict[str, str]:
    """The Triton IR of each of our kernels in loss's gradient, as Pallas prints it (debug)."""
    monkeypatch.setattr(fa.pl, "pallas_call", functools.partial(pl.pallas_call, debug=True))
    lower_for_cuda(jax.jit(jax.grad(loss, (0, 1, 2))), *args)
    printed = capsys.readouterr().out
    parts = re.split(r"The Triton module for pallas_call (mpt_flash_\w+)", printed)[1:]
    return dict(zip(parts[::2], parts[1::2], strict=True))


def test_gpu_kernels_transpose_only_tiles_they_load(monkeypatch, capsys):
    # a transposed load feeds the tensor cores from shared memory as it is; a transposed
    # register tile (dk/dv's p^T and ds^T when its blocks were (bq, bk)) goes through a layout
    # conversion every iteration: dk/dv computes its blocks as (bk, bq) instead
    B, S, H, K = 1, 512, 2, 128
    q = jax.ShapeDtypeStruct((B, S, H, K), jnp.bfloat16)

    def loss(q, k, v):
        out = flash_attention(q, k, v, alibi_slopes=alibi_slopes(H))
        return out.astype(jnp.float32).sum()

    modules = _triton_modules(monkeypatch, capsys, loss, q, q, q)
    assert sorted(modules) == ["mpt_flash_dkdv", "mpt_flash_dq", "mpt_flash_fwd"]
    for name, text in modules.items():
        defined_by, transposed = {}, []
        for line in text.splitlines():
            if m := re.match(r"\s*(%\w+) = (tt\.trans) (%\w+)", line):
                transposed.append(defined_by.get(m.group(3)))
            if m := re.match(r"\s*(%\w+)(?::\d+)? = ([\w.]+)", line):
                defined_by[m.group(1)] = m.group(2)  # names recur in sibling loop bodies
        # fwd: k^T (2 loops); dq: k^T, v^T; dk/dv: q^T, dO^T
        assert transposed and set(transposed) == {"tt.load"}, (name, transposed)


def test_gpu_backward_computes_its_softmax_correction_inside_the_kernels():
    # D = rowsum(dO * O) comes from the dq kernel, which holds dO anyway: no XLA pass of its own
    # over dO and O (a product, a reduction and a transpose to (B, H, S)) between the kernels
    B, S, H, K = 2, 256, 4, 64
    q = jax.ShapeDtypeStruct((B, S, H, K), jnp.bfloat16)

    def loss(q, k, v):
        out = flash_attention(q, k, v, alibi_slopes=alibi_slopes(H))
        return out.astype(jnp.float32).sum()

    text = lower_for_cuda(jax.jit(jax.grad(loss, (0, 1, 2))), q, q, q).as_text()
    ops = re.findall(r"stablehlo\.(\w+)", text)
    assert ops.count("custom_call") == 3
    assert "multiply" not in ops and "transpose" not in ops


@pytest.mark.parametrize("head_dim", [256, 512])
def test_default_blocks_above_head_dim_128_hold_no_more_bytes_than_those_measured(head_dim):
    # the head-dim-128 tilings ran on an H200; larger head dims must not need more shared memory
    measured, tilings = default_tilings(128), default_tilings(head_dim)
    for kernel in ("fwd", "dq", "dkv"):
        ran, ours = getattr(measured, kernel), getattr(tilings, kernel)
        assert (ours.block_q + ours.block_k) * head_dim <= (ran.block_q + ran.block_k) * 128
        assert min(ours.block_q, ours.block_k) >= 16  # a bf16 tensor-core tile's depth


def test_poisoned_outputs_show_unwritten_elements():
    def half_kernel(x_ref, buf_ref, o_ref):
        del buf_ref  # the poison buffer: aliased to o, never read

        @pl.when(pl.program_id(0) == 0)
        def _():
            o_ref[...] = x_ref[...]

    x = jnp.ones((16, 8), jnp.float32)
    spec = pl.BlockSpec((8, 8), lambda i: (i, 0))
    shape = [jax.ShapeDtypeStruct(x.shape, x.dtype)]
    bufs, buf_specs, aliases = poison(shape, [spec], 1, True)
    (out,) = pl.pallas_call(
        half_kernel,
        grid=(2,),
        in_specs=[spec, *buf_specs],
        out_specs=[spec],
        out_shape=shape,
        input_output_aliases=aliases,
        interpret=True,
    )(x, *bufs)
    assert np.isfinite(out[:8]).all() and np.isnan(out[8:]).all()


_FLOAT = r"bf16|f16|f32|f64"
_SHAPE = re.compile(rf"\b(?:pred|[su](?:8|16|32|64)|{_FLOAT})\[([\d,]*)\]")
_FLOAT_SHAPE = re.compile(rf"\b(?:{_FLOAT})\[([\d,]*)\]")


def _largest_buffer(hlo_text: str, shape: re.Pattern = _SHAPE) -> int:
    """Elements of the largest array (of any dtype `shape` matches) in an HLO module's text."""
    sizes = [math.prod(int(d) for d in m.split(",") if d) for m in shape.findall(hlo_text)]
    return max(sizes)


@pytest.mark.parametrize("impl", ["xla", "pallas_gpu", "pallas_tpu", "tokamax"])
def test_compiled_forward_and_backward_hold_no_seq_by_seq_buffer(impl, monkeypatch):
    # B * H * K < S, so inputs and outputs stay below S * S elements; scores cannot
    B, S, H, G, K = 1, 1024, 2, 1, 64
    shape = _SHAPE
    if impl == "tokamax":  # ALiBi as a key-only bias, segments as key ranges
        pytest.importorskip("tokamax")
        import mpt_jax.attention as attention_lib

        # what is checked is what our wrapper hands tokamax, so its chunked XLA attention
        # stands in for its GPU kernels here (only compiled: its gradients with a bias are NaN on
        # this CPU, so it is not the off-GPU default); its chunks (H x 512 x 1024) stay below
        # S * S; it builds a boolean (B, 1, S, S) mask from the ranges itself (its GPU kernels
        # take the ranges): floats only
        monkeypatch.setattr(attention_lib, "_TOKAMAX_FALLBACK", ("xla_chunked",))
        S, shape = 2048, _FLOAT_SHAPE
    q = jax.ShapeDtypeStruct((B, S, H, K), jnp.float32)
    kv = jax.ShapeDtypeStruct((B, S, G, K), jnp.float32)
    seg = jax.ShapeDtypeStruct((B, S), jnp.int32)

    def loss(q, k, v, seg):
        kw = dict(alibi_slopes=alibi_slopes(H), segment_ids=seg, causal=True, impl=impl)
        return attention(q, k, v, **kw).sum()

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2))
    text = jax.jit(grad).lower(q, kv, kv, seg).compile(FAST_COMPILE).as_text()
    if impl == "xla":  # the check can fail: the reference materializes (S, S) scores
        assert _largest_buffer(text, shape) >= S * S
    else:
        assert _largest_buffer(text, shape) < S * S


_MODEL_FIELDS = dict(
    d_model=64,
    n_heads=4,
    n_layers=2,
    vocab_size=100,
    max_seq_len=48,
    alibi=True,
    learned_pos_emb=False,
    attn_type="grouped_query_attention",
    kv_n_heads=2,
    attn_uses_sequence_id=True,
)


@functools.cache
def _model_params():
    """Initialized parameters, built in one quickly compiled program (eagerly: many slow ones)."""
    cfg = ModelConfig(**_MODEL_FIELDS, attn_impl="xla")
    init = lambda: nnx.split(MPTForCausalLM(cfg, rngs=nnx.Rngs(0)), nnx.Param)[1]
    return jax.jit(init, compiler_options=FAST_COMPILE)()


@functools.cache
def _model_logits_and_grads(impl):
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 100, (2, 40)))
    seg = jnp.asarray(np.repeat([[0] * 15 + [1] * 25], 2, axis=0))
    # same parameters for every impl; only the (abstract) module structure differs
    cfg = ModelConfig(**_MODEL_FIELDS, attn_impl=impl)
    graphdef = nnx.split(nnx.eval_shape(lambda: MPTForCausalLM(cfg, rngs=nnx.Rngs(0))))[0]

    def loss(p):
        logits = nnx.merge(graphdef, p)(ids, segment_ids=seg)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1)), logits

    grad = jax.value_and_grad(loss, has_aux=True)
    (_, logits), grads = jax.jit(grad, compiler_options=FAST_COMPILE)(_model_params())
    return logits, jax.tree.leaves(grads)


@pytest.mark.parametrize("impl", [*sorted(KERNELS), "tokamax"])
def test_model_with_fused_attention_matches_xla(impl):
    if impl == "tokamax":
        pytest.importorskip("tokamax")
    ref_logits, ref_grads = _model_logits_and_grads("xla")
    logits, grads = _model_logits_and_grads(impl)
    assert relative_error(logits, ref_logits) < 1e-5
    for g, r in zip(grads, ref_grads, strict=True):
        assert relative_error(g, r) < 1e-4


def test_tpu_kernel_in_the_tpu_simulator():
    # Pallas' TPU interpreter models VMEM/SMEM, block DMAs and shuffles the "parallel" grid
    # axes; uninitialized memory reads as NaN, so a visited block left unwritten shows too
    B, S, H, G, K = 1, 40, 2, 1, 64
    rng = np.random.default_rng(7)
    q = jnp.asarray(rng.standard_normal((B, S, H, K)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((B, S, G, K)), jnp.float32) for _ in range(2))
    seg = jnp.asarray(np.sort(rng.integers(0, 2, (B, S)), axis=1))
    do = jnp.asarray(rng.standard_normal((B, S, H, K)), jnp.float32)
    kw = dict(alibi_slopes=alibi_slopes(H), segment_ids=seg, causal=True, softmax_scale=0.2)
    kernel = functools.partial(
        flash_attention_tpu,
        block_q=16,
        block_k=16,
        interpret=pltpu.InterpretParams(),
        _poison_outputs=True,
        **kw,
    )
    out, grads = out_and_grads_fn(kernel, do, FAST_COMPILE)(q, k, v)
    reference = out_and_grads_fn(
        lambda q, k, v: attention(q, k, v, impl="xla", **kw), do, FAST_COMPILE
    )
    ref, ref_grads = reference(q, k, v)
    assert relative_error(out, ref) < 1e-5
    for g, r in zip(grads, ref_grads, strict=True):
        assert relative_error(g, r) < 1e-5


@pytest.mark.parametrize("kernel", ["triton", "tpu", "triton_qkv"])
def test_arrays_the_kernels_would_pad_or_clamp_are_refused_naming_the_argument(kernel):
    # the kernels pad every array to whole blocks: a short one would give wrong numbers, no error
    q = jnp.zeros((1, 32, 4, 64))
    kv = jnp.zeros((1, 32, 2, 64))
    if kernel == "triton_qkv":
        name = "flash_attention_qkv"
        call = functools.partial(
            fa.flash_attention_qkv, jnp.zeros((1, 32, 8, 64)), n_kv_heads=2, interpret=True
        )
    else:
        name = "flash_attention" if kernel == "triton" else "flash_attention_tpu"
        attend = flash_attention if kernel == "triton" else flash_attention_tpu
        call = functools.partial(attend, q, kv, kv, interpret=True)
    with pytest.raises(ValueError, match=rf"^{name}: alibi_slopes has shape \(3,\), not one per"):
        call(alibi_slopes=jnp.ones(3))
    with pytest.raises(ValueError, match=rf"^{name}: segment_ids has shape \(1, 16\), not \(b"):
        call(segment_ids=jnp.zeros((1, 16), jnp.int32))
    if kernel != "triton_qkv":
        with pytest.raises(ValueError, match=rf"^{name}: v has shape \(1, 32, 2, 32\), q needs"):
            attend(q, kv, kv[..., :32], interpret=True)
        with pytest.raises(ValueError, match=rf"^{name}: q must be a 4-D float array, got int32"):
            attend(q.astype(jnp.int32), kv, kv, interpret=True)
