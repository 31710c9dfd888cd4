"""Causal multi-head attention with ALiBi, segment masking and GQA behind one function.

Shapes: B batch, S query length, T key length, H query heads, G kv heads (H % G == 0),
R = H // G query heads per kv head, K head dim.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

IMPLS = ("auto", "xla", "cudnn", "pallas_gpu", "pallas_tpu")


def alibi_slopes(n_heads: int, alibi_bias_max: float = 8) -> np.ndarray:
    """llm-foundry's gen_slopes: (n_heads,) float32, non-power-of-two counts interleaved."""
    n_pow2 = 2 ** math.ceil(math.log2(n_heads))
    m = np.arange(1, n_pow2 + 1, dtype=np.float32) * np.float32(alibi_bias_max / n_pow2)
    slopes = np.float32(1.0) / np.power(np.float32(2.0), m)
    if n_pow2 != n_heads:
        slopes = np.concatenate([slopes[1::2], slopes[::2]])[:n_heads]
    return slopes.astype(np.float32)


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
    _, S, H, K = q_BSHK.shape
    G = k_BTGK.shape[2]
    if H % G:
        raise ValueError(f"attention: {H} query heads are not a multiple of {G} kv heads")
    if segment_ids is not None and k_BTGK.shape[1] != S:
        raise ValueError("attention: segment_ids need equal query and key lengths")
    scale = 1.0 / math.sqrt(K) if softmax_scale is None else float(softmax_scale)
    if impl == "auto":
        alibi = alibi_slopes is not None
        impl = "xla" if decoding else auto_impl(q_BSHK, dropout_rate, alibi=alibi)
    if impl in ("cudnn", "pallas_gpu", "pallas_tpu") and dropout_rate:
        raise ValueError(f"attention impl {impl!r}: attention dropout is not supported")
    if impl == "cudnn":
        return _cudnn_attention(q_BSHK, k_BTGK, v_BTGK, alibi_slopes, segment_ids, causal, scale)
    if impl in ("pallas_gpu", "pallas_tpu"):
        if impl == "pallas_gpu":
            from mpt_jax.kernels.flash_attention import flash_attention as kernel
        else:
            from mpt_jax.kernels.flash_attention_tpu import flash_attention_tpu as kernel
        native = "gpu" if impl == "pallas_gpu" else "tpu"
        return kernel(
            q_BSHK,
            k_BTGK,
            v_BTGK,
            alibi_slopes=alibi_slopes,
            segment_ids=segment_ids,
            causal=causal,
            softmax_scale=scale,
            interpret=jax.default_backend() != native,  # elsewhere the same kernel, interpreted
        )
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


def auto_impl(q_BSHK: jax.Array, dropout_rate: float, *, alibi: bool) -> str:
    """The fastest correct implementation for this backend and input.

    On a GPU with bf16/fp16 inputs: our Pallas kernel for ALiBi (cuDNN would need a materialized
    bias; measured faster end to end on an H200, docs/benchmarks.md), cuDNN without ALiBi.
    On a TPU (bf16, fp16, fp32; head dim up to 256): our Pallas TPU kernel.
    Elsewhere, or with attention dropout: the XLA reference.
    """
    backend, K = jax.default_backend(), q_BSHK.shape[-1]
    if dropout_rate:
        return "xla"
    if backend == "tpu":
        tpu_ok = q_BSHK.dtype in (jnp.bfloat16, jnp.float16, jnp.float32) and K <= 256
        return "pallas_tpu" if tpu_ok else "xla"
    if backend != "gpu" or q_BSHK.dtype not in (jnp.bfloat16, jnp.float16):
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
    s_BGRST = jnp.einsum("bsgrk,btgk->bgrst", q_BSGRK, k, preferred_element_type=jnp.float32)
    s_BGRST = s_BGRST * scale
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
