"""Validates the NumPy MPT oracle (tests/mpt_numpy_reference.py) against transformers' MPT."""

import functools
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import mpt_numpy_reference as ref  # noqa: E402
from mpt_numpy_reference import gen_slopes, mpt_forward  # noqa: E402

TOL = 1e-4

# Configs transformers' MptForCausalLM supports: ALiBi, no bias, MHA, expansion 4, no wpe.
HF_CASES = {
    "d48_h12": dict(d_model=48, n_heads=12, n_layers=2, vocab_size=101, seq=16),
    "d80_h20_clip": dict(d_model=80, n_heads=20, n_layers=3, vocab_size=257, seq=32, clip_qkv=0.3),
    "d64_h4_scale_eps": dict(
        d_model=64, n_heads=4, n_layers=2, vocab_size=199, seq=24, softmax_scale=0.2, eps=1e-3
    ),
}
MAX_SEQ_LEN = 32
BATCH = 2


def oracle_cfg(**overrides) -> dict:
    cfg = dict(
        d_model=48,
        n_heads=12,
        n_layers=2,
        expansion_ratio=4,
        max_seq_len=MAX_SEQ_LEN,
        vocab_size=101,
        learned_pos_emb=False,
        no_bias=True,
        norm_type="low_precision_layernorm",
        norm_eps=1e-5,
        logit_scale=None,
        tie_word_embeddings=True,
        attn_type="multihead_attention",
        kv_n_heads=1,
        qk_ln=False,
        clip_qkv=None,
        softmax_scale=None,
        alibi=True,
        alibi_bias_max=8,
        attn_uses_sequence_id=False,
        ffn_type="mptmlp",
        ffn_act_fn="gelu",
    )
    unknown = set(overrides) - set(cfg)
    assert not unknown, unknown
    cfg.update(overrides)
    return cfg


@functools.cache
def hf_case(name: str):
    """(oracle cfg, numpy state dict, input_ids, HF fp32 logits) for one HF_CASES entry."""
    c = HF_CASES[name]
    clip, scale, eps = c.get("clip_qkv"), c.get("softmax_scale"), c.get("eps", 1e-5)
    hf_cfg = transformers.MptConfig(
        d_model=c["d_model"],
        n_heads=c["n_heads"],
        n_layers=c["n_layers"],
        expansion_ratio=4,
        max_seq_len=MAX_SEQ_LEN,
        vocab_size=c["vocab_size"],
        no_bias=True,
        attn_config={
            "alibi": True,
            "alibi_bias_max": 8,
            "clip_qkv": clip,
            "qk_ln": False,
            "softmax_scale": scale,
            "attn_pdrop": 0,
        },
        layer_norm_epsilon=eps,
        use_cache=False,
    )
    torch.manual_seed(1234)
    model = transformers.MptForCausalLM(hf_cfg).float()
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if "norm" in pname:
                torch.nn.init.normal_(param, mean=1.0, std=0.5)
            else:
                torch.nn.init.normal_(param, std=1.0 / math.sqrt(param.shape[-1]))
    model.eval()
    ids = torch.randint(
        0, c["vocab_size"], (BATCH, c["seq"]), generator=torch.Generator().manual_seed(7)
    )
    with torch.no_grad():
        hf_logits = model(input_ids=ids).logits.double().numpy()
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    assert np.array_equal(sd.pop("lm_head.weight"), sd["transformer.wte.weight"])  # tied
    cfg = oracle_cfg(
        d_model=c["d_model"],
        n_heads=c["n_heads"],
        n_layers=c["n_layers"],
        vocab_size=c["vocab_size"],
        norm_type="layernorm",
        norm_eps=eps,
        clip_qkv=clip,
        softmax_scale=scale,
    )
    return cfg, sd, ids.numpy(), hf_logits


@pytest.mark.parametrize("name", list(HF_CASES))
def test_oracle_matches_transformers(name):
    cfg, sd, ids, hf_logits = hf_case(name)
    assert not any(k.endswith(".bias") for k in sd)
    assert "transformer.wpe.weight" not in sd
    ours = mpt_forward(cfg, sd, ids)
    assert ours.dtype == np.float64 and ours.shape == hf_logits.shape
    assert np.abs(hf_logits).max() > 0.5  # logits are not trivially small
    diff = np.abs(ours - hf_logits).max()
    assert diff <= TOL, f"{name}: max abs diff {diff:.3e}"


# Each feature the HF comparison covers must matter: dropping it must break the match.
@pytest.mark.parametrize(
    ("name", "override"),
    [
        ("d48_h12", dict(alibi=False)),
        ("d48_h12", dict(alibi_bias_max=4)),
        ("d48_h12", dict(norm_type="rmsnorm")),
        ("d48_h12", dict(n_layers=1)),
        ("d80_h20_clip", dict(clip_qkv=None)),
        ("d64_h4_scale_eps", dict(softmax_scale=None)),
        ("d64_h4_scale_eps", dict(norm_eps=1e-5)),
        ("d64_h4_scale_eps", dict(logit_scale="inv_sqrt_d_model")),
    ],
)
def test_oracle_comparison_is_sensitive(name, override):
    cfg, sd, ids, hf_logits = hf_case(name)
    wrong = mpt_forward({**cfg, **override}, sd, ids)
    assert np.abs(wrong - hf_logits).max() > 100 * TOL


