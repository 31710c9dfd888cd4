"""Parity with transformers' MptForCausalLM, HF round trips, exports and bad HF folders."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from helpers import forward, random_hf_tensors, write_hf_folder

from mpt_jax import MPTForCausalLM, from_pretrained
from mpt_jax.config import ConfigError, ModelConfig
from mpt_jax.hf_checkpoint import CheckpointError, read_config
from mpt_jax.safetensors_io import CheckpointReader

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parent.parent
TINY = dict(d_model=32, n_heads=4, n_layers=1, vocab_size=50, max_seq_len=16)

HF_CONFIGS = {
    "12_heads": dict(d_model=48, n_heads=12, n_layers=2),
    "20_heads_clip": dict(d_model=80, n_heads=20, n_layers=3, clip_qkv=0.3),
    "4_heads_scale_eps": dict(d_model=64, n_heads=4, n_layers=2, softmax_scale=0.2, eps=1e-3),
    "8_heads_untied_4_layers": dict(d_model=64, n_heads=8, n_layers=4, tie=False),
}


def make_hf_model(
    d_model,
    n_heads,
    n_layers,
    clip_qkv=None,
    softmax_scale=None,
    eps=1e-5,
    tie=True,
    vocab=150,
    seed=0,
):
    """A transformers MPT with every parameter randomized (norms too)."""
    config = transformers.MptConfig(
        d_model=d_model,
        n_heads=n_heads,
        n_layers=n_layers,
        expansion_ratio=4,
        max_seq_len=40,
        vocab_size=vocab,
        no_bias=True,
        layer_norm_epsilon=eps,
        use_cache=False,
        tie_word_embeddings=tie,
        attn_config={
            "alibi": True,
            "alibi_bias_max": 8,
            "clip_qkv": clip_qkv,
            "qk_ln": False,
            "softmax_scale": softmax_scale,
            "attn_pdrop": 0,
        },
    )
    torch.manual_seed(seed)
    model = transformers.MptForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.numpy()


def saved_tensors(folder) -> dict[str, np.ndarray]:
    with CheckpointReader(folder) as reader:
        return {n: np.array(reader.read(n)) for n in reader.names()}


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_transformers_parity_and_bit_exact_round_trip(name, tmp_path):
    hf_model = make_hf_model(**HF_CONFIGS[name])
    src = tmp_path / "hf"
    hf_model.save_pretrained(src)
    ids = np.random.default_rng(0).integers(0, 150, (2, 33))
    ref = hf_logits(hf_model, ids)

    model = from_pretrained(src, scan_layers=name.endswith("4_layers"))
    ours = forward(model, ids)
    assert np.abs(ours - ref).max() <= 1e-4, np.abs(ours - ref).max()

    out = model.save_pretrained(tmp_path / "out")
    original, exported = saved_tensors(src), saved_tensors(out)
    assert original.keys() == exported.keys()
    for key in original:
        assert original[key].dtype == exported[key].dtype
        assert original[key].tobytes() == exported[key].tobytes(), key

    reloaded, info = transformers.MptForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    np.testing.assert_array_equal(hf_logits(reloaded.eval(), ids), ref)
    exported_config = json.loads((out / "config.json").read_text())
    assert exported_config["architectures"] == ["MptForCausalLM"]
    assert exported_config["attn_config"]["attn_pdrop"] == 0
    assert isinstance(exported_config["attn_config"]["attn_pdrop"], int)


def test_attention_dropout_is_exported_in_llm_foundry_keys(tmp_path):
    # transformers 5.x types attn_pdrop as an int: a nonzero one fails its load, so the export
    # is llm-foundry's (with a warning), which keeps the dropout for further training
    released = dict(alibi=True, no_bias=True, learned_pos_emb=False)  # else transformers' MPT
    cfg = ModelConfig(
        d_model=64,
        n_heads=4,
        n_layers=2,
        max_seq_len=32,
        vocab_size=150,
        attn_pdrop=0.1,
        **released,
    )
    from mpt_jax.hf_checkpoint import write_folder

    tensors = random_hf_tensors(cfg)
    entries = [(n, t.shape, t.dtype) for n, t in tensors.items()]
    with pytest.warns(UserWarning, match=r"cannot express this config \(attn_pdrop 0\.1\)"):
        out = write_folder(cfg, entries, tensors.__getitem__, tmp_path / "hf")
    exported = json.loads((out / "config.json").read_text())
    assert exported["architectures"] == ["MPTForCausalLM"]
    assert exported["attn_config"]["attn_pdrop"] == 0.1
    assert read_config(out) == cfg
    with pytest.raises(Exception, match="attn_pdrop"):
        transformers.MptForCausalLM.from_pretrained(out)


def test_bf16_and_sharded_export_load_in_transformers(tmp_path):
    hf_model = make_hf_model(d_model=64, n_heads=8, n_layers=2)
    hf_model.save_pretrained(tmp_path / "hf")
    model = from_pretrained(tmp_path / "hf")
    out = model.save_pretrained(tmp_path / "bf16", dtype="bfloat16", max_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).is_file() for s in shards)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    reloaded, info = transformers.MptForCausalLM.from_pretrained(
        out, output_loading_info=True, dtype=torch.bfloat16
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    state = hf_model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        if name == "lm_head.weight":
            continue
        expected = state[name].to(torch.bfloat16)  # torch's rounding, compared bit for bit
        assert torch.equal(tensor.view(torch.int16), expected.view(torch.int16)), name
    # mpt_jax reads its own sharded bf16 export back (as float32 parameters)
    again = from_pretrained(out)
    wte = np.asarray(again.wte.embedding[...])
    expected_wte = state["transformer.wte.weight"].to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(wte, expected_wte)


def test_pickle_checkpoint_refused_unless_opted_in(tmp_path):
    hf_model = make_hf_model(d_model=32, n_heads=4, n_layers=1)
    hf_model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    if not (tmp_path / "bin" / "pytorch_model.bin").exists():
        # transformers 5 always writes safetensors: build the legacy folder by hand
        (tmp_path / "bin" / "model.safetensors").unlink()
        torch.save(hf_model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="allow_pickle"):
        from_pretrained(tmp_path / "bin")
    model = from_pretrained(tmp_path / "bin", allow_pickle=True)
    ids = np.arange(20).reshape(2, 10)
    assert np.abs(forward(model, ids) - hf_logits(hf_model, ids)).max() <= 1e-4


def test_llm_foundry_only_config_exports_with_foundry_keys(tmp_path):
    cfg = ModelConfig(
        **TINY,
        qk_ln=True,
        attn_type="grouped_query_attention",
        kv_n_heads=2,
        ffn_type="mptglu",
    )
    model = from_pretrained(write_hf_folder(cfg, random_hf_tensors(cfg), tmp_path / "src"))
    with pytest.warns(UserWarning, match="llm-foundry") as record:
        out = model.save_pretrained(tmp_path / "out")
    message = str(record[0].message)
    assert "qk_ln" in message and "grouped_query_attention" in message and "biases" in message
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MPTForCausalLM"]
    assert config["attn_config"]["kv_n_heads"] == 2 and config["attn_config"]["qk_ln"] is True
    assert config["ffn_config"] == {
        "ffn_type": "mptglu",
        "ffn_act_fn": {"name": "gelu", "approximate": "none"},
    }
    assert config["norm_eps"] == 1e-5 and "llm-foundry" in config["mpt_jax_note"]
    assert read_config(out) == cfg
    names = set(saved_tensors(out))
    assert "transformer.blocks.0.attn.q_ln.weight" in names and "transformer.wpe.weight" in names


def test_transformers_config_semantics_are_applied(tmp_path):
    hf_model = make_hf_model(d_model=32, n_heads=4, n_layers=1)
    hf_model.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config.get("learned_pos_emb", True)  # transformers writes it, and ignores it
    cfg = read_config(tmp_path / "hf")
    assert cfg.alibi and not cfg.learned_pos_emb and cfg.no_bias
    config["attn_config"]["alibi"] = False  # transformers still applies ALiBi
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="alibi=False is ignored by transformers"):
        assert read_config(tmp_path / "hf").alibi
    # fields transformers' MptForCausalLM never reads: each warned about, and the logits stay
    # transformers' own
    config["logit_scale"], config["no_bias"], config["norm_type"] = 0.5, False, "rmsnorm"
    config["attn_config"]["qk_ln"] = True
    config["ffn_config"] = {"ffn_type": "mptglu", "ffn_act_fn": {"name": "silu"}}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = from_pretrained(tmp_path / "hf")
    said = " ".join(str(w.message) for w in caught)
    for field in ("logit_scale=0.5", "no_bias=False", "qk_ln=True", "norm_type='rmsnorm'"):
        assert f"{field} is ignored by transformers" in said, field
    assert "ffn_type='mptglu'" in said and "ffn_act_fn='silu'" in said
    ids = np.random.default_rng(1).integers(0, 150, (2, 17))
    np.testing.assert_allclose(forward(model, ids), hf_logits(hf_model, ids), atol=1e-4, rtol=0)


def test_llm_foundry_attention_temperature_tuning_is_refused(tmp_path):
    hf_model = make_hf_model(d_model=32, n_heads=4, n_layers=1)
    hf_model.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["architectures"] = ["MPTForCausalLM"]  # llm-foundry's own format
    config["attn_config"]["attn_temperature_tuning"] = {"floor_scale": 8192, "attn_scale": 0.0}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    assert read_config(tmp_path / "hf").alibi  # the default, off: accepted
    config["attn_config"]["attn_temperature_tuning"]["attn_scale"] = 0.1
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"attn_temperature_tuning=.* is not supported"):
        read_config(tmp_path / "hf")


def test_export_refuses_non_empty_folder_and_leaves_nothing_on_failure(tmp_path):
    cfg = ModelConfig(
        **TINY,
        alibi=True,
        learned_pos_emb=False,
        no_bias=True,
    )
    model = MPTForCausalLM.from_pretrained(
        write_hf_folder(cfg, random_hf_tensors(cfg), tmp_path / "m")
    )
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match=r"busy: already exists and is not empty"):
        model.save_pretrained(tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "x"
    # overwrite replaces an HF folder (an earlier export), never other files or a file
    with pytest.raises(CheckpointError, match=r"busy: holds no HF model \(no config\.json\)"):
        model.save_pretrained(tmp_path / "busy", overwrite=True)
    assert (tmp_path / "busy" / "keep.txt").read_text() == "x"
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match=r"file: is a file; the model is written as a"):
        model.save_pretrained(tmp_path / "file", overwrite=True)
    assert (tmp_path / "file").read_text() == "x"
    model.save_pretrained(tmp_path / "export")
    (tmp_path / "export" / "keep.txt").write_text("x")
    model.save_pretrained(tmp_path / "export", overwrite=True)
    assert not (tmp_path / "export" / "keep.txt").exists()
    assert read_config(tmp_path / "export") == cfg

    entries = [(n, t.shape, t.dtype) for n, t in model.hf_tensors()]

    def failing_fetch(name):
        raise OSError("disk full")

    from mpt_jax.hf_checkpoint import write_folder

    with pytest.raises(OSError, match="disk full"):
        write_folder(cfg, entries, failing_fetch, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "export", "file", "m"]

    # overwrite replaces exports, never a training run
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"run: holds an mpt_jax run; export to another"):
        model.save_pretrained(tmp_path / "run", overwrite=True)
    assert (tmp_path / "run" / "checkpoints").is_dir()


def _corrupt(folder: Path, how: str) -> None:
    config_path = folder / "config.json"
    if how == "no_config":
        config_path.unlink()
    elif how == "bad_json":
        config_path.write_text("{not json")
    elif how == "wrong_model_type":
        config = json.loads(config_path.read_text())
        config["model_type"] = "llama"
        config_path.write_text(json.dumps(config))
    elif how == "no_weights":
        (folder / "model.safetensors").unlink()
    elif how == "truncated":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) - 100])


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("no_config", r"config\.json: missing"),
        ("bad_json", r"config\.json: not valid JSON"),
        ("wrong_model_type", r"config\.json: model_type is 'llama', expected 'mpt'"),
        ("no_weights", r"no weights found"),
        ("truncated", r"model\.safetensors"),
    ],
)
def test_bad_hf_folders_give_one_clear_error(tmp_path, how, message):
    cfg = ModelConfig(**TINY)
    folder = write_hf_folder(cfg, random_hf_tensors(cfg), tmp_path / "m")
    _corrupt(folder, how)
    with pytest.raises(CheckpointError, match=message) as info:
        from_pretrained(folder)
    assert "\n" not in str(info.value)


def test_missing_folder_and_wrong_tensors(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope: not a directory"):
        from_pretrained(tmp_path / "nope")
    (tmp_path / "run").mkdir()  # a run that saved nothing: named as a run, not an HF folder
    (tmp_path / "run" / "config.yaml").write_text("run_dir: run\n")
    with pytest.raises(ConfigError, match=r"run: a run folder without checkpoints/ \("):
        from_pretrained(tmp_path / "run")
    cfg = ModelConfig(**TINY)
    tensors = random_hf_tensors(cfg)
    bad_shape = dict(tensors)
    bad_shape["transformer.blocks.0.attn.Wqkv.weight"] = np.zeros((95, 32), np.float32)
    with pytest.raises(
        CheckpointError,
        match=r"tensor transformer\.blocks\.0\.attn\.Wqkv\.weight has shape \(95, 32\), "
        r"expected \(96, 32\)",
    ):
        from_pretrained(write_hf_folder(cfg, bad_shape, tmp_path / "shape"))
    missing = {k: v for k, v in tensors.items() if k != "transformer.norm_f.bias"}
    with pytest.raises(CheckpointError, match=r"tensor transformer\.norm_f\.bias is missing"):
        from_pretrained(write_hf_folder(cfg, missing, tmp_path / "missing"))
    extra = dict(tensors, **{"transformer.blocks.0.attn.rotary.weight": np.zeros(3, np.float32)})
    with pytest.raises(
        CheckpointError, match=r"unexpected tensor transformer\.blocks\.0\.attn\.rotary"
    ):
        from_pretrained(write_hf_folder(cfg, extra, tmp_path / "extra"))


def test_unsupported_llm_foundry_features_are_named(tmp_path):
    cfg = ModelConfig(**TINY)
    folder = write_hf_folder(cfg, random_hf_tensors(cfg), tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["attn_config"]["rope"] = True
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"attn_config\.rope=True is not supported"):
        from_pretrained(folder)
    # attention_bias (None: not no_bias) is Wqkv's bias alone: only the other layers' choice
    del config["attn_config"]["rope"]
    for attention_bias, loads in ((None, True), (True, True), (False, False)):
        (folder / "config.json").write_text(
            json.dumps({**config, "attention_bias": attention_bias})
        )
        if loads:
            assert not from_pretrained(folder).config.no_bias
        else:
            with pytest.raises(CheckpointError, match="attention_bias=False with no_bias=False"):
                from_pretrained(folder)


@pytest.mark.parametrize(
    "init",
    [
        {"name": "xavier_uniform_"},  # llm-foundry's, not mpt_jax's
        {"init_nonlinearity": "tanh"},
        {"emb_init_std": 0.0},
    ],
)
def test_an_init_config_mpt_jax_lacks_loads_the_weights_with_a_warning(tmp_path, init):
    cfg = ModelConfig(**TINY)
    tensors = random_hf_tensors(cfg)
    folder = write_hf_folder(cfg, tensors, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "init_config": init}))
    with pytest.warns(UserWarning, match="init_config left at mpt_jax's defaults"):
        model = from_pretrained(folder)
    assert model.config.init_config == ModelConfig().init_config
    np.testing.assert_array_equal(
        np.asarray(dict(model.hf_tensors())["transformer.wte.weight"]),
        tensors["transformer.wte.weight"],
    )


def test_a_config_built_in_python_is_held_to_its_choices():
    from mpt_jax.config import ConfigError, InitConfig

    with pytest.raises(ConfigError, match=r"model\.norm_type: must be one of"):
        ModelConfig(**TINY, norm_type="rms_norm")  # would have been a LayerNorm
    with pytest.raises(ConfigError, match=r"init_config\.name: must be one of"):
        InitConfig(name="xavier_uniform_")  # would have been small_init_


def test_convert_hf_command_line(tmp_path):
    hf_model = make_hf_model(d_model=32, n_heads=4, n_layers=2)
    ids = {"bos_token_id": 5, "eos_token_id": 7, "pad_token_id": 3}
    hf_model.config.update(ids)
    hf_model.save_pretrained(tmp_path / "hf")
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "convert_hf.py"),
            str(tmp_path / "hf"),
            str(tmp_path / "out"),
            "--dtype",
            "bfloat16",
            "--max-shard-size",
            "20KB",
            "--check",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "transformers: loadable" in result.stdout and "max |logits diff|" in result.stdout
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = transformers.MptForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.dtype == torch.bfloat16
    # the special-token ids come along: generate() still stops at the model's EOS
    assert {k: getattr(reloaded.config, k) for k in ids} == ids
    bad = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "convert_hf.py"),
            str(tmp_path / "nope"),
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode != 0 and "nope: not a directory" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    # in place (or into a folder above SRC), replacing DST would delete SRC's other files
    (tmp_path / "hf" / "tokenizer.json").write_text("{}")
    for dst in (tmp_path / "hf", tmp_path):
        same = subprocess.run(
            [sys.executable, REPO / "tools" / "convert_hf.py", tmp_path / "hf", dst, "--overwrite"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert same.returncode == 2 and "is SRC or holds it" in same.stderr
    assert (tmp_path / "hf" / "tokenizer.json").read_text() == "{}"


def test_jnp_dtype_names_accepted(tmp_path):
    cfg = ModelConfig(**TINY)
    model = from_pretrained(
        write_hf_folder(cfg, random_hf_tensors(cfg), tmp_path / "m"), param_dtype=jnp.bfloat16
    )
    assert model.wte.embedding[...].dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="dtype: must be float32, bfloat16 or float16"):
        model.save_pretrained(tmp_path / "o", dtype="int8")
    out = model.save_pretrained(tmp_path / "o")
    assert saved_tensors(out)["transformer.wte.weight"].dtype == ml_dtypes.bfloat16
