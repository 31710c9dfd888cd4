"""llm-foundry training YAMLs translated into run configs: the recipe, a run, refusals."""

import json
import re
import sys
from pathlib import Path

import jax
import pytest
import yaml

from mpt_jax.config import ConfigError, load_run_config, to_dict
from mpt_jax.foundry_yaml import load_foundry_yaml, translate
from mpt_jax.optim import lr_multiplier
from mpt_jax.train import run

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import from_foundry  # noqa: E402

# scripts/train/yamls/pretrain/mpt-125m.yaml as the llm-foundry facts describe it
# (../shared/reference/mpt-llm-foundry-facts.md, section 3.1), with its variables block
FOUNDRY_125M = """
variables:
  data_local: ./my-copy-c4
  data_remote:
  max_seq_len: 2048
  global_seed: 17
  run_name:
max_seq_len: ${variables.max_seq_len}
run_name: ${variables.run_name}
model:
  name: mpt_causal_lm
  init_device: meta
  d_model: 768
  n_heads: 12
  n_layers: 12
  expansion_ratio: 4
  max_seq_len: ${variables.max_seq_len}
  vocab_size: 50368
  attn_config:
    attn_impl: flash
tokenizer:
  name: EleutherAI/gpt-neox-20b
  kwargs:
    model_max_length: ${variables.max_seq_len}
train_loader:
  name: text
  dataset:
    local: ${variables.data_local}
    remote: ${variables.data_remote}
    split: train
    shuffle: true
    max_seq_len: ${variables.max_seq_len}
    shuffle_seed: ${variables.global_seed}
  drop_last: true
  num_workers: 8
eval_loader:
  name: text
  dataset:
    local: ${variables.data_local}
    split: val
scheduler:
  name: cosine_with_warmup
  t_warmup: 100ba
  alpha_f: 0.1
optimizer:
  name: decoupled_adamw
  lr: 6.0e-4
  betas: [0.9, 0.95]
  eps: 1.0e-08
  weight_decay: 0.0
algorithms:
  gradient_clipping:
    clipping_type: norm
    clipping_threshold: 1.0
max_duration: 4800ba
eval_interval: 500ba
eval_first: false
eval_subset_num_batches: -1
global_train_batch_size: 256
seed: ${variables.global_seed}
device_eval_batch_size: 16
device_train_microbatch_size: 16
precision: amp_bf16
fsdp_config:
  sharding_strategy: FULL_SHARD
  mixed_precision: PURE
  activation_checkpointing: false
  activation_checkpointing_reentrant: false
  activation_cpu_offload: false
  limit_all_gathers: true
progress_bar: false
log_to_console: true
console_log_interval: 1ba
callbacks:
  speed_monitor:
    window_size: 10
  lr_monitor: {}
  memory_monitor: {}
  runtime_estimator: {}
save_interval: 500ba
"""


@pytest.fixture(scope="module")
def rows_of_2048(tmp_path_factory):
    """A dataset of the 125m YAML's seq_len (byte tokens), as the tool checks."""
    return _prepared(tmp_path_factory.mktemp("seq2048"), "c4", 1500, seq_len=2048)


