"""Causal multi-head attention with ALiBi, segment masking and GQA behind one function.

Shapes: B batch, S query length, T key length, H query heads, G kv heads (H % G == 0),
R = H // G query heads per kv head, K head dim.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from mpt_jax import sharding

IMPLS = ("auto", "xla", "cudnn", "pallas_gpu", "pallas_mgpu", "pallas_tpu", "tokamax")

# tokamax implementations tried in order (the first that traces runs): Mosaic GPU (Hopper and
# newer, bf16/fp16) then Pallas Triton on a GPU, its XLA reference elsewhere (its chunked XLA
# attention gave NaN dq and dk with a bias and packed documents on this project's AMD CPU runners)
_TOKAMAX_IMPLEMENTATIONS = {"gpu": ("mosaic_gpu", "triton")}
_TOKAMAX_FALLBACK = ("xla",)


def alibi_slopes(n_heads: int, alibi_bias_max: float = 8) -> np.ndarray:
    """llm-foundry's gen_slopes: (n_heads,) float32, non-power-of-two counts interleaved."""
    n_pow2 = 2 ** math.ceil(math.log2(n_heads))
    m = np.arange(1, n_pow2 + 1, dtype=np.float32) * np.float32(alibi_bias_max / n_pow2)
    slopes = np.float32(1.0) / np.power(np.float32(2.0), m)
    if n_pow2 != n_heads:
        slopes = np.concatenate([slopes[1::2], slopes[::2]])[:n_heads]
    return slopes.astype(np.float32)


def _check_shapes(q_BSHK, k_BTGK, v_BTGK, alibi_slopes, segment_ids) -> None:
    """One line naming the argument at fault (the kernels would pad or clamp what they get)."""
    shapes = f"q {tuple(q_BSHK.shape)}, k {tuple(k_BTGK.shape)}, v {tuple(v_BTGK.shape)}"
    if not q_BSHK.ndim == k_BTGK.ndim == v_BTGK.ndim == 4:
        raise ValueError(f"attention: q, k and v must be (batch, seq, heads, head_dim): {shapes}")
    if k_BTGK.shape != v_BTGK.shape:
        raise ValueError(f"attention: k and v must have one shape: {shapes}")
    B, S, H, K = q_BSHK.shape
    if (k_BTGK.shape[0], k_BTGK.shape[3]) != (B, K):
        raise ValueError(f"attention: k and v must have q's batch and head dim: {shapes}")
    for name, x in (("q", q_BSHK), ("k", k_BTGK), ("v", v_BTGK)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"attention: {name} must be floating point, got {x.dtype}")
    if alibi_slopes is not None and np.shape(alibi_slopes) != (H,):
        raise ValueError(
            f"attention: alibi_slopes must have shape ({H},), one per query head, got "
            f"{np.shape(alibi_slopes)}"
        )
    if segment_ids is not None and tuple(segment_ids.shape) != (B, S):
        raise ValueError(
            f"attention: segment_ids must have shape ({B}, {S}), got {tuple(segment_ids.shape)}"
        )


