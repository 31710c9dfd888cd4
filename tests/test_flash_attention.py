"""The Pallas flash-attention kernels (interpret mode on CPU) against the XLA reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mpt_jax import MPTForCausalLM
from mpt_jax.attention import alibi_slopes, attention
from mpt_jax.config import ModelConfig
from mpt_jax.kernels.flash_attention import flash_attention

CASES = {
    # B, S, H, G, K, segments, causal, dtype
    "gqa_segments_ragged": (2, 100, 4, 2, 32, True, True, jnp.float32),
    "12_heads": (1, 64, 12, 12, 16, False, True, jnp.float32),
    "mqa_not_causal_ragged": (1, 80, 4, 1, 32, False, False, jnp.float32),
    "bf16_head_dim_64": (1, 96, 4, 4, 64, True, True, jnp.bfloat16),
    "fp16_head_dim_112_mpt30b": (1, 64, 2, 2, 112, False, True, jnp.float16),
}


def _relative_error(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert np.isfinite(ours).all()
    return np.abs(ours - ref).max() / np.abs(ref).max()


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_and_gradients_match_reference(name):
    B, S, H, G, K, with_segments, causal, dtype = CASES[name]
    rng = np.random.default_rng(abs(hash(name)) % 2**32)  # fresh inputs for each case
    q = jnp.asarray(rng.standard_normal((B, S, H, K)), dtype)
    k = jnp.asarray(rng.standard_normal((B, S, G, K)), dtype)
    v = jnp.asarray(rng.standard_normal((B, S, G, K)), dtype)
    seg = jnp.asarray(np.sort(rng.integers(0, 3, (B, S)), axis=1)) if with_segments else None
    do = jnp.asarray(rng.standard_normal((B, S, H, K)), jnp.float32)
    kw = dict(alibi_slopes=alibi_slopes(H), segment_ids=seg, causal=causal, softmax_scale=0.2)

    def loss(fn):
        return lambda q, k, v: (fn(q, k, v).astype(jnp.float32) * do).sum()

    ours_fn = lambda q, k, v: flash_attention(q, k, v, block_q=32, block_k=32, interpret=True, **kw)
    ref_fn = lambda q, k, v: attention(q, k, v, impl="xla", **kw)
    out, ref = jax.jit(ours_fn)(q, k, v), ref_fn(q, k, v)
    grads = jax.jit(jax.grad(loss(ours_fn), argnums=(0, 1, 2)))(q, k, v)
    ref_grads = jax.grad(loss(ref_fn), argnums=(0, 1, 2))(q, k, v)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    assert out.dtype == dtype and out.shape == (B, S, H, K)
    assert _relative_error(out, ref) < tol
    for g, r, label in zip(grads, ref_grads, ("dq", "dk", "dv"), strict=True):
        assert g.shape == r.shape, label
        assert _relative_error(g, r) < tol, label


def test_model_with_pallas_attention_matches_xla():
    fields = dict(
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
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 100, (2, 40)))
    seg = jnp.asarray(np.repeat([[0] * 15 + [1] * 25], 2, axis=0))
    results = []
    for impl in ("xla", "pallas_gpu"):
        model = MPTForCausalLM(ModelConfig(**fields, attn_impl=impl), rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(p, graphdef=graphdef):
            logits = nnx.merge(graphdef, p)(ids, segment_ids=seg)
            return jnp.mean(jax.nn.logsumexp(logits, axis=-1)), logits

        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        results.append((logits, jax.tree.leaves(grads)))
    (ref_logits, ref_grads), (logits, grads) = results
    assert _relative_error(logits, ref_logits) < 1e-5
    for g, r in zip(grads, ref_grads, strict=True):
        assert _relative_error(g, r) < 1e-4