def test_the_125m_pretraining_yaml_becomes_our_125m_recipe(rows_of_2048, tmp_path, capsys):
    (tmp_path / "mpt-125m.yaml").write_text(FOUNDRY_125M)
    out = tmp_path / "run.yaml"
    argv = [str(tmp_path / "mpt-125m.yaml"), "--data", str(rows_of_2048), "-o", str(out)]
    assert from_foundry.main(argv) == 0
    ours = load_run_config(out)
    recipe = load_run_config(REPO / "experiments" / "recipes" / "mpt-125m.yaml")
    for section in ("model", "optim", "schedule", "mesh"):
        assert to_dict(getattr(ours, section)) == to_dict(getattr(recipe, section)), section
    # the recipe evaluates 100 batches; llm-foundry's eval_subset_num_batches -1 is all of them
    train = {**to_dict(ours.train), "eval_batches": 100, "progress": True, "log_every": 10}
    assert train == to_dict(recipe.train)
    assert ours.train.eval_batches is None and not ours.train.progress
    assert ours.train.log_every == 1 and ours.checkpoint.every == 500
    header = out.read_text()
    assert "# callbacks.speed_monitor: dropped (built in: tokens_per_s, mfu)" in header
    assert "# model.attn_config.attn_impl: 'flash' dropped" in header
    assert "device_train_microbatch_size: 16 per device" in header
    # the data: how to prepare it from the StreamingDataset's MDS folders
    command = "python tools/prepare_data.py ./my-copy-c4/train --val-input ./my-copy-c4/val"
    assert f"{command} --tokenizer TOKENIZER --seq-len 2048 --out DIR" in header
    # per device x 8 devices, and the byte tokenizer of the dataset
    assert from_foundry.main([*argv, "--devices", "8"]) == 2  # -o exists
    assert "run.yaml already exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert load_run_config(out).train.microbatch == "auto"  # untouched
    assert from_foundry.main([*argv, "--devices", "8", "--overwrite"]) == 0
    assert load_run_config(out).train.microbatch == 128
    assert load_run_config(out).data.tokenizer == "byte"
    # the older layout, variables at the top level, translates the same
    top = "data_local: ./my-copy-c4\ndata_remote:\nmax_seq_len: 2048\nglobal_seed: 17\nrun_name:\n"
    old = top + FOUNDRY_125M.split("run_name: ${variables.run_name}\n")[1]
    (tmp_path / "old.yaml").write_text(old.replace("${variables.", "${"))
    translations = [
        translate(load_foundry_yaml(tmp_path / name), data=str(rows_of_2048)).config
        for name in ("old.yaml", "mpt-125m.yaml")
    ]
    assert translations[0] == translations[1]


TINY = """
variables:
  seq: 32
run_name: tiny-${variables.seq}
model:
  name: mpt_causal_lm
  d_model: 64
  n_heads: 4
  n_layers: 2
  max_seq_len: ${variables.seq}
  vocab_size: 320   # the byte tokenizer's 258 and the streams' BPE of 300
  no_bias: true
  attn_config:
    attn_impl: triton
    alibi: true
    rope: false
  ffn_config:
    ffn_type: mptmlp
    ffn_act_fn:
      name: gelu
optimizer: {name: decoupled_lionw, lr: 1.0e-4, betas: [0.9, 0.99], weight_decay: 0.0}
scheduler: {name: linear_decay_with_warmup, t_warmup: 16sp, alpha_f: 0.1, scale_warmup: false}
max_duration: 96sp
global_train_batch_size: 16
device_train_microbatch_size: 1
precision: fp32
eval_interval: 0.5dur
save_interval: 2ba
save_num_checkpoints_to_keep: -1
callbacks:
  kill_loss_spike: {log_only: false, patience: 2}
  generate: {prompts: [hi]}
"""


def test_a_translated_yaml_trains(small_dataset, tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY)
    config = translate(
        load_foundry_yaml(tmp_path / "tiny.yaml"),
        data=str(small_dataset / "ds"),
        run_dir=str(tmp_path / "run"),
        devices=jax.device_count(),
    )
    assert "callbacks.generate: dropped (samples: mpt-jax generate on a checkpoint)" in config.notes
    assert any(note.startswith("algorithms.gradient_clipping: absent") for note in config.notes)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config.config))
    cfg = load_run_config(tmp_path / "run.yaml")
    assert (cfg.train.steps, cfg.train.eval_every) == (6, 3)
    assert cfg.train.microbatch == min(16, jax.device_count())  # 1 per device
    assert (
        cfg.model.alibi and not cfg.model.learned_pos_emb and cfg.optim.clipping_threshold is None
    )
    assert (cfg.train.loss_spike.action, cfg.train.loss_spike.patience) == ("stop", 2)
    assert (cfg.checkpoint.every, cfg.checkpoint.keep_every) == (2, 2)
    assert cfg.mesh.data == -1 and cfg.mesh.fsdp == 1  # no fsdp_config: DDP
    final = run(cfg)
    assert final["step"] == 6 and "val_loss" in final
    steps = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert steps == [2, 4, 6]  # -1: every checkpoint kept