def attention(
    q_BSHK: jax.Array,
    k_BTGK: jax.Array,
    v_BTGK: jax.Array,
    *,
    alibi_slopes: jax.Array | np.ndarray | None = None,
    segment_ids: jax.Array | None = None,
    causal: bool = True,
    impl: str = "auto",
    softmax_scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_key: jax.Array | None = None,
    query_offset: int | jax.Array | None = None,
    kv_mask: jax.Array | None = None,
) -> jax.Array:
    """Softmax attention; returns (B, S, H, K) in q's dtype.

    alibi_slopes: (H,) float32; adds -slope_h * |i - j| to the scores (for causal attention
    this equals MPT's slope_h * (j - (S - 1)) up to a per-row constant, which softmax removes).
    segment_ids: (B, S) ints; tokens attend only within their own segment (packed documents).
    softmax_scale: defaults to 1 / sqrt(K).
    query_offset: key position of the first query (default T - S: the queries are the last S
    of the T positions); may be traced, as when decoding into a preallocated KV cache.
    kv_mask: (B, T) bool; False keys are never attended to (left padding, unwritten cache slots).
    query_offset and kv_mask need the `xla` implementation (`auto` picks it).
    """
    if impl not in IMPLS:
        raise ValueError(f"attention impl: must be one of {', '.join(IMPLS)}, got {impl!r}")
    decoding = query_offset is not None or kv_mask is not None
    if decoding and impl not in ("auto", "xla"):
        raise ValueError(f"attention impl {impl!r}: query_offset and kv_mask need impl 'xla'")
    _check_shapes(q_BSHK, k_BTGK, v_BTGK, alibi_slopes, segment_ids)
    _, S, H, K = q_BSHK.shape
    G = k_BTGK.shape[2]
    if H % G:
        raise ValueError(f"attention: {H} query heads are not a multiple of {G} kv heads")
    if segment_ids is not None and k_BTGK.shape[1] != S:
        raise ValueError("attention: segment_ids need equal query and key lengths")
    scale = 1.0 / math.sqrt(K) if softmax_scale is None else float(softmax_scale)
    T = k_BTGK.shape[1]
    if impl == "auto":
        alibi = alibi_slopes is not None
        # the kernels take equal query and key lengths only: queries that are the last S of T
        # keys (a prompt scored against a longer context) go to XLA
        xla = decoding or T != S
        impl = "xla" if xla else auto_impl(q_BSHK, dropout_rate, alibi=alibi)
    if T != S and impl != "xla":
        raise ValueError(
            f"attention impl {impl!r}: needs equal query and key lengths, got {S} and {T} "
            "(impl 'xla' or 'auto' takes them)"
        )
    if impl not in ("xla", "auto") and dropout_rate:
        raise ValueError(f"attention impl {impl!r}: attention dropout is not supported")
    kernel_kw = dict(causal=causal, softmax_scale=scale)
    if impl in ("pallas_gpu", "pallas_mgpu", "pallas_tpu"):
        if impl == "pallas_mgpu":
            kernel = _hopper_kernels().flash_attention_mgpu
        elif impl == "pallas_gpu":
            from mpt_jax.kernels.flash_attention import flash_attention as kernel
        else:
            from mpt_jax.kernels.flash_attention_tpu import flash_attention_tpu as kernel
        if impl != "pallas_mgpu":
            native = "gpu" if impl == "pallas_gpu" else "tpu"
            kernel_kw["interpret"] = backend() != native  # elsewhere the same kernel, interpreted

        def local(q, k, v, segment_ids, alibi_slopes):
            kw = dict(alibi_slopes=alibi_slopes, segment_ids=segment_ids, **kernel_kw)
            return kernel(q, k, v, **kw)

        return _on_each_device(local, q_BSHK, k_BTGK, v_BTGK, segment_ids, alibi_slopes)
    if impl == "tokamax":

        def local(q, k, v, segment_ids, alibi_slopes):
            return _tokamax_attention(q, k, v, alibi_slopes, segment_ids, causal, scale)

        return _on_each_device(local, q_BSHK, k_BTGK, v_BTGK, segment_ids, alibi_slopes)
    if impl == "cudnn":
        return _cudnn_attention(q_BSHK, k_BTGK, v_BTGK, alibi_slopes, segment_ids, causal, scale)
    return _xla_attention(
        q_BSHK,
        k_BTGK,
        v_BTGK,
        alibi_slopes,
        segment_ids,
        causal,
        scale,
        dropout_rate,
        dropout_key,
        query_offset,
        kv_mask,
    )


