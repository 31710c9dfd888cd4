"""ModelConfig: llm-foundry defaults, YAML and overrides, validation, presets, parameter counts."""

import math
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx

from mpt_jax import MPTForCausalLM
from mpt_jax.config import (
    ConfigError,
    InitConfig,
    ModelConfig,
    apply_overrides,
    count_params,
    load_model_config,
    param_shapes,
    preset_names,
    run_config_from_dict,
)


def test_defaults_are_llm_foundry_defaults():
    cfg = ModelConfig()
    assert (cfg.d_model, cfg.n_heads, cfg.n_layers) == (2048, 16, 24)
    assert (cfg.expansion_ratio, cfg.max_seq_len, cfg.vocab_size) == (4, 2048, 50368)
    assert cfg.resid_pdrop == cfg.emb_pdrop == cfg.attn_pdrop == 0.0
    assert cfg.learned_pos_emb and not cfg.no_bias and not cfg.alibi
    assert cfg.norm_type == "low_precision_layernorm" and cfg.norm_eps == 1e-5
    assert cfg.logit_scale is None and cfg.embedding_fraction == 1.0
    assert cfg.tie_word_embeddings and cfg.alibi_bias_max == 8
    assert cfg.attn_type == "multihead_attention" and cfg.num_kv_heads == 16
    assert cfg.clip_qkv is None and cfg.softmax_scale is None and not cfg.qk_ln
    assert not cfg.attn_uses_sequence_id
    assert cfg.ffn_type == "mptmlp" and cfg.ffn_act_fn == "gelu"
    assert cfg.init_config == InitConfig()
    init = cfg.init_config
    assert (init.name, init.fan_mode, init.init_nonlinearity) == (
        "kaiming_normal_",
        "fan_in",
        "relu",
    )
    assert init.init_div_is_residual is True and init.init_gain == 0.0
    assert cfg.resolved_softmax_scale == pytest.approx(1 / math.sqrt(128))


def test_derived_values():
    cfg = ModelConfig(d_model=768, n_heads=12, expansion_ratio=2.5, logit_scale="inv_sqrt_d_model")
    assert cfg.head_dim == 64 and cfg.ffn_hidden == 1920
    assert cfg.resolved_logit_scale == pytest.approx(1 / math.sqrt(768))
    assert ModelConfig(attn_type="multiquery_attention").num_kv_heads == 1
    gqa = ModelConfig(attn_type="grouped_query_attention", kv_n_heads=4)
    assert gqa.num_kv_heads == 4


EXPECTED_COUNTS = {
    "mpt-125m": 125_311_488,
    "mpt-350m": 355_985_408,
    "mpt-760m": 760_470_528,
    "mpt-1b": 1_315_950_592,
    "mpt-3b": 2_651_837_440,
    "mpt-7b": 6_658_859_008,
    "mpt-13b": 12_853_954_560,
    "mpt-30b": 29_975_214_080,
    "mpt-70b": 64_862_437_376,
    "mpt-7b-released": 6_649_286_656,
}


@pytest.mark.parametrize("name", sorted(EXPECTED_COUNTS))
def test_preset_parameter_counts_match_llm_foundry(name):
    assert count_params(load_model_config(name)) == EXPECTED_COUNTS[name]


def test_preset_shapes():
    assert set(EXPECTED_COUNTS) | {"mpt-30b-released"} <= set(preset_names())
    r7 = load_model_config("mpt-7b-released")
    assert r7.alibi and r7.no_bias and not r7.learned_pos_emb and r7.vocab_size == 50432
    r30 = load_model_config("mpt-30b-released")
    assert (r30.n_heads, r30.head_dim, r30.n_layers, r30.max_seq_len) == (64, 112, 48, 8192)
    y7 = load_model_config("mpt-7b")
    assert y7.learned_pos_emb and not y7.no_bias and not y7.alibi and y7.vocab_size == 50368
    # the closed form from llm-foundry's tables: V*d + S*d + L*(12d^2 + 13d) + 2d
    for name in ("mpt-125m", "mpt-13b", "mpt-70b"):
        c = load_model_config(name)
        d, L = c.d_model, c.n_layers
        assert count_params(c) == 50368 * d + 2048 * d + L * (12 * d * d + 13 * d) + 2 * d