def test_dur_of_a_run_in_samples_is_taken_in_samples(small_dataset, tmp_path):
    # composer: 0.3dur of 96sp is int(28.8) = 28 samples, 1.75 steps of 16, so the update at
    # step 1 (16 samples in) has 16/28 of the warmup; in whole steps it would be 1 of 1
    data = yaml.safe_load(TINY)
    data["scheduler"]["t_warmup"] = "0.3dur"
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(data))
    config = translate(
        load_foundry_yaml(tmp_path / "tiny.yaml"), data=str(small_dataset / "ds"), devices=1
    )
    assert config.config["schedule"]["t_warmup"] == "28sp"
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config.config))
    cfg = load_run_config(tmp_path / "run.yaml")
    alpha = lr_multiplier(
        cfg.schedule,
        total_steps=cfg.train.steps,
        tokens_per_step=16 * 32,
        global_batch=cfg.train.global_batch,
    )
    assert float(alpha(1)) == pytest.approx(16 / 28)  # warming up to alpha_i 1


def _with(tmp_path, path, value):
    data = yaml.safe_load(TINY)
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value
    (tmp_path / "changed.yaml").write_text(yaml.safe_dump(data))
    return tmp_path / "changed.yaml"


@pytest.mark.parametrize(
    "path, value, message",
    [
        (("max_duration",), "2ep", "max_duration: 2ep is in epochs"),
        (("max_duration",), 3, "max_duration: expected a time"),
        (("max_duration",), "20sp", "max_duration: 20sp is not a whole number of batches of 16"),
        (("precision",), "amp_fp16", "precision: 'amp_fp16' is not supported"),
        (("algorithms", "low_precision_layernorm"), {}, "algorithms.low_precision_layernorm: not"),
        (("algorithms", "gradient_clipping"), {"clipping_type": "norm"}, "threshold: required"),
        (("algorithms",), {"gradient_clipping": 1.0}, "gradient_clipping: expected a mapping"),
        (("optimizer", "name"), "adam", "optimizer.name: 'adam' is not supported"),
        (("optimizer", "eps"), 1e-8, "optimizer.eps: not an argument of llm-foundry's decoupled_l"),
        (("optimizer", "betas"), 0.9, "optimizer.betas: expected two numbers"),
        (("model", "attn_config", "rope"), True, "model.attn_config.rope: True is not supported"),
        (("model", "d_modell"), 5, "model.d_modell: unknown key"),
        (("model", "max_seq_len"), "${variables.nope}", "variables.nope"),
        (("fsdp_config", "activation_cpu_offload"), True, "offloading to the CPU"),
        (("icl_tasks",), [{"label": "x"}], "icl_tasks: given inline"),
        (("load_path",), "ckpt.pt", "load_path: ckpt.pt is a composer checkpoint"),
        (("eval_interval",), 1, "eval_interval: 1 cannot be translated"),
        (("callbacks",), ["speed_monitor"], "callbacks: expected a mapping"),
        (("callbacks", "layer_freezing"), {}, "callbacks.layer_freezing: not supported"),
        (("callbacks", "my_callback"), {}, "callbacks.my_callback: unknown to the translation"),
        (("train_loader",), {"dataset": 5}, "train_loader.dataset: expected a mapping"),
        (("accumulate_train_batch_on_tokens",), False, "accumulate_train_batch_on_tokens"),
        (("train_loader",), {"name": "finetuning"}, "train_loader.name: 'finetuning'"),
        (("train_loader", "collate"), 1, "train_loader.collate: a key this translation does not"),
        (("train_loader", "dataset", "bogus"), 1, "train_loader.dataset.bogus: a key this"),
        (("train_loader", "dataset", "shuffle"), "maybe", "dataset.shuffle: expected true or"),
        (
            ("train_loader", "dataset", "streams"),
            {"c4": {"local": "/c4"}, "code": {"local": "/code"}},
            r"mixes 2 streams \(c4, code\); give --data NAME=DIR for each",
        ),
        (("algorithms", "gradient_clipping"), {"clipping_threshold": 1.0}, "type: required"),
        (
            ("algorithms", "gradient_clipping"),
            {"clipping_type": "norm", "clipping_threshold": 1.0, "foo": 3},
            "gradient_clipping.foo: not an argument of composer's GradientClipping",
        ),
        (
            ("callbacks", "kill_loss_spike"),
            {"patiance": 2},
            "callbacks.kill_loss_spike.patiance: not an argument of llm-foundry's KillLossSpike",
        ),
        (("callbacks", "hf_checkpointer"), {"bogus": 1}, "hf_checkpointer.bogus: not an arg"),
        (("scheduler", "alpha"), 0.5, "scheduler.alpha: not an argument of linear_decay_with"),
        (
            ("scheduler",),
            {"name": "inv_sqrt_with_warmup", "t_warmup": "16sp"},
            "scheduler.t_scale: required by inv_sqrt_with_warmup",
        ),
        (
            ("scheduler",),
            {
                "name": "inv_sqrt_with_warmup",
                "t_warmup": "0.1dur",
                "t_scale": "16sp",
                "t_cooldown": "0sp",
            },
            "scheduler.t_warmup: in dur, which inv_sqrt_with_warmup refuses",
        ),
        (
            ("scheduler", "t_warmup"),
            "1ba",
            r"scheduler.t_warmup: 1ba is in ba and t_max in sp \(max_duration's unit unless "
            r"given\), which composer refuses",
        ),
        (
            ("scheduler", "t_max"),
            "0.5dur",
            r"scheduler.t_max: 48sp ends before max_duration \(96sp\), which composer refuses",
        ),
        (
            ("global_train_batch_size",),
            6,
            "global_train_batch_size: 6 is not divisible by --devices 4, which llm-foundry",
        ),
        (("eval_first",), "maybe", "eval_first: expected true or false"),
        (("optimizer", "name"), "decoupled_adamw", "optimizer.amsgrad: true is not supported"),
    ],
)
def test_what_would_train_differently_is_refused(small_dataset, tmp_path, path, value, message):
    changed = _with(tmp_path, path, value)
    if "amsgrad" in message:
        changed.write_text(changed.read_text().replace("optimizer:", "optimizer:\n  amsgrad: true"))
    with pytest.raises(ConfigError, match=message):
        foundry = load_foundry_yaml(changed)
        translate(foundry, data=str(small_dataset / "ds"), devices=4)