def attention_qkv(
    qkv_BSNK: jax.Array,
    *,
    n_kv_heads: int,
    alibi_slopes: jax.Array | np.ndarray | None = None,
    segment_ids: jax.Array | None = None,
    causal: bool = True,
    impl: str = "auto",
    softmax_scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_key: jax.Array | None = None,
) -> jax.Array:
    """attention() of q, k, v = split(qkv_BSNK, [H, H + G], axis=2), N = H + 2G, G = n_kv_heads.

    `pallas_gpu` (`auto`'s choice for ALiBi on a GPU) and `pallas_mgpu` read the three from the
    fused array in place, where slices would be copied for the kernels, and make one gradient
    array; the other implementations get the slices.
    """
    if impl == "auto":
        impl = auto_impl(qkv_BSNK, dropout_rate, alibi=alibi_slopes is not None)
    B, S, N, K = qkv_BSNK.shape
    H = N - 2 * n_kv_heads
    mha = n_kv_heads == H
    # GQA's fused layout cannot be cut into per-device q, k and v heads: with heads split over
    # tensor it takes the kernels of the split q, k and v below
    fused = mha or sharding.split_count("heads") == 1
    if impl in ("pallas_gpu", "pallas_mgpu") and not dropout_rate and fused:
        kernel_kw = dict(causal=causal, softmax_scale=softmax_scale)
        if impl == "pallas_gpu":
            from mpt_jax.kernels.flash_attention import flash_attention_qkv as kernel

            kernel_kw["interpret"] = backend() != "gpu"  # elsewhere the same kernel, interpreted
        else:
            kernel = _hopper_kernels().flash_attention_mgpu_qkv
        if not mha:

            def local(qkv, segment_ids, alibi_slopes):
                kw = dict(alibi_slopes=alibi_slopes, segment_ids=segment_ids, **kernel_kw)
                return kernel(qkv, n_kv_heads=n_kv_heads, **kw)

            args = (qkv_BSNK, segment_ids, _slopes_array(alibi_slopes))
            return sharding.device_local(local, args, (_HEADS_WHOLE, _ROWS, None), _Q)

        def local_mha(qkv_BS3HK, segment_ids, alibi_slopes):
            b, s, _, h, k = qkv_BS3HK.shape
            kw = dict(alibi_slopes=alibi_slopes, segment_ids=segment_ids, **kernel_kw)
            return kernel(qkv_BS3HK.reshape(b, s, 3 * h, k), n_kv_heads=h, **kw)

        # (B, S, 3, H, K) so that a device's heads keep their q, k and v together
        args = (qkv_BSNK.reshape(B, S, 3, H, K), segment_ids, _slopes_array(alibi_slopes))
        names = (("batch", None, None, "heads", None), _ROWS, ("heads",))
        return sharding.device_local(local_mha, args, names, _Q)
    q_BSHK, k_BSGK, v_BSGK = jnp.split(qkv_BSNK, [H, H + n_kv_heads], axis=2)
    kw = dict(alibi_slopes=alibi_slopes, segment_ids=segment_ids, causal=causal)
    kw |= dict(softmax_scale=softmax_scale, impl=impl, dropout_rate=dropout_rate)
    return attention(q_BSHK, k_BSGK, v_BSGK, dropout_key=dropout_key, **kw)


# logical axis names of the kernels' arguments (sharding.LOGICAL_RULES)
_ROWS = ("batch", None)
_Q = ("batch", None, "heads", None)
_HEADS_WHOLE = ("batch", None, None, None)


def _on_each_device(local, q_BSHK, k_BTGK, v_BTGK, segment_ids, alibi_slopes):
    """local(q, k, v, segment_ids, alibi_slopes) on each device's batch rows and, split over
    tensor, its query heads with their kv heads (all kv heads where there is one, MQA)."""
    kv = _Q if k_BTGK.shape[2] > 1 else _HEADS_WHOLE
    args = (q_BSHK, k_BTGK, v_BTGK, segment_ids, _slopes_array(alibi_slopes))
    return sharding.device_local(local, args, (_Q, kv, kv, _ROWS, ("heads",)), _Q)


def _slopes_array(alibi_slopes):
    return None if alibi_slopes is None else jnp.asarray(alibi_slopes, jnp.float32)


def _hopper_kernels():
    """The module of our Mosaic GPU (wgmma) kernels, on a GPU only (the tests run them in jax
    0.11's interpreter, patched). Its entry points refuse, in one line, an input they do not
    take."""
    from mpt_jax.kernels import flash_attention_mgpu as hopper

    if backend() != "gpu":
        raise ValueError(
            "attention impl 'pallas_mgpu': needs a Hopper GPU (use 'pallas_gpu' elsewhere)"
        )
    return hopper