def test_oracle_gelu_is_exact_erf():
    x = np.linspace(-4, 4, 101)
    want = torch.nn.functional.gelu(torch.from_numpy(x), approximate="none").numpy()
    np.testing.assert_allclose(ref._act(x, "gelu"), want, rtol=0, atol=1e-12)
    tanh_gelu = torch.nn.functional.gelu(torch.from_numpy(x), approximate="tanh").numpy()
    assert np.abs(ref._act(x, "gelu") - tanh_gelu).max() > 1e-4


def alibi_paper_slopes(n: int) -> np.ndarray:
    """Closed form from the ALiBi paper (Press et al.), alibi_bias_max = 8."""

    def pow2(k):
        return [2.0 ** (-8.0 * h / k) for h in range(1, k + 1)]

    if math.log2(n).is_integer():
        return np.array(pow2(n))
    closest = 2 ** math.floor(math.log2(n))
    return np.array(pow2(closest) + pow2(2 * closest)[0::2][: n - closest])


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 32, 64])
@pytest.mark.parametrize("bias_max", [8, 4, 16])
def test_gen_slopes_power_of_two(n, bias_max):
    want = 2.0 ** (-bias_max * np.arange(1, n + 1) / n)
    np.testing.assert_allclose(gen_slopes(n, bias_max), want, rtol=1e-15, atol=0)


@pytest.mark.parametrize("n", [12, 20, 6, 40, 56, 8, 32])
def test_gen_slopes_matches_alibi_paper(n):
    got = gen_slopes(n)
    assert got.shape == (n,)
    np.testing.assert_allclose(got, alibi_paper_slopes(n), rtol=1e-15, atol=0)


def test_gen_slopes_matches_transformers_builder():
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    for n in (12, 20, 16):
        bias_HS = build_mpt_alibi_tensor(n, 8).double().numpy()[:, 0, :]  # (H, S) at key j
        want = gen_slopes(n)[:, None] * (np.arange(8) - 7)[None, :]
        np.testing.assert_allclose(bias_HS, want, rtol=1e-6, atol=0)


# --- Self-consistency checks for features transformers' MPT does not support ---


def _random_sd(cfg, seed=0):
    """Random llm-foundry state dict (tensor names per section 5.2) for the oracle's cfg."""
    rng = np.random.default_rng(seed)
    D, H, V = cfg["d_model"], cfg["n_heads"], cfg["vocab_size"]
    KV = {"multihead_attention": H, "multiquery_attention": 1}.get(
        cfg["attn_type"], cfg["kv_n_heads"]
    )
    hd, F = D // H, int(D * cfg["expansion_ratio"])

    def mat(o, i):
        return rng.normal(0, 1 / math.sqrt(i), (o, i))

    def norm(n):
        return rng.normal(1, 0.5, n)

    sd = {"transformer.wte.weight": mat(V, D), "transformer.norm_f.weight": norm(D)}
    for i in range(cfg["n_layers"]):
        p = f"transformer.blocks.{i}"
        sd |= {
            f"{p}.norm_1.weight": norm(D),
            f"{p}.attn.Wqkv.weight": mat((H + 2 * KV) * hd, D),
            f"{p}.attn.out_proj.weight": mat(D, H * hd),
            f"{p}.norm_2.weight": norm(D),
            f"{p}.ffn.up_proj.weight": mat(F, D),
            f"{p}.ffn.down_proj.weight": mat(D, F),
        }
    return sd


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = oracle_cfg(d_model=48, n_heads=6, attn_type="grouped_query_attention", kv_n_heads=2)
    sd = _random_sd(gqa)
    ids = np.random.default_rng(1).integers(0, 101, (2, 12))
    mha_sd = dict(sd)
    hd, H, KV = 8, 6, 2
    for i in range(2):
        w = sd[f"transformer.blocks.{i}.attn.Wqkv.weight"]
        q, k, v = np.split(w, [H * hd, (H + KV) * hd])
        rep = lambda a: np.repeat(a.reshape(KV, hd, -1), H // KV, axis=0).reshape(H * hd, -1)
        mha_sd[f"transformer.blocks.{i}.attn.Wqkv.weight"] = np.concatenate([q, rep(k), rep(v)])
    mha = {**gqa, "attn_type": "multihead_attention"}
    np.testing.assert_allclose(mpt_forward(gqa, sd, ids), mpt_forward(mha, mha_sd, ids), atol=1e-12)


def test_sequence_id_isolates_packed_documents():
    # With ALiBi and no wpe, a packed document's logits equal those of running it alone.
    cfg = oracle_cfg(attn_uses_sequence_id=True)
    sd = _random_sd(cfg, seed=2)
    ids = np.random.default_rng(3).integers(0, 101, (1, 20))
    seq = np.array([[0] * 7 + [1] * 13])
    packed = mpt_forward(cfg, sd, ids, seq)
    np.testing.assert_allclose(packed[:, :7], mpt_forward(cfg, sd, ids[:, :7]), atol=1e-10)
    np.testing.assert_allclose(packed[:, 7:], mpt_forward(cfg, sd, ids[:, 7:]), atol=1e-10)
    unpacked = mpt_forward({**cfg, "attn_uses_sequence_id": False}, sd, ids, seq)
    assert np.abs(unpacked[:, 7:] - packed[:, 7:]).max() > 1e-3