def test_llm_foundry_defaults_fill_what_is_absent(small_dataset, tmp_path):
    data = yaml.safe_load(TINY)
    data["optimizer"] = {"name": "decoupled_adamw"}
    data["fsdp_config"] = {"mixed_precision": "pure", "activation_checkpointing": True}
    data["callbacks"] = {
        "kill_loss_spike": {"loss_cap": 10, "window_size": 100},
        "hf_checkpointer": {"save_interval": "500ba", "precision": "bfloat16"},
    }
    data["save_folder"] = "s3://bucket/run"
    data["eval_first"] = "False"  # a string llm-foundry's structured config reads as false
    data["optimizer"]["amsgrad"] = False
    del data["save_interval"], data["save_num_checkpoints_to_keep"]
    data["eval_interval"] = "0.15dur"
    data["max_duration"] = "4801ba"
    data["scheduler"]["t_warmup"] = "1ba"
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(data))
    foundry = load_foundry_yaml(tmp_path / "run.yaml")
    out = translate(foundry, data=str(small_dataset / "ds"), devices=8).config
    # composer's DecoupledAdamW defaults, not ours
    assert out["optim"] == {
        "name": "decoupled_adamw",
        "lr": 1.0e-3,
        "betas": [0.9, 0.95],
        "eps": 1.0e-8,
        "weight_decay": 1.0e-5,
        "clipping_threshold": None,
    }
    assert out["train"]["mixed_precision"] == "PURE" and out["train"]["remat"] == "full"
    # kill_loss_spike's window and cap at their defaults mean "derive them"
    assert out["train"]["loss_spike"] == {"action": "log"}
    assert out["train"]["export_hf"] and out["train"]["export_hf_every"] == 500
    # save_interval 1000ba, every checkpoint kept; composer's ceil for dur; every eval batch
    assert out["checkpoint"] == {"every": 1000, "keep_every": 1000}
    assert out["train"]["eval_every"] == 721 and out["train"]["eval_batches"] is None
    assert out["train"]["log_every"] == 1 and out["train"]["progress"] is False
    assert out["train"]["eval_first"] is False
    # without save_folder llm-foundry saves nothing, and its keep-all default never applies
    del data["save_folder"]
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(data))
    bare = translate(load_foundry_yaml(tmp_path / "run.yaml"), data=str(small_dataset / "ds"))
    assert bare.config["checkpoint"] == {"every": 1000}
    # on one device llm-foundry drops FSDP: autocast only
    one = translate(foundry, data=str(small_dataset / "ds"), devices=1)
    assert one.config["train"]["mixed_precision"] == "FULL" and one.config["mesh"]["fsdp"] == 1
    assert "fsdp_config: dropped on one device, as llm-foundry does (DDP)" in one.notes
    assert any(n.startswith("fsdp_config: kept (mesh.fsdp over every") for n in bare.notes)


