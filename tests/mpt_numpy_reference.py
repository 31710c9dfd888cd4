"""Independent float64 NumPy forward pass of llm-foundry's MPT, used as a test oracle.

Operates on a prefix-free llm-foundry / HF state dict in torch layout (Linear weights (out, in)).
Written from the llm-foundry math in shared/reference/mpt-llm-foundry-facts.md sections 1-2, 5.2.
Dropout is ignored (eval mode); embedding_fraction does not change the forward pass.
"""

import math

import numpy as np

try:
    from scipy.special import erf as _erf
except ImportError:  # scipy is not a declared dependency
    _erf = np.vectorize(math.erf, otypes=[np.float64])


def gen_slopes(n_heads: int, alibi_bias_max: float = 8) -> np.ndarray:
    """ALiBi slopes (n_heads,): 2^-(m * max/_n), _n the next power of two, odd/even interleave."""
    n_pow2 = 2 ** math.ceil(math.log2(n_heads))
    m = np.arange(1, n_pow2 + 1, dtype=np.float64) * (alibi_bias_max / n_pow2)
    slopes = 1.0 / 2.0**m
    if n_pow2 != n_heads:
        slopes = np.concatenate([slopes[1::2], slopes[::2]])[:n_heads]
    return slopes


def _norm(x, t, name, cfg):
    """LayerNorm (biased variance) or RMSNorm over the last axis; bias only if not no_bias."""
    w = t[f"{name}.weight"].astype(np.float64)
    eps = cfg["norm_eps"]
    if cfg["norm_type"] in ("rmsnorm", "low_precision_rmsnorm"):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w
    if cfg["norm_type"] not in ("layernorm", "low_precision_layernorm"):
        raise ValueError(f"unsupported norm_type {cfg['norm_type']!r}")
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    y = (x - mu) / np.sqrt(var + eps) * w
    if not cfg["no_bias"]:
        y = y + t[f"{name}.bias"]
    return y


def _linear(x, t, name, cfg):
    y = x @ t[f"{name}.weight"].astype(np.float64).T
    if not cfg["no_bias"]:
        y = y + t[f"{name}.bias"]
    return y


def _act(x, name):
    if name == "gelu":  # exact erf GELU
        return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))
    if name == "silu":
        return x / (1.0 + np.exp(-x))
    if name == "relu":
        return np.maximum(x, 0.0)
    raise ValueError(f"unsupported ffn_act_fn {name!r}")


def _n_kv_heads(cfg):
    attn_type = cfg["attn_type"]
    if attn_type == "multihead_attention":
        return cfg["n_heads"]
    if attn_type == "multiquery_attention":
        return 1
    if attn_type == "grouped_query_attention":
        return cfg["kv_n_heads"]
    raise ValueError(f"unsupported attn_type {attn_type!r}")