@pytest.mark.parametrize(
    "fields",
    [
        dict(),
        dict(no_bias=True, alibi=True, learned_pos_emb=False, tie_word_embeddings=False),
        dict(attn_type="grouped_query_attention", kv_n_heads=2, qk_ln=True, ffn_type="mptglu"),
        dict(attn_type="multiquery_attention", norm_type="rmsnorm", expansion_ratio=2.5),
        dict(scan_layers=True, qk_ln=True),
    ],
)
def test_count_params_equals_model_parameters(fields):
    base = dict(d_model=64, n_heads=8, n_layers=3, vocab_size=96, max_seq_len=16)
    cfg = ModelConfig(**{**base, **fields})
    abstract = nnx.eval_shape(lambda: MPTForCausalLM(cfg, rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    assert sum(math.prod(x.shape) for x in leaves) == count_params(cfg)
    assert sum(math.prod(s) for s in param_shapes(cfg).values()) == count_params(cfg)


def test_yaml_with_nested_llm_foundry_sections_and_overrides(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            d_model: 64
            n_heads: 4
            n_layers: 2
            learned_pos_emb: false
            attn_config:
              alibi: true
              clip_qkv: 6
            ffn_config:
              ffn_type: mptglu
              ffn_act_fn: {name: silu}
            init_config:
              name: baseline_
              init_std: 0.02
            """
        )
    )
    cfg = load_model_config(path, ["n_layers=3", "softmax_scale=3e-1", "init_config.init_std=0.01"])
    assert cfg.n_layers == 3 and cfg.alibi and cfg.clip_qkv == 6.0
    assert cfg.ffn_type == "mptglu" and cfg.ffn_act_fn == "silu"
    assert cfg.softmax_scale == pytest.approx(0.3)
    assert cfg.init_config == InitConfig(name="baseline_", init_std=0.01)
    # the dict form round-trips
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_overrides_parse_types():
    data = apply_overrides(
        {"a": {"b": 1}}, ["a.b=2", "a.c=true", "x=null", "y=1e-3", "z=[1, 2]", "s=hi"]
    )
    assert data == {"a": {"b": 2, "c": True}, "x": None, "y": 1e-3, "z": [1, 2], "s": "hi"}
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(ConfigError, match="not a mapping"):
        apply_overrides({"a": 1}, ["a.b=2"])


def test_model_fields_override_a_preset_name():
    raw = {"model": "mpt-125m", "data": {"path": "d"}, "train": {"steps": 1}, "run_dir": "r"}
    fields = ["model.alibi=true", "model.learned_pos_emb=false", "model.n_layers=2"]
    cfg = run_config_from_dict(apply_overrides(raw, fields))
    preset = load_model_config("mpt-125m")
    assert cfg.model.alibi and cfg.model.n_layers == 2 and cfg.model.d_model == preset.d_model


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        ModelConfig().d_model = 3


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(d_model=100, n_heads=16), r"model\.n_heads: d_model \(100\) must be divisible"),
        (dict(attn_type="grouped_query_attention", kv_n_heads=3), r"model\.kv_n_heads: n_heads"),
        (dict(attn_type="grouped_query_attention"), r"model\.kv_n_heads: required"),
        (dict(kv_n_heads=4), r"model\.kv_n_heads: multihead_attention uses"),
        (dict(attn_type="multiquery_attention", kv_n_heads=2), r"model\.kv_n_heads: multiquery"),
        (dict(d_model=100, n_heads=4, expansion_ratio=1.333), r"model\.expansion_ratio"),
        (dict(alibi=True), r"model\.learned_pos_emb: cannot be true together with alibi"),
        (
            dict(norm_type="batchnorm"),
            r"model\.norm_type: must be one of 'low_precision_layernorm'",
        ),
        (dict(attn_type="flash"), r"model\.attn_type: must be one of"),
        (dict(attn_impl="triton"), r"model\.attn_impl: must be one of 'auto'"),
        (dict(ffn_type="moe"), r"model\.ffn_type: must be one of"),
        (dict(ffn_act_fn="gelu_tanh"), r"model\.ffn_act_fn: must be one of"),
        (dict(ffn_act_fn={"name": "tanh"}), r"model\.ffn_act_fn: must be one of"),
        (
            dict(ffn_act_fn={"name": "gelu", "approximate": "tanh"}),
            r"model\.ffn_act_fn: expected a name or \{name: gelu \| silu \| relu\} \(exact",
        ),
        (dict(n_layers="4"), r"model\.n_layers: expected int, got '4'"),
        (dict(n_layers=4.0), r"model\.n_layers: expected int, got 4\.0"),
        (dict(no_bias=1), r"model\.no_bias: expected bool, got 1"),
        (dict(d_model=0), r"model\.d_model: must be > 0"),
        (dict(resid_pdrop=1.0), r"model\.resid_pdrop: must be in \[0, 1\)"),
        (dict(embedding_fraction=0.0), r"model\.embedding_fraction: must be in \(0, 1\]"),
        (dict(clip_qkv=-1), r"model\.clip_qkv: must be > 0"),
        (
            dict(logit_scale="big"),
            r"model\.logit_scale: expected float \| 'inv_sqrt_d_model' \| null",
        ),
        (dict(dmodel=64), r"model\.dmodel: unknown key; allowed keys are"),
        (dict(init_config={"name": "xavier"}), r"model\.init_config\.name: must be one of"),
        (dict(init_config={"name": "baseline_"}), r"init_config\.init_std: baseline_ init needs"),
        (dict(init_config={"foo": 1}), r"model\.init_config\.foo: unknown key"),
        (dict(attn_config={"alibi": True}, alibi=False), r"model\.attn_config\.alibi: also given"),
    ],
)
def test_config_errors_name_the_field(fields, message):
    with pytest.raises(ConfigError, match=message) as info:
        ModelConfig.from_dict(fields)
    assert "\n" not in str(info.value)


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("d_model: [1,\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml line \d+: invalid YAML"):
        load_model_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: expected a mapping"):
        load_model_config(listy)
    with pytest.raises(ConfigError, match="neither a YAML file nor a preset"):
        load_model_config("mpt-1t")
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("# café\nd_model: 64\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml: not UTF-8 text \(byte 5"):
        load_model_config(latin1)
    # python-object tags are refused by the safe loader
    evil = tmp_path / "evil.yaml"
    evil.write_text("d_model: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_model_config(evil)


def test_unknown_key_in_yaml_names_file(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("d_model: 64\nn_heads: 4\nn_head: 4\n")
    with pytest.raises(ConfigError, match=r"m\.yaml\.n_head: unknown key"):
        load_model_config(path)


def test_param_shapes_names_follow_llm_foundry():
    cfg = ModelConfig(
        d_model=64,
        n_heads=8,
        n_layers=1,
        vocab_size=10,
        max_seq_len=8,
        qk_ln=True,
        attn_type="grouped_query_attention",
        kv_n_heads=2,
        tie_word_embeddings=False,
    )
    shapes = param_shapes(cfg)
    assert shapes["transformer.blocks.0.attn.Wqkv.weight"] == ((8 + 2 * 2) * 8, 64)
    assert shapes["transformer.blocks.0.attn.k_ln.weight"] == (16,)
    assert shapes["transformer.wpe.weight"] == (8, 64)
    assert shapes["lm_head.weight"] == (10, 64)
    assert np.all([not k.startswith("model.") for k in shapes])


def _run(**changes):
    from mpt_jax.config import run_config_from_dict

    raw = {
        "model": "mpt-125m",
        "data": {"path": "builtin:python-stdlib"},
        "train": {"steps": 10},
        "run_dir": "runs/x",
    }
    for key, value in changes.items():
        merge = isinstance(value, dict) and isinstance(raw.get(key, {}), dict)
        raw[key] = {**raw.get(key, {}), **value} if merge else value
    return run_config_from_dict(raw)


def test_run_config_presets_budgets_and_defaults():
    cfg = _run(model={"preset": "mpt-125m", "n_layers": 2, "alibi": True, "learned_pos_emb": False})
    assert cfg.model.n_layers == 2 and cfg.model.d_model == 768 and cfg.model.alibi
    assert cfg.optim.name == "decoupled_adamw" and cfg.optim.betas == (0.9, 0.95)
    assert cfg.schedule.name == "cosine_with_warmup" and cfg.train.precision == "amp_bf16"
    budget = _run(train={"steps": None, "tokens": 10_000, "global_batch": 4})
    assert budget.total_steps == math.ceil(10_000 / (4 * 2048))
    mix = _run(data={"path": None, "mixture": [{"path": "a", "weight": 0.7}, {"path": "b"}]})
    assert [s.weight for s in mix.data.mixture] == [0.7, 1.0]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(trian={"steps": 1}), r"^trian: unknown key; allowed keys are"),
        (dict(train={"steps": None}), r"train: give exactly one of train\.steps and train\.tokens"),
        (dict(train={"global_batch": 8, "microbatch": 3}), r"train\.microbatch: must divide"),
        (
            dict(train={"microbatch": "Auto"}),
            r"train\.microbatch: expected int \| 'auto' \| null, got 'Auto'",
        ),
        (dict(train={"precision": "fp16"}), r"train\.precision: must be one of 'amp_bf16'"),
        (
            dict(train={"mixed_precision": "pure"}),
            r"train\.mixed_precision: must be one of 'FULL' \| 'DEFAULT' \| 'PURE', got 'pure'",
        ),
        (dict(schedule={"t_warmup": "100"}), r"schedule\.t_warmup: '100' is not a time"),
        (
            dict(schedule={"name": "inv_sqrt_with_warmup", "t_warmup": "0.1dur"}),
            r"schedule\.t_warmup: '0\.1dur' cannot be in units of dur",
        ),
        (dict(optim={"betas": [0.9]}), r"optim\.betas: expected a list of float, float"),
        (dict(optim={"name": "sgd"}), r"optim\.name: must be one of 'decoupled_adamw'"),
        (dict(mesh={"data": -1, "fsdp": -1}), r"mesh: sizes must be positive with at most one -1"),
        (dict(data={"path": None}), r"data: give exactly one of data\.path and data\.mixture"),
        (
            dict(data={"path": None, "mixture": [{"path": "a", "weight": 0}]}),
            r"data\.mixture\[0\]\.weight: must be > 0",
        ),
        (dict(model={"preset": "mpt-125m", "n_heads": 7}), r"model\.n_heads: d_model \(768\)"),
        (dict(optim={"lr": float("nan")}), r"optim\.lr: expected a finite number, got nan"),
        (dict(optim={"eps": float("inf")}), r"optim\.eps: expected a finite number, got inf"),
        (dict(optim={"weight_decay": -1.0}), r"optim\.weight_decay: must be >= 0, got -1\.0"),
        (dict(schedule={"alpha_f": float("nan")}), r"schedule\.alpha_f: expected a finite"),
        (dict(optim={"betas": [0.9, float("nan")]}), r"optim\.betas\[1\]: expected a finite"),
        (dict(train={"eval_every": -1}), r"train\.eval_every: must be >= 0, got -1"),
        (dict(data={"prefetch": -1}), r"data\.prefetch: must be >= 0, got -1"),
        (
            dict(checkpoint={"every_minutes": float("inf")}),
            r"checkpoint\.every_minutes: expected a finite number, got inf",
        ),
        (dict(data={"num_threads": -1}), r"data\.num_threads: must be >= 0, got -1"),
        (
            dict(data={"eval": [{"path": "ds"}]}),
            r"^data\.eval\[0\]: missing required key 'label'$",
        ),
        (
            dict(data={"path": None, "mixture": [{"weight": 1.0}]}),
            r"^data\.mixture\[0\]: missing required key 'path'$",
        ),
    ],
)
def test_run_config_errors_name_the_field(changes, message):
    with pytest.raises(ConfigError, match=message):
        _run(**changes)


def test_exponent_floats_read_as_floats_in_files_and_overrides(tmp_path):
    from mpt_jax.config import load_run_config, load_yaml

    path = tmp_path / "run.yaml"
    path.write_text(
        "model: mpt-125m\ndata: {path: d}\nrun_dir: r\n"
        "optim: {lr: 3e-4, eps: 1E-8, betas: [0.9, .95]}\ntrain: {steps: 10, seed: 1_000}\n"
    )
    cfg = load_run_config(path)
    assert (cfg.optim.lr, cfg.optim.eps, cfg.optim.betas) == (3e-4, 1e-8, (0.9, 0.95))
    assert cfg.train.seed == 1000
    assert load_run_config(path, ["optim.betas=[9e-1, 0.99]"]).optim.betas == (0.9, 0.99)
    assert load_yaml(path)["run_dir"] == "r"
    quoted = tmp_path / "q.yaml"
    quoted.write_text("a: '1e-3'\nb: 1e-3x\nc: v1e3\n")
    assert load_yaml(quoted) == {"a": "1e-3", "b": "1e-3x", "c": "v1e3"}  # strings stay strings
    with pytest.raises(
        ConfigError, match=r"train\.tokens: .* \(write a whole number .*: 2500000000"
    ):
        load_run_config(path, ["train.steps=null", "train.tokens=2.5e9"])