def test_absent_shuffle_reads_in_order_and_other_top_level_keys_are_variables(
    small_dataset, tmp_path
):
    data = yaml.safe_load(TINY)
    data["train_loader"] = {"name": "text", "dataset": {"local": "/c4", "split": "train"}}
    data["optimizer"] = {"name": "adamw"}  # torch's AdamW, which llm-foundry registers
    data["global_seed"] = 17  # an older layout's variable that nothing references
    data["tokenizer"] = {"name": "EleutherAI/gpt-neox-20b"}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(data))
    out = translate(load_foundry_yaml(tmp_path / "run.yaml"), data=str(small_dataset / "ds"))
    # StreamingTextDataset's shuffle defaults to false: in order, as llm-foundry reads it
    assert out.config["data"]["shuffle"] is False
    betas, decay = [0.9, 0.999], 1.0e-2  # torch's defaults
    assert out.config["optim"] == {
        "name": "adamw",
        "lr": 1.0e-3,
        "betas": betas,
        "eps": 1.0e-8,
        "weight_decay": decay,
        "clipping_threshold": None,
    }
    assert any(
        n.startswith("global_seed: not a key of llm-foundry's TrainConfig") for n in out.notes
    )
    # the dataset's tokenizer trains, whatever the YAML names: said, not claimed to match
    said = "tokenizer: EleutherAI/gpt-neox-20b dropped: the dataset was prepared with the byte"
    assert any(note.startswith(said) for note in out.notes)


def test_references_resolve_as_omegaconf_does(tmp_path):
    (tmp_path / "a.yaml").write_text(
        "variables:\n  n: 4\n  k: n\n  l: [5, 6]\n"
        "a: ${variables.n}\nb: r-${variables.${variables.k}}\nc: ${variables.l.1}\n"
        "d:\n  e: 7\n  f: ${.e}\ng: \\${not_a_reference}\n"
    )
    data = load_foundry_yaml(tmp_path / "a.yaml")
    assert (data["a"], data["b"], data["c"], data["d"]["f"]) == (4, "r-4", 6, 7)
    assert data["g"] == "${not_a_reference}"
    (tmp_path / "env.yaml").write_text("a: ${oc.env:HOME}\n")
    with pytest.raises(ConfigError, match="llm-foundry clears that resolver"):
        load_foundry_yaml(tmp_path / "env.yaml")
    (tmp_path / "text.yaml").write_text("a: not oc.env here\n")
    assert load_foundry_yaml(tmp_path / "text.yaml")["a"] == "not oc.env here"
    (tmp_path / "vars.yaml").write_text("variables: [1]\nseed: 3\n")
    with pytest.raises(ConfigError, match="variables: expected a mapping"):
        load_foundry_yaml(tmp_path / "vars.yaml")
    (tmp_path / "broken.yaml").write_text("a: [\n")
    with pytest.raises(ConfigError, match="while parsing"):
        load_foundry_yaml(tmp_path / "broken.yaml")