def _attention(x_BSD, t, p, cfg, mask_BST):
    B, S, D = x_BSD.shape
    H, KV = cfg["n_heads"], _n_kv_heads(cfg)
    hd = D // H
    assert H % KV == 0, (H, KV)
    qkv_BSE = _linear(x_BSD, t, f"{p}.Wqkv", cfg)
    if cfg["clip_qkv"]:
        qkv_BSE = np.clip(qkv_BSE, -cfg["clip_qkv"], cfg["clip_qkv"])
    q_BSQ = qkv_BSE[..., : H * hd]
    k_BSJ = qkv_BSE[..., H * hd : (H + KV) * hd]
    v_BSJ = qkv_BSE[..., (H + KV) * hd :]
    assert v_BSJ.shape[-1] == KV * hd, qkv_BSE.shape
    if cfg["qk_ln"]:
        q_BSQ = _norm(q_BSQ, t, f"{p}.q_ln", cfg)
        k_BSJ = _norm(k_BSJ, t, f"{p}.k_ln", cfg)
    q_BHSK = q_BSQ.reshape(B, S, H, hd).transpose(0, 2, 1, 3)
    # GQA: kv head j serves q heads j*r .. j*r+r-1 (np.repeat repeats consecutively).
    k_BHSK = np.repeat(k_BSJ.reshape(B, S, KV, hd).transpose(0, 2, 1, 3), H // KV, axis=1)
    v_BHSK = np.repeat(v_BSJ.reshape(B, S, KV, hd).transpose(0, 2, 1, 3), H // KV, axis=1)

    scale = cfg["softmax_scale"]
    if scale is None:
        scale = 1.0 / math.sqrt(D / H)
    s_BHST = np.einsum("bhsk,bhtk->bhst", q_BHSK, k_BHSK) * scale
    if cfg["alibi"]:
        slopes_H = gen_slopes(H, cfg["alibi_bias_max"])
        s_BHST = s_BHST + slopes_H[:, None, None] * (np.arange(S) - (S - 1))[None, None, :]
    s_BHST = np.where(mask_BST[:, None], s_BHST, -np.inf)
    s_BHST = s_BHST - s_BHST.max(axis=-1, keepdims=True)
    p_BHST = np.exp(s_BHST)
    p_BHST = p_BHST / p_BHST.sum(axis=-1, keepdims=True)
    o_BHSK = np.einsum("bhst,bhtk->bhsk", p_BHST, v_BHSK)
    o_BSQ = o_BHSK.transpose(0, 2, 1, 3).reshape(B, S, H * hd)
    return _linear(o_BSQ, t, f"{p}.out_proj", cfg)


def _ffn(x_BSD, t, p, cfg):
    up_BSF = _linear(x_BSD, t, f"{p}.up_proj", cfg)
    if cfg["ffn_type"] == "mptmlp":
        h_BSF = _act(up_BSF, cfg["ffn_act_fn"])
    elif cfg["ffn_type"] == "mptglu":
        h_BSF = _act(_linear(x_BSD, t, f"{p}.gate_proj", cfg), cfg["ffn_act_fn"]) * up_BSF
    else:
        raise ValueError(f"unsupported ffn_type {cfg['ffn_type']!r}")
    return _linear(h_BSF, t, f"{p}.down_proj", cfg)


def mpt_forward(
    cfg: dict,
    tensors: dict[str, np.ndarray],
    input_ids: np.ndarray,
    sequence_id: np.ndarray | None = None,
) -> np.ndarray:
    """Logits (B, S, V) in float64. input_ids (B, S) ints; sequence_id (B, S) ints or None."""
    t = tensors
    input_ids = np.asarray(input_ids)
    B, S = input_ids.shape
    if cfg["max_seq_len"] < S:
        raise ValueError(f"sequence length {S} exceeds max_seq_len {cfg['max_seq_len']}")
    assert cfg["d_model"] % cfg["n_heads"] == 0

    wte_VD = t["transformer.wte.weight"].astype(np.float64)
    x_BSD = wte_VD[input_ids]
    if cfg["learned_pos_emb"]:  # positions 0..S-1, not reset per packed document
        x_BSD = x_BSD + t["transformer.wpe.weight"].astype(np.float64)[:S][None]

    mask_BST = np.broadcast_to(np.tril(np.ones((S, S), dtype=bool)), (B, S, S))
    if cfg["attn_uses_sequence_id"] and sequence_id is not None:
        seq_BS = np.asarray(sequence_id)
        mask_BST = mask_BST & (seq_BS[:, :, None] == seq_BS[:, None, :])

    for i in range(cfg["n_layers"]):
        p = f"transformer.blocks.{i}"
        x_BSD = x_BSD + _attention(
            _norm(x_BSD, t, f"{p}.norm_1", cfg), t, f"{p}.attn", cfg, mask_BST
        )
        x_BSD = x_BSD + _ffn(_norm(x_BSD, t, f"{p}.norm_2", cfg), t, f"{p}.ffn", cfg)
    h_BSD = _norm(x_BSD, t, "transformer.norm_f", cfg)

    if cfg["tie_word_embeddings"]:
        logits_BSV = h_BSD @ wte_VD.T
    else:
        logits_BSV = h_BSD @ t["lm_head.weight"].astype(np.float64).T
    scale = cfg["logit_scale"]
    if scale is not None:
        if scale == "inv_sqrt_d_model":
            scale = 1.0 / math.sqrt(cfg["d_model"])
        logits_BSV = logits_BSV * float(scale)
    return logits_BSV