def backend() -> str:
    """The platform attention is built for: `auto`'s choice and Pallas interpret mode follow it.

    That of the abstract mesh in context if it names a device (a CPU host lowering for a GPU,
    `mpt_jax.aot.lowering_for`), else jax's default backend."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return getattr(device, "platform", None) or jax.default_backend()


def auto_impl(q_BSHK: jax.Array, dropout_rate: float, *, alibi: bool) -> str:
    """The fastest correct implementation for this backend and input.

    On a GPU with bf16/fp16 inputs: our Pallas kernel for ALiBi (cuDNN would need a materialized
    bias; measured faster end to end on an H200, docs/benchmarks.md), cuDNN without ALiBi.
    On a TPU (bf16, fp16, fp32; head dim up to 256): our Pallas TPU kernel.
    Elsewhere, or with attention dropout: the XLA reference.
    """
    platform, K = backend(), q_BSHK.shape[-1]
    if dropout_rate:
        return "xla"
    if platform == "tpu":
        tpu_ok = q_BSHK.dtype in (jnp.bfloat16, jnp.float16, jnp.float32) and K <= 256
        return "pallas_tpu" if tpu_ok else "xla"
    if platform != "gpu" or q_BSHK.dtype not in (jnp.bfloat16, jnp.float16):
        return "xla"
    if alibi:
        return "pallas_gpu"
    return "cudnn" if K % 8 == 0 and K <= 128 else "pallas_gpu"


def _bias_and_mask(
    S: int,
    T: int,
    slopes_H: jax.Array | np.ndarray | None,
    segment_ids_BS: jax.Array | None,
    causal: bool,
    query_offset: int | jax.Array | None = None,
    kv_mask_BT: jax.Array | None = None,
) -> tuple[jax.Array | None, jax.Array | None]:
    """ALiBi bias (1, H, S, T) float32 and boolean keep-mask broadcastable to (B, 1, S, T)."""
    # by default the queries are the last S of T positions (T > S when decoding with a cache)
    offset = T - S if query_offset is None else query_offset
    q_pos = (offset + jnp.arange(S))[:, None]
    k_pos = jnp.arange(T)[None, :]
    bias = None
    if slopes_H is not None:
        distance_11ST = jnp.abs(q_pos - k_pos).astype(jnp.float32)[None, None]
        bias = -jnp.asarray(slopes_H, jnp.float32)[None, :, None, None] * distance_11ST
    mask = None
    if causal:
        mask = (q_pos >= k_pos)[None, None]
    if segment_ids_BS is not None:
        same_BST = segment_ids_BS[:, :, None] == segment_ids_BS[:, None, :]
        mask = same_BST[:, None] if mask is None else mask & same_BST[:, None]
    if kv_mask_BT is not None:
        keep_B11T = kv_mask_BT[:, None, None, :]
        mask = keep_B11T if mask is None else mask & keep_B11T
    return bias, mask


def _xla_attention(
    q,
    k,
    v,
    slopes,
    segment_ids,
    causal,
    scale,
    dropout_rate,
    dropout_key,
    query_offset=None,
    kv_mask=None,
):
    """The plain-XLA reference: fp32 scores and softmax, GQA without repeating kv."""
    B, S, H, K = q.shape
    T, G = k.shape[1], k.shape[2]
    R = H // G
    q_BSGRK = q.reshape(B, S, G, R, K)
    s_BGRST = _qk_scores(q_BSGRK, k) * scale
    bias, mask = _bias_and_mask(S, T, slopes, segment_ids, causal, query_offset, kv_mask)
    if bias is not None:
        s_BGRST = s_BGRST + bias.reshape(1, G, R, S, T)
    if mask is not None:
        mask_B1_1ST = mask[:, :, None]
        s_BGRST = jnp.where(mask_B1_1ST, s_BGRST, jnp.finfo(jnp.float32).min)
    p_BGRST = jax.nn.softmax(s_BGRST, axis=-1)
    if dropout_rate:
        if dropout_key is None:
            raise ValueError("attention: dropout_rate > 0 needs a dropout_key")
        keep = jax.random.bernoulli(dropout_key, 1.0 - dropout_rate, p_BGRST.shape)
        p_BGRST = jnp.where(keep, p_BGRST / (1.0 - dropout_rate), 0.0)
    out_BSGRK = jnp.einsum("bgrst,btgk->bsgrk", p_BGRST.astype(v.dtype), v)
    return out_BSGRK.reshape(B, S, H, K).astype(q.dtype)


@jax.custom_vjp
def _qk_scores(q_BSGRK: jax.Array, k_BTGK: jax.Array) -> jax.Array:
    """Scores q . k (B, G, R, S, T) in float32 whatever the inputs' dtype.

    The backward multiplies in the inputs' dtype (the score gradient cast down, as the fused
    kernels do), so under bf16 compute dq and dk are bf16 matmuls, not the fp32 ones autodiff
    of a float32-output einsum would give.
    """
    return jnp.einsum("bsgrk,btgk->bgrst", q_BSGRK, k_BTGK, preferred_element_type=jnp.float32)


def _qk_scores_fwd(q_BSGRK, k_BTGK):
    return _qk_scores(q_BSGRK, k_BTGK), (q_BSGRK, k_BTGK)


def _qk_scores_bwd(residuals, ds_BGRST):
    q_BSGRK, k_BTGK = residuals
    ds_BGRST = ds_BGRST.astype(q_BSGRK.dtype)
    f32 = jnp.float32
    dq = jnp.einsum("bgrst,btgk->bsgrk", ds_BGRST, k_BTGK, preferred_element_type=f32)
    dk = jnp.einsum("bgrst,bsgrk->btgk", ds_BGRST, q_BSGRK, preferred_element_type=f32)
    return dq.astype(q_BSGRK.dtype), dk.astype(k_BTGK.dtype)


_qk_scores.defvjp(_qk_scores_fwd, _qk_scores_bwd)


def _cudnn_attention(q, k, v, slopes, segment_ids, causal, scale):
    """cuDNN fused attention; ALiBi needs a materialized (1, H, S, T) bias here."""
    S, T = q.shape[1], k.shape[1]
    bias, mask = _bias_and_mask(S, T, slopes, segment_ids, causal=False)
    if bias is not None:
        bias = bias.astype(q.dtype)
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        bias=bias,
        mask=mask,
        scale=scale,
        is_causal=causal,
        implementation="cudnn",
    )


def _segment_bounds(segment_ids_BS: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per position: index of the first and one past the last token of its run of equal ids."""
    S = segment_ids_BS.shape[1]
    pos_S = jnp.arange(S, dtype=jnp.int32)
    change_BS1 = segment_ids_BS[:, 1:] != segment_ids_BS[:, :-1]  # (B, S - 1): i + 1 starts a run
    edge_B1 = jnp.ones_like(segment_ids_BS[:, :1], dtype=bool)
    starts_run = jnp.concatenate([edge_B1, change_BS1], axis=1)
    ends_run = jnp.concatenate([change_BS1, edge_B1], axis=1)
    start_BS = jax.lax.cummax(jnp.where(starts_run, pos_S, 0), axis=1)
    end_BS = jax.lax.cummin(jnp.where(ends_run, pos_S + 1, S), axis=1, reverse=True)
    return start_BS, end_BS