def test_the_tool_exits_2_with_one_line(tmp_path, small_dataset, capsys):
    (tmp_path / "bad.yaml").write_text(FOUNDRY_125M.replace("4800ba", "1ep"))
    argv = [str(tmp_path / "bad.yaml"), "--data", str(small_dataset / "ds")]
    assert from_foundry.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "max_duration: 1ep is in epochs" in err
    (tmp_path / "good.yaml").write_text(FOUNDRY_125M)
    argv = [str(tmp_path / "good.yaml"), "--data", str(small_dataset / "ds"), "--devices", "0"]
    assert from_foundry.main(argv) == 2
    assert "--devices: must be >= 1, got 0" in capsys.readouterr().err
    # -o never replaces an input, and -o, --tokenizer and a dataset the model cannot read are
    # each named
    good = [str(tmp_path / "good.yaml"), "--data", str(small_dataset / "ds")]
    meta_before = (small_dataset / "ds" / "meta.json").read_bytes()
    for extra, message in [
        (["-o", str(tmp_path / "good.yaml")], "-o: " + str(tmp_path / "good.yaml") + " is the"),
        (["-o", str(small_dataset / "ds" / "meta.json")], "is inside the dataset"),
        (["-o", str(tmp_path)], "is a folder; name the YAML file to write"),
        (["-o", str(tmp_path / "good.yaml" / "x.yaml")], "good.yaml is a file, not a folder"),
        (["--tokenizer", str(tmp_path / "nope.json")], "--tokenizer: " + str(tmp_path)),
    ]:
        assert from_foundry.main([*good, *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert (tmp_path / "good.yaml").read_text() == FOUNDRY_125M
    assert (small_dataset / "ds" / "meta.json").read_bytes() == meta_before
    (tmp_path / "short.yaml").write_text(
        FOUNDRY_125M.replace("max_seq_len: 2048", "max_seq_len: 64")
    )
    assert from_foundry.main([str(tmp_path / "short.yaml"), *good[1:]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "seq_len 32 differs from the training seq_len 64" in err, err


STREAMS = {
    "split": "train",
    "token_encoding_type": "int32",
    "shuffle_seed": 17,
    "num_canonical_nodes": 2,
    "streams": {
        "c4": {"local": "/data/c4", "split": "", "proportion": 0.75, "download_retry": 3},
        "code": {"remote": "s3://bucket/code", "split": "train_small", "proportion": 0.25},
    },
}


def _prepared(root, name, n_docs, **kw):
    """A small prepared dataset of n_docs documents; returns its folder."""
    from mpt_jax.data import prepare_dataset

    with open(root / f"{name}.jsonl", "w") as f:
        for i in range(n_docs):
            f.write(f'{{"text": "document {i} of {name}, in words and words"}}\n')
    out = root / name
    kw = {"seq_len": 32, "val_fraction": 0.2, "progress": False, **kw}
    prepare_dataset([str(root / f"{name}.jsonl")], out, **kw)
    return out


def _streams_yaml(tmp_path, dataset, **top):
    data = {**yaml.safe_load(TINY), **top}
    data["train_loader"] = {"name": "text", "drop_last": True, "dataset": dataset}
    (tmp_path / "streams.yaml").write_text(yaml.safe_dump(data))
    return tmp_path / "streams.yaml"


def _refused(capsys, yaml_path, data_args, message):
    capsys.readouterr()
    args = [str(yaml_path)] + [x for v in data_args for x in ("--data", str(v))]
    assert from_foundry.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_streams_become_a_weighted_mixture(tmp_path, capsys):
    a, b = _prepared(tmp_path, "a", 60), _prepared(tmp_path, "b", 200)
    out = tmp_path / "run.yaml"
    path = _streams_yaml(tmp_path, json.loads(json.dumps(STREAMS)))
    argv = [str(path), "--data", f"c4={a}", "--data", f"code={b}", "-o", str(out), "--overwrite"]
    assert from_foundry.main(argv) == 0
    cfg = load_run_config(out)
    assert [(s.path, s.weight) for s in cfg.data.mixture] == [(str(a), 0.75), (str(b), 0.25)]
    header = out.read_text()
    # each stream's own folder, and the dataset's split where its own is empty (as streaming)
    assert "prepare it with python tools/prepare_data.py /data/c4/train --tokenizer" in header
    assert "python tools/prepare_data.py s3://bucket/code/train_small --tokenizer" in header
    assert "(and --token-encoding-type int32 for a bytes tokens column)" in header
    assert "# train_loader.dataset.num_canonical_nodes: dropped" in header
    assert "# train_loader.dataset.streams.c4.download_retry: dropped" in header
    assert "# train_loader.drop_last: dropped" in header
    # without proportions a stream weighs its samples (streaming's, one per document) x repeat,
    # or what it chooses; a weight of 0 leaves it out
    for amount, weights in (
        ({"code": {"repeat": 2}}, [60, 400]),
        ({"c4": {"choose": 500}}, [500, 200]),
        ({"c4": {"choose": 0}}, [200]),
    ):
        dataset = json.loads(json.dumps(STREAMS))
        for name, stream in dataset["streams"].items():
            del stream["proportion"]
            stream.update(amount.get(name, {}))
        _streams_yaml(tmp_path, dataset)
        assert from_foundry.main(argv) == 0
        assert [s.weight for s in load_run_config(out).data.mixture] == weights
    # --data refusals, one line each, exit 2
    _refused(capsys, path, [f"c4={a}"], "streams c4, code need one NAME=DIR each (missing code)")
    _refused(capsys, path, [f"c4={a}", f"code={b}", f"web={a}"], "(no stream is named web)")
    _refused(capsys, path, [f"c4={a}", f"c4={b}"], "stream c4 is given twice")
    _refused(capsys, path, [a, b], "with several --data, each is NAME=DIR")
    _refused(capsys, path, [f"c4={a}", f"code={tmp_path}/none"], f"code={tmp_path}/none: ")
    # streams prepared with other tokenizers, or not the one named
    bpe = _prepared(tmp_path, "bpe", 200, train_bpe_vocab=300)
    _refused(capsys, path, [f"c4={a}", f"code={bpe}"], "was prepared with another tokenizer")
    capsys.readouterr()
    args = [str(path), "--data", f"c4={bpe}", "--data", f"code={bpe}", "--tokenizer", "byte"]
    assert from_foundry.main(args) == 2
    assert "was prepared with" in capsys.readouterr().err
    # a built-in corpus is prepared with data.tokenizer at training time: not compared
    _streams_yaml(tmp_path, json.loads(json.dumps(STREAMS)))
    argv_builtin = [str(path), "--data", f"c4={bpe}", "--data", "code=builtin:python-stdlib"]
    assert from_foundry.main([*argv_builtin, "-o", str(out), "--overwrite"]) == 0
    assert load_run_config(out).data.tokenizer == str(bpe / "tokenizer.json")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"local": "/data"}, "streams beside the dataset's own local or remote"),
        ({"streams": {"c4": {"split": "x"}, "code": {"local": "/c"}}}, "c4: no local or remote"),
        (
            {"streams": {"c4": {"local": "/c4", "proportion": 1}, "code": {"local": "/c"}}},
            "streams.code: every stream needs a proportion when one has one (c4)",
        ),
        (
            {"streams": {"c4": {"local": "/c4", "proportion": 1, "repeat": 2}, "code": {}}},
            "streams.c4: give one of proportion, repeat and choose",
        ),
        (
            {"epoch_size": 1000, "streams": {"c4": {"local": "/c4", "repeat": 2}, "code": {}}},
            "epoch_size: only with proportions or no weights",
        ),
        ({"replication": 2}, "replication: 2 ranks share each sample"),
        ({"batch_size": 8}, "dataset.batch_size: llm-foundry passes StreamingDataset"),
        ({"batching_method": "stratified"}, "'stratified' composes each batch by stream"),
        ({"bos_token_id": 0}, "bos_token_id: with attn_uses_sequence_id llm-foundry starts"),
        ({"eos_token_id": 0}, "eos_token_id: 0 differs from the EOS of"),
        ({"streams": {"c4": {"local": "/c4"}, "code": {"local": "/c", "bogus": 1}}}, "code.bogus"),
    ],
)
def test_what_streams_cannot_express_is_refused(tmp_path, change, message):
    a = _prepared(tmp_path, "a", 60)
    dataset = json.loads(json.dumps(STREAMS))
    for stream in dataset["streams"].values():
        stream.pop("proportion")
    for key, value in change.items():
        if key == "streams":
            for name, stream in value.items():
                dataset["streams"][name] = stream or {"local": "/code"}
        else:
            dataset[key] = value
    path = _streams_yaml(tmp_path, dataset)
    foundry = load_foundry_yaml(path)
    foundry["model"]["attn_config"]["attn_uses_sequence_id"] = True
    with pytest.raises(ConfigError, match=re.escape(message)):
        translate(foundry, data={"c4": str(a), "code": str(a)})


def test_integer_stream_names_and_a_builtin_stream_without_a_count(tmp_path):
    a = _prepared(tmp_path, "a", 60)
    dataset = {
        "streams": {0: {"local": "/c4", "proportion": 1}, 1: {"local": "/c", "proportion": 3}}
    }
    config = translate(
        load_foundry_yaml(_streams_yaml(tmp_path, dataset)), data={"0": str(a), "1": str(a)}
    )
    assert [s["weight"] for s in config.config["data"]["mixture"]] == [1.0, 3.0]
    dataset = {"streams": {"c4": {"local": "/c4"}, "code": {"local": "/code"}}}
    foundry = load_foundry_yaml(_streams_yaml(tmp_path, dataset))
    with pytest.raises(ConfigError, match="code=builtin:python-stdlib: a built-in corpus has no"):
        translate(foundry, data={"c4": str(a), "code": "builtin:python-stdlib"})