def _tokamax_attention(q, k, v, slopes, segment_ids, causal, scale):
    """openxla tokamax's fused attention: no (S, T) bias or mask is built by this function.

    ALiBi (causal only) becomes the key-only bias slope_h * j of shape (1, H, 1, T): it differs
    from -slope_h * |i - j| on the unmasked j <= i by slope_h * i, a per-row constant the softmax
    removes; without the causal mask that does not hold, so non-causal ALiBi is refused.
    segment_ids become per-query key ranges (tokamax's Mask k_start / k_end: the first and one
    past the last key of the query's run of equal ids), so segments are taken as contiguous runs:
    an id that reappears after another one counts as a new document. Packed batches are contiguous
    runs, and ranges are what tokamax's kernels skip key blocks with and take without an (S, T)
    mask. On a GPU tokamax's Mosaic GPU kernel runs (Hopper or newer, bf16/fp16), else its Pallas
    Triton kernel; elsewhere its XLA reference attention.
    GQA/MQA: tokamax takes k and v with fewer heads (query head h reads kv head h // (H // G)).
    Inside tokamax (0.0.12) some (S, T) arrays remain: its XLA reference is dense, Triton's
    backward builds a boolean mask from the ranges, and the GPU kernels' backward writes the bias
    gradient densely ((B, H, S, T) fp32) although nothing here needs it.
    """
    if slopes is not None and not causal:
        raise ValueError("attention impl 'tokamax' supports ALiBi only with causal attention")
    if q.dtype == jnp.float16 and backend() not in _TOKAMAX_IMPLEMENTATIONS:
        # its XLA reference asks for fp16 products with fp32 results, which XLA's CPU lacks
        raise ValueError(
            f"attention impl 'tokamax': float16 runs on a GPU only (here {backend()}: its XLA "
            "reference); use bfloat16 or float32"
        )
    try:
        from tokamax._src.ops.attention import api as tokamax_api
        from tokamax._src.ops.attention import base as tokamax_base
    except ImportError as e:
        raise ImportError(
            "attention impl 'tokamax' needs the tokamax package: pip install 'mpt-jax[tokamax]'"
        ) from e
    from absl import flags  # a dependency of tokamax

    from mpt_jax.kernels import tokamax_compat

    tokamax_compat.install()  # tokamax 0.0.12 on jax 0.11+: what its GPU kernels still call
    if not flags.FLAGS.is_parsed():
        # tokamax reads its absl options on each call and, outside absl.app, would parse
        # sys.argv for them first, failing on any argument of ours (mpt-jax's, pytest's): keep
        # absl's defaults instead
        flags.FLAGS.mark_as_parsed()
    T = k.shape[1]
    bias_1H1T = None
    if slopes is not None:
        slopes_H = jnp.asarray(slopes, jnp.float32)
        bias_1H1T = (
            slopes_H[None, :, None, None] * jnp.arange(T, dtype=jnp.float32)[None, None, None]
        )
    mask = tokamax_base.Mask(is_causal=causal)
    if segment_ids is not None:
        start_BS, end_BS = _segment_bounds(segment_ids)
        # (B, 1, S): per batch row, broadcast over heads, per query; with the causal mask the
        # run's end is implied (keys j <= i), and leaving it out keeps the kernels' causal path
        end_B1S = None if causal else end_BS[:, None]
        mask = tokamax_base.Mask(k_start=start_BS[:, None], k_end=end_B1S, is_causal=causal)
    names = _TOKAMAX_IMPLEMENTATIONS.get(backend(), _TOKAMAX_FALLBACK)
    errors = []
    for name in names:
        if name not in tokamax_api.IMPLEMENTATIONS:
            continue
        try:
            # tokamax broadcasts its mask ranges by rank promotion (tests make that an error);
            # the setting covers what is traced here, the forward and XLA's derived backward
            with jax.numpy_rank_promotion("allow"):
                out = tokamax_api.IMPLEMENTATIONS[name](
                    q, k, v, bias=bias_1H1T, mask=mask, logits_scale=scale
                )
        except (NotImplementedError, TypeError, ValueError) as e:
            # tokamax 0.0.12's Mosaic GPU kernel does not trace on a sequence that is not a
            # multiple of its block, nor off Hopper (H200, 2026-11-28): the next
            # implementation gets its turn, and the last one's own error is what the caller sees
            if name == names[-1] and not isinstance(e, NotImplementedError):
                raise
            errors.append(f"{name}: {type(e).__name__}: {e}")
            continue
        return out.astype(q.dtype)
    raise NotImplementedError(
        f"attention impl 'tokamax': no implementation ran ({'; '.join(errors)})"
    )
