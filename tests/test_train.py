"""Training: sharded == single device, accumulation == one batch, overfit, runs and bad input."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx
from helpers import TINY_MODEL, config, lower_for_cuda, write_config
from xla_flags import xla_flags

import mpt_jax
from mpt_jax import attention as attention_module
from mpt_jax.config import ConfigError, MeshConfig, count_params
from mpt_jax.data import DataError
from mpt_jax.kernels.flash_attention import default_tilings
from mpt_jax.sharding import batch_sharding, make_mesh
from mpt_jax.train import (
    NonFiniteLossError,
    abstract_state,
    init_state,
    jit_train_step,
    make_train_step,
    run,
)

REPO = Path(__file__).resolve().parent.parent


def batches(n, batch=8, seq=32, vocab=258, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, (batch, seq), dtype=np.int32) for _ in range(n)]


def train_losses(cfg, mesh, data):
    graphdef, state, shardings = init_state(cfg, mesh)
    step = jit_train_step(graphdef, cfg, mesh, shardings)
    losses = []
    for ids in data:
        batch = {"input_ids": jax.device_put(ids, batch_sharding(mesh))}
        state, out = step(state, batch)
        losses.append(float(out["loss"]))
    return losses, state


def assert_same_params(state, reference, atol):
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(reference.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol)


def test_eight_device_mesh_matches_one_device(tmp_path):
    cfg = config(tmp_path, mesh={"data": 2, "fsdp": 2, "tensor": 2})
    data = batches(5)
    one = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    eight = make_mesh(cfg.mesh)
    assert eight.devices.size == 8
    losses_1, _ = train_losses(cfg, one, data)
    losses_8, state_8 = train_losses(cfg, eight, data)
    np.testing.assert_allclose(losses_8, losses_1, rtol=0, atol=1e-5)
    wqkv = state_8.params["blocks"][0]["attn"]["Wqkv"]["kernel"][...]
    assert "fsdp" in str(wqkv.sharding.spec) and "tensor" in str(wqkv.sharding.spec)


def test_the_share_of_the_parameters_each_device_holds(tmp_path):
    from mpt_jax.sharding import device_share

    def share(mesh, **model):
        cfg = config(tmp_path, model={**TINY_MODEL, **model})  # d_model 64, 4 heads, vocab 258
        return device_share(abstract_state(cfg, mesh)[1].params)

    assert share(make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])) == 1.0
    assert share(make_mesh(MeshConfig(data=1, fsdp=8, tensor=1))) < 0.13  # 8 divides 64
    # fsdp 6 divides neither d_model nor the vocabulary: (almost) everything whole on each device
    assert share(make_mesh(MeshConfig(data=1, fsdp=6, tensor=1), jax.devices()[:6])) > 0.95
    # d_model 42 over fsdp 4 stays whole while tensor 2 splits heads, FFN and vocabulary: half
    # of the model on each device, where 1/8 was meant (no parameter is whole everywhere)
    fsdp_4_tensor_2 = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    assert 0.45 < share(fsdp_4_tensor_2, d_model=42, n_heads=2) < 0.55


def test_accumulation_over_four_microbatches_equals_one_batch(tmp_path):
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=1), jax.devices()[:2])
    data = batches(3)
    full, state_full = train_losses(config(tmp_path), mesh, data)
    micro, state_micro = train_losses(config(tmp_path, train={"microbatch": 2}), mesh, data)
    np.testing.assert_allclose(micro, full, rtol=0, atol=1e-6)
    assert_same_params(state_micro, state_full, atol=2e-6)


def test_auto_microbatch_is_the_largest_that_fits_the_memory_budget(tmp_path):
    from mpt_jax.train import choose_microbatch

    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=1), jax.devices()[:2])
    cfg = config(tmp_path, train={"microbatch": "auto", "global_batch": 8})
    graphdef, abstract, shardings = abstract_state(cfg, mesh)
    choose = lambda budget: choose_microbatch(graphdef, cfg, mesh, shardings, abstract, budget)
    chosen, _, roomy = choose(10**12)
    assert chosen.train.microbatch == roomy.microbatch == 8 and list(roomy.needed_bytes) == [8]
    # a byte short of the whole batch's step: the next size down (a multiple of fsdp 2)
    need_8 = roomy.needed_bytes[8]
    chosen, step, tight = choose(need_8 - 1)
    assert list(tight.needed_bytes) == [8, 4] and tight.needed_bytes[4] < need_8
    assert chosen.train.microbatch == 4 and cfg.train.microbatch == "auto"
    # the returned step accumulates over two microbatches of 4: as an explicit microbatch of 4
    _, state, _ = init_state(cfg, mesh)
    data = {"input_ids": jax.device_put(batches(1)[0], batch_sharding(mesh))}
    explicit, _ = train_losses(config(tmp_path, train={"microbatch": 4}), mesh, [data["input_ids"]])
    _, out = step(state, data)
    assert float(out["loss"]) == explicit[0]
    smallest = min(choose(need_8 - 1)[2].needed_bytes.values())
    with pytest.raises(ConfigError, match=r"train\.microbatch: auto: even a microbatch of 2 needs"):
        choose(smallest // 2)


def test_a_run_with_auto_microbatch_says_what_it_chose(
    small_dataset, tmp_path, monkeypatch, capsys
):
    import mpt_jax.train as train_module

    # fsdp 8: microbatches of 32 or 16 (4 or 2 rows a device; with 1 row a device the loop over
    # microbatches can cost more memory than it saves, as XLA's CPU code estimates it)
    whole_batch = {"global_batch": 32, "steps": 3}
    auto_cfg = {**whole_batch, "microbatch": "auto"}
    cfg = config(small_dataset, train=auto_cfg, run_dir=str(tmp_path / "a"))
    mesh = make_mesh(cfg.mesh)
    graphdef, abstract, shardings = abstract_state(cfg, mesh)
    whole = train_module.choose_microbatch(graphdef, cfg, mesh, shardings, abstract, 10**12)[2]
    short = int((whole.needed_bytes[32] - 1) / train_module.AUTO_MICROBATCH_SHARE)
    monkeypatch.setattr(train_module, "device_memory_bytes", lambda devices: short)
    auto = run(cfg)
    err = capsys.readouterr().err
    assert "train.microbatch: auto: 16 of 32 sequences per forward and backward" in err
    half = {**whole_batch, "microbatch": 16}
    explicit = config(small_dataset, train=half, run_dir=str(tmp_path / "16"))
    assert auto["loss"] == run(explicit)["loss"]
    saved = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert saved["train"]["microbatch"] == "auto"  # a resumed run chooses again


def test_evaluation_runs_in_training_microbatches_and_loss_chunks(tmp_path):
    from mpt_jax.memory import compiled_bytes
    from mpt_jax.sharding import traced_on
    from mpt_jax.train import make_eval_step

    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=1), jax.devices()[:2])
    model = {**TINY_MODEL, "vocab_size": 8192}  # the logits dominate the memory
    graphdef, state, shardings = init_state(config(tmp_path, model=model), mesh)
    rows = batches(1, batch=12)[0]  # 6 rows per device: microbatch 4 gives 3 parts of 4
    batch = {"input_ids": jax.device_put(rows, batch_sharding(mesh))}
    abstract_batch = {
        "input_ids": jax.ShapeDtypeStruct(rows.shape, rows.dtype, sharding=batch_sharding(mesh))
    }

    def eval_with(**train):
        step = make_eval_step(graphdef, config(tmp_path, model=model, train=train), 2)
        fn = jax.jit(traced_on(mesh, step), in_shardings=(shardings.params, batch_sharding(mesh)))
        needs = compiled_bytes(fn.lower(state.params, abstract_batch).compile())
        return [float(x) for x in fn(state.params, batch)], needs

    (whole, count), whole_needs = eval_with()
    assert count == 12 * 31
    for train in ({"microbatch": 4}, {"loss_chunk": 8}, {"microbatch": 4, "loss_chunk": 8}):
        (total, counted), needs = eval_with(**train)
        assert counted == count
        np.testing.assert_allclose(total, whole, rtol=1e-5)
        assert needs < whole_needs, train  # the (12, 32, vocab) fp32 logits are never whole


@pytest.mark.parametrize("shards", [1, 2, 8])
def test_evaluation_parts_are_the_fewest_that_fit_the_microbatch(shards):
    from mpt_jax.train import _eval_parts

    for rows in range(shards, 20 * shards + 1, shards):
        for micro in range(shards, 8 * shards + 1, shards):
            n = _eval_parts(rows, micro, shards)
            assert rows % n == 0 and (rows // n) % shards == 0 and rows // n <= max(micro, 1)
            fewer = [m for m in range(1, n) if rows % m == 0 and (rows // m) % shards == 0]
            assert all(rows // m > micro for m in fewer)
    assert _eval_parts(24, None, 8) == 1


def test_eval_batches_null_evaluates_the_whole_val_split(small_dataset):
    from mpt_jax.train import _datasets, eval_batch_size, evaluate

    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=1), jax.devices()[:2])
    batches_seen = []

    def eval_fn(params, batch):  # each row: a loss of 1 over 1 token
        batches_seen.append(batch["input_ids"].shape[0])
        return jnp.float32(batches_seen[-1]), jnp.float32(batches_seen[-1])

    for eval_batches in (1, None):
        batches_seen.clear()
        cfg = config(small_dataset, train={"eval_batches": eval_batches})
        datasets = _datasets(cfg, progress=False)
        assert evaluate(eval_fn, None, datasets, cfg, batch_sharding(mesh)) == 1.0
        rows = datasets[0][0].splits["val"]["rows"]
        size = eval_batch_size(datasets[0][0], 8, data_shards=2, processes=1)
        assert batches_seen == [size] * (1 if eval_batches == 1 else rows // size)
    assert rows // size > 1  # the whole split is more than one batch


def test_accumulation_is_token_weighted(tmp_path):
    """Microbatches with different numbers of counted tokens still give the global token mean."""
    from mpt_jax.loss import IGNORE_INDEX  # noqa: F401  (documents the convention)

    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    cfg = config(tmp_path, train={"microbatch": 4})
    graphdef, state, _ = init_state(cfg, mesh)
    ids = batches(1)[0]
    _, out = jax.jit(make_train_step(graphdef, cfg))(state, {"input_ids": jnp.asarray(ids)})
    # 8 sequences of 32 tokens: 31 counted targets each
    assert float(out["tokens"]) == 8 * 31


def test_mixed_precision_pure_computes_with_bf16_parameters_and_keeps_fp32_masters(tmp_path):
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    data = batches(3)
    bf16_run = {"precision": "amp_bf16", "mixed_precision": "PURE"}
    pure, state = train_losses(config(tmp_path, train=bf16_run), mesh, data)
    # the forward of bf16-stored parameters (pure_bf16, the same seed) is the same program: the
    # first loss agrees bit for bit; after it pure_bf16 updates bf16 weights with bf16 moments
    stored_bf16, _ = train_losses(config(tmp_path, train={"precision": "pure_bf16"}), mesh, data)
    assert pure[0] == stored_bf16[0]
    # FULL keeps the embeddings, norms and residual stream in float32: near, but not the same
    full, _ = train_losses(config(tmp_path, train={"precision": "amp_bf16"}), mesh, data)
    assert pure[0] != full[0] and abs(pure[0] - full[0]) < 1e-2 * full[0]
    # the parameters and Adam's moments stay float32 (the master weights)
    leaves = jax.tree.leaves((state.params, state.opt_state))
    assert {x.dtype for x in leaves if x.ndim} == {jnp.dtype(jnp.float32)}


def test_a_pure_run_loads_for_bf16_evaluation_as_it_trained(small_dataset, tmp_path):
    from flax import nnx

    import mpt_jax

    def param_dtypes(run_dir, dtype):
        model = mpt_jax.from_pretrained(run_dir, dtype=dtype)
        return {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))}

    for precision, mode in (("amp_bf16", "PURE"), ("amp_bf16", "FULL"), ("fp32", "PURE")):
        run_dir = tmp_path / f"{precision}-{mode}"
        train = {"steps": 2, "precision": precision, "mixed_precision": mode}
        run(config(small_dataset, run_dir=str(run_dir), train=train))
        # amp_bf16 PURE's step saw bf16 parameters; FULL's saw fp32 ones outside the matmuls,
        # and fp32's fp32 ones whatever the mode
        expected = jnp.bfloat16 if (precision, mode) == ("amp_bf16", "PURE") else jnp.float32
        for bf16 in (jnp.bfloat16, "bfloat16"):  # a dtype or its name, as jnp.dtype takes
            assert param_dtypes(run_dir, bf16) == {jnp.dtype(expected)}
        assert param_dtypes(run_dir, jnp.float32) == {jnp.dtype(jnp.float32)}


def test_overfits_one_batch(tmp_path):
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    cfg = config(
        tmp_path,
        optim={"lr": 3e-3},
        schedule={"name": "constant_with_warmup", "t_warmup": "5ba"},
        train={"steps": 150},
    )
    data = batches(1, batch=8, vocab=64) * 150
    losses, _ = train_losses(cfg, mesh, data)
    assert losses[0] > 3.5 and losses[-1] < 0.1, (losses[0], losses[-1])


def test_the_step_finished_before_an_evaluation_keeps_its_time(small_dataset, tmp_path):
    # the loop reads a step's metrics one step later; an evaluation waits for the step before it
    # first, and that step's execution must still be charged (it was not: the step after each
    # evaluation logged a dispatch's time, some 30x too short, and the rates rose by a tenth)
    model = {**TINY_MODEL, "d_model": 128, "n_layers": 4}  # steps long beside their dispatch
    train = {"steps": 9, "eval_every": 3, "eval_batches": 1, "log_every": 1}
    sections = dict(model=model, train=train, checkpoint={"enabled": False})
    run(config(small_dataset, run_dir=str(tmp_path / "run"), **sections))
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    times = {x["step"]: x["step_time"] for x in lines if "step_time" in x}
    after_evaluations, others = [times[4], times[7]], [times[s] for s in (2, 3, 5, 6, 8, 9)]
    assert min(after_evaluations) > 0.3 * float(np.median(others)), (after_evaluations, others)


def test_eval_first_evaluates_the_initial_model_once(small_dataset, tmp_path):
    def val_steps():
        lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        return [(x["step"], x["val_loss"]) for x in map(json.loads, lines) if "val_loss" in x]

    from mpt_jax.sharding import traced_on
    from mpt_jax.train import _datasets, evaluate, make_eval_step

    train = {"steps": 4, "eval_first": True, "eval_batches": 2}
    cfg = config(small_dataset, run_dir=str(tmp_path / "run"), train=train)
    run(cfg)
    (first, initial), (last, trained) = val_steps()
    assert (first, last) == (0, 4) and trained < initial
    # step 0's val_loss is the freshly initialized model's, evaluated here on its own
    mesh = make_mesh(cfg.mesh)
    graphdef, state, shardings = init_state(cfg, mesh)
    eval_fn = jax.jit(
        traced_on(mesh, make_eval_step(graphdef, cfg, 8)),
        in_shardings=(shardings.params, batch_sharding(mesh)),
    )
    datasets = _datasets(cfg, progress=False)
    fresh = evaluate(eval_fn, state.params, datasets, cfg, batch_sharding(mesh))
    np.testing.assert_allclose(initial, fresh, rtol=1e-6)
    # a resumed run does not evaluate the initial model again
    run(config(small_dataset, run_dir=str(tmp_path / "run"), train={**train, "steps": 6}))
    assert [step for step, _ in val_steps()] == [0, 4, 6]


def test_hf_exports_every_n_steps_also_across_a_stop(small_dataset, tmp_path, monkeypatch):
    from test_loss_spikes import hf_params

    sections = dict(train={"steps": 4, "export_hf_every": 2}, checkpoint={"every": 2})
    monkeypatch.setenv("MPT_JAX_FAULTS", "sigterm@1")  # stops after step 2, before its export
    stopped = run(config(small_dataset, run_dir=str(tmp_path / "run"), **sections))
    assert stopped["step"] == 2 and not (tmp_path / "run" / "hf-steps").exists()
    # what a killed attempt leaves past its last checkpoint: an export of a step the resumed run
    # trains again, perhaps otherwise (train.steps and the schedule may change on resume)
    stale = tmp_path / "run" / "hf-steps" / "ba4"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    monkeypatch.delenv("MPT_JAX_FAULTS")
    run(config(small_dataset, run_dir=str(tmp_path / "run"), **sections))  # exports 2 first
    for step in (2, 4):
        folder = tmp_path / "run" / "hf-steps" / f"ba{step}"
        saved = mpt_jax.from_pretrained(tmp_path / "run", step=step)
        want = [np.asarray(x) for x in jax.tree.leaves(nnx.state(saved, nnx.Param))]
        assert all(np.array_equal(a, b) for a, b in zip(hf_params(folder), want, strict=True))
        mask = os.umask(0)
        os.umask(mask)
        assert folder.stat().st_mode & 0o777 == 0o777 & ~mask  # not mkdtemp's 0700


def test_hf_exports_a_kill_cut_short_are_finished_or_removed(tmp_path):
    from mpt_jax.train import _finish_hf_exports

    # killed between write_folder's renames (ba2 moved aside, the whole new one not yet in
    # place); killed while writing ba4 (no config.json); ba6 whole and in place
    # and killed while writing ba8's config.json (empty)
    leftovers = (".ba2.tmp-x1", True), (".ba2.old-x1", True), (".ba4.tmp-x2", False)
    for name, whole in (*leftovers, (".ba8.tmp-x3", None)):
        (tmp_path / name).mkdir()
        if whole is not False:
            (tmp_path / name / "config.json").write_text("{}" if whole else "")
    (tmp_path / "ba6").mkdir()
    (tmp_path / ".hf.tmp-x4").mkdir()  # train.export_hf's, killed between its renames
    (tmp_path / ".hf.tmp-x4" / "config.json").write_text("{}")
    _finish_hf_exports(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hf.tmp-x4", "ba2", "ba6"]
    assert (tmp_path / "ba2" / "config.json").is_file()
    _finish_hf_exports(tmp_path, names="hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ba2", "ba6", "hf"]


def test_end_to_end_run_writes_run_folder(small_dataset, tmp_path):
    cfg = config(
        small_dataset,
        run_dir=str(tmp_path / "run"),
        train={
            "steps": 6,
            "log_every": 2,
            "eval_every": 3,
            "eval_batches": 2,
            "export_hf": True,
            "profile": [2, 4],
        },
    )
    final = run(cfg)
    run_dir = tmp_path / "run"
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if "loss" in x]
    keys = {
        "step",
        "tokens",
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "tflops_per_device",
        "mfu",
        "step_time",
        "data_wait",
        "remaining_s",
    }
    assert keys <= set(train_lines[-1]) and train_lines[-1]["step"] == 6
    assert train_lines[-1]["remaining_s"] == 0 < train_lines[-2]["remaining_s"]
    # the first step compiles: no rate (nor a time left at its pace), the next ones have one
    assert train_lines[0]["step"] == 1 and train_lines[0]["tokens_per_s"] is None
    assert train_lines[0]["remaining_s"] is None and train_lines[0]["step_time"] > 0
    assert train_lines[1]["tokens_per_s"] > 0
    assert train_lines[-1]["tokens"] == 6 * 8 * 32 and type(train_lines[-1]["tokens"]) is int
    assert type(train_lines[-1]["skipped_steps"]) is int  # counts are written as integers
    assert [x["step"] for x in lines if "val_loss" in x] == [3, 6]
    assert final["val_loss"] < 5.6  # below ln(258): it learned something
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["d_model"] == 64 and saved["train"]["steps"] == 6
    assert any((run_dir / "tensorboard").iterdir())
    assert any((run_dir / "profile").rglob("*.xplane.pb"))
    transformers = pytest.importorskip("transformers")
    model = transformers.MptForCausalLM.from_pretrained(final["hf_dir"])
    assert model.config.n_layers == 2
    assert model.config.eos_token_id == 256  # the byte tokenizer's, which the data ends with

    # the same folder with another config is refused, unless overwritten
    other = config(small_dataset, run_dir=str(run_dir), optim={"lr": 5e-4}, train={"steps": 2})
    with pytest.raises(ConfigError, match=r"holds a run with a different config \(optim\.lr"):
        run(other)
    run(other, overwrite=True)
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) >= 2


def test_a_run_saved_before_a_field_existed_resumes_and_a_changed_field_is_refused(
    small_dataset, tmp_path
):
    run_dir = tmp_path / "run"
    run(config(small_dataset, run_dir=str(run_dir), train={"steps": 2}))

    def as_written_before_the_field():
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        del saved["train"]["mixed_precision"]
        (run_dir / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))

    as_written_before_the_field()
    final = run(config(small_dataset, run_dir=str(run_dir), train={"steps": 3}))
    assert final["step"] == 3
    # choosing another mixed precision changes the math: refused like any other such change,
    # also against a saved config that has the field at its default by leaving it out
    as_written_before_the_field()
    pure = config(
        small_dataset, run_dir=str(run_dir), train={"steps": 4, "mixed_precision": "PURE"}
    )
    with pytest.raises(ConfigError, match=r"different config \(train\.mixed_precision\)"):
        run(pure)


def test_the_run_folder_changes_only_once_the_run_is_known_to_start(small_dataset, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    cfg = dict(run_dir=str(run_dir), train={"steps": 2})
    run(config(small_dataset, **cfg))

    def snapshot(folder):
        return {
            str(f.relative_to(folder)): f.read_bytes() for f in folder.rglob("*") if f.is_file()
        }

    before = snapshot(run_dir)
    assert "complete.json" in before and any(k.startswith("checkpoints/2/") for k in before)
    # a relaunch that fails to start touches nothing: a resumable change, a run past its last
    # checkpoint
    with pytest.raises(ConfigError, match=r"mesh: data\*fsdp\*tensor"):
        run(config(small_dataset, **cfg, mesh={"data": 3, "fsdp": 1, "tensor": 1}))
    with pytest.raises(ConfigError, match=r"train\.steps: the run ends at step 1, before its"):
        run(config(small_dataset, run_dir=str(run_dir), train={"steps": 1}))
    assert snapshot(run_dir) == before
    # but complete.json goes at once for one that asks for more steps, or replaces the run
    # (--overwrite), also when it then fails: launch scripts would take it for finished
    with pytest.raises(ConfigError, match=r"mesh: data\*fsdp\*tensor"):
        more = dict(train={"steps": 4}, mesh={"data": 3, "fsdp": 1, "tensor": 1})
        run(config(small_dataset, run_dir=str(run_dir), **more))
    unfinished = {k: v for k, v in before.items() if k != "complete.json"}
    assert snapshot(run_dir) == unfinished
    (run_dir / "complete.json").write_bytes(before["complete.json"])
    with pytest.raises(DataError, match=r"meta\.json: missing"):
        run(config(small_dataset, **cfg, data={"path": str(tmp_path / "none")}), overwrite=True)
    assert snapshot(run_dir) == unfinished
    # with --overwrite, a fresh start's init_from is checked first, and never read from the
    # folder about to be deleted; a symbolic link is not replaced
    typo = dict(run_dir=str(run_dir), train={"steps": 2}, init_from=str(tmp_path / "typo"))
    with pytest.raises(ConfigError, match=r"init_from: .*typo does not exist"):
        run(config(small_dataset, **typo), overwrite=True)
    inside = dict(run_dir=str(run_dir), train={"steps": 2}, init_from=str(run_dir / "checkpoints"))
    with pytest.raises(ConfigError, match=r"init_from: .* is inside run_dir, which --overwrite"):
        run(config(small_dataset, **inside), overwrite=True)
    # nor is any other input: a dataset or a tokenizer kept in the run folder
    shutil.copytree(small_dataset / "ds", run_dir / "data")
    data_inside = dict(run_dir=str(run_dir), train={"steps": 2})
    with pytest.raises(ConfigError, match=r"data\.path: .* is inside run_dir, which --overwrite"):
        run(
            config(small_dataset, **data_inside, data={"path": str(run_dir / "data")}),
            overwrite=True,
        )
    evals = {"path": str(small_dataset / "ds"), "eval": [{"label": "x", "path": str(run_dir)}]}
    with pytest.raises(ConfigError, match=r"data\.eval\[0\]\.path: .* is inside run_dir"):
        run(config(small_dataset, **data_inside, data=evals), overwrite=True)
    shutil.rmtree(run_dir / "data")
    # and an init_from of another model is refused before the folder goes, not after
    other = shutil.copytree(run_dir, tmp_path / "other_model")
    narrower = dict(run_dir=str(run_dir), train={"steps": 2}, init_from=str(other))
    with pytest.raises(ConfigError, match=r"init_from: .* holds a different model \(d_model"):
        run(config(small_dataset, **narrower, model={**TINY_MODEL, "d_model": 32}), overwrite=True)
    mpt_jax.from_pretrained(run_dir).save_pretrained(tmp_path / "hf_other")
    narrower["init_from"] = str(tmp_path / "hf_other")
    # from an HF folder too: by its config, also where the tensors' shapes agree (heads, ALiBi)
    for change, field in (({"d_model": 32}, "d_model"), ({"n_heads": 2}, "n_heads")):
        with pytest.raises(ConfigError, match=rf"hf_other holds a different model \({field}\)"):
            run(config(small_dataset, **narrower, model={**TINY_MODEL, **change}), overwrite=True)
    with pytest.raises(ConfigError, match=r"hf_other holds a different model \(alibi, clip_qkv\)"):
        no_alibi = {**TINY_MODEL, "alibi": False, "clip_qkv": 0.5}  # no positions at all
        run(config(small_dataset, **narrower, model=no_alibi), overwrite=True)
    link = tmp_path / "link"
    link.symlink_to(run_dir)
    with pytest.raises(ConfigError, match=r"link is a symbolic link; --overwrite replaces a real"):
        run(config(small_dataset, run_dir=str(link), train={"steps": 2}), overwrite=True)
    assert snapshot(run_dir) == unfinished

    # a moved run resumes where it was (run_dir is where it is, not part of the run)
    moved = tmp_path / "moved"
    shutil.copytree(run_dir, moved)
    final = run(config(small_dataset, run_dir=f"{moved}/", train={"steps": 3}))
    assert final["step"] == 3
    steps = [json.loads(x)["step"] for x in (moved / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 3 and sorted(set(steps)) == [1, 2, 3]

    # --overwrite replaces run folders only (a config.yaml alone does not make one)
    other = tmp_path / "thesis"
    other.mkdir()
    (other / "thesis.tex").write_text("chapter 1")
    # a hand-written config of that name (not every section the trainer writes), and the
    # supervisor's restarts.jsonl, which it writes before any trainer looked at the folder
    (other / "config.yaml").write_text("model: mpt-125m\ntrain: {steps: 1}\nrun_dir: thesis\n")
    (other / "restarts.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match=r"is not empty and holds no run \(no run config.yaml"):
        run(config(small_dataset, run_dir=str(other), train={"steps": 1}), overwrite=True)
    assert (other / "thesis.tex").read_text() == "chapter 1"
    # a new folder that holds only the supervisor's log (an attempt died before setting it up)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "restarts.jsonl").write_text("{}\n")
    run(config(small_dataset, run_dir=str(fresh), train={"steps": 1}), overwrite=True)
    assert (fresh / "complete.json").is_file()
    with pytest.raises(ConfigError, match=r"run_dir: .*thesis.tex is a file, not a folder"):
        run(config(small_dataset, run_dir=str(other / "thesis.tex"), train={"steps": 1}))

    # an unreadable config.yaml is named, not a YAML traceback
    (moved / "config.yaml").write_bytes(b"model: [\xe9")
    with pytest.raises(ConfigError, match=r"config.yaml: unreadable"):
        run(config(small_dataset, run_dir=str(moved), train={"steps": 3}))

    # a finished run without checkpoints is not trained again over its metrics and export
    no_ckpt = dict(run_dir=str(tmp_path / "nock"), checkpoint={"enabled": False})
    run(config(small_dataset, **no_ckpt, train={"steps": 1}))
    with pytest.raises(ConfigError, match=r"holds a finished run without checkpoints"):
        run(config(small_dataset, **no_ckpt, train={"steps": 1}))
    run(config(small_dataset, **no_ckpt, train={"steps": 1}), overwrite=True)


def test_stale_completion_and_the_working_directory(tmp_path, monkeypatch):
    from mpt_jax.config import to_dict
    from mpt_jax.train import check_run_dir, retire_stale_completion

    done = tmp_path / "complete.json"
    for text, total, overwrite, kept in [
        ('{"step": 4}', 4, False, True),  # the same end: still finished
        ('{"step": 4}', 3, False, True),  # refused later as past the end, not here
        ('{"step": 4}', 5, False, False),  # more steps: no longer finished
        ('{"step": 4}', 4, True, False),  # replaced by a new run
        ('{"loss": 1.0}', 4, False, False),  # no step: no proof of a finished run
        ("{cut", 4, False, False),
    ]:
        done.write_text(text)
        retire_stale_completion(tmp_path, total, overwrite=overwrite)
        assert done.exists() == kept, (text, total, overwrite)
    # --overwrite never deletes the folder it is run from
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    monkeypatch.chdir(run_dir / "checkpoints")
    cfg = config(tmp_path, run_dir=str(run_dir))
    with pytest.raises(ConfigError, match=r"/run holds the working directory; not replaced"):
        check_run_dir(cfg, to_dict(cfg), overwrite=True)


def test_a_keep_every_change_that_would_delete_kept_steps_is_refused(tmp_path):
    from mpt_jax.config import to_dict
    from mpt_jax.train import check_run_dir

    run_dir = tmp_path / "run"
    kept = {"every": 1, "keep": 1, "keep_every": 2}
    saved = config(tmp_path, run_dir=str(run_dir), checkpoint=kept, train={"steps": 7})
    for step in (2, 4, 6, 7):  # what keep 1 and keep_every 2 leave of 7 steps
        (run_dir / "checkpoints" / str(step)).mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(saved)))
    for change, lost in [
        ({"keep_every": None}, "steps 2, 4, 6"),
        ({"keep_every": 4}, "steps 2, 6"),
        ({"keep_every": 3}, "steps 2, 4"),  # 6 is a multiple of 3: kept all the same
        # the latest `keep` hold them only until the next saves rotate them out
        ({"keep_every": None, "keep": 4}, "steps 2, 4, 6"),
    ]:
        cfg = config(
            tmp_path, run_dir=str(run_dir), checkpoint={**kept, **change}, train={"steps": 9}
        )
        with pytest.raises(ConfigError, match=rf"checkpoint\.keep_every: .* would delete {lost},"):
            check_run_dir(cfg, to_dict(cfg), overwrite=False)
    # the same period, or one that divides it, deletes none of them
    for change in ({}, {"keep_every": 1}):
        cfg = config(
            tmp_path, run_dir=str(run_dir), checkpoint={**kept, **change}, train={"steps": 9}
        )
        check_run_dir(cfg, to_dict(cfg), overwrite=False)


def test_bad_inputs(small_dataset, tmp_path):
    with pytest.raises(
        ConfigError, match=r"mesh: data\*fsdp\*tensor = 27 .* but there are 8 devices"
    ):
        run(
            config(
                small_dataset, mesh={"data": 3, "fsdp": 3, "tensor": 3}, run_dir=str(tmp_path / "a")
            )
        )
    with pytest.raises(DataError, match=r"seq_len 32 differs from the training seq_len 64"):
        run(
            config(
                small_dataset, model={**TINY_MODEL, "max_seq_len": 64}, run_dir=str(tmp_path / "b")
            )
        )
    with pytest.raises(DataError, match=r"vocabulary 258 exceeds model\.vocab_size 200"):
        run(
            config(
                small_dataset, model={**TINY_MODEL, "vocab_size": 200}, run_dir=str(tmp_path / "c")
            )
        )
    with pytest.raises(NonFiniteLossError, match=r"steps 2..6 had non-finite losses; there is no"):
        run(
            config(
                small_dataset,
                optim={"lr": 1e30, "clipping_threshold": None},
                schedule={"t_warmup": "0ba"},
                train={"steps": 8},
                run_dir=str(tmp_path / "d"),
            )
        )


def test_a_resume_with_one_step_left_ends_with_its_summary(
    small_dataset, tmp_path, monkeypatch, capsys
):
    # the resumed start's one step is its first, whose rates are unknown (a sweep member
    # preempted one step before its end crashed here once, after saving its final checkpoint)
    from mpt_jax.cli import main

    run_dir = str(tmp_path / "run")
    path = write_config(tmp_path / "run.yaml", small_dataset, train={"steps": 3}, run_dir=run_dir)
    monkeypatch.setenv("MPT_JAX_FAULTS", "sigterm@1")  # stops after step 2, saved
    assert main(["train", str(path)]) == 0
    assert "stopped by SIGTERM at step 2" in capsys.readouterr().out
    monkeypatch.delenv("MPT_JAX_FAULTS")
    assert main(["train", str(path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^done: loss [\d.]+, val_loss [\d.]+$", out, re.M), out
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert json.loads([x for x in lines if '"loss"' in x][-1])["tokens_per_s"] is None


def test_command_line_with_overrides(small_dataset, tmp_path):
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "model": TINY_MODEL,
                "data": {"path": str(small_dataset / "ds")},
                "train": {"global_batch": 8, "steps": 100, "precision": "fp32"},
                "run_dir": str(tmp_path / "unused"),
            }
        )
    )
    env = {**os.environ, "XLA_FLAGS": xla_flags(2)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mpt_jax",
            "train",
            str(cfg_path),
            f"run_dir={tmp_path / 'r'}",
            "--overwrite",  # overrides may follow the flags too
            "train.steps=3",
            "optim.lr=3e-4",
            "train.progress=false",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"run folder: {tmp_path / 'r'}" in result.stdout
    # no progress bar: a line per logged step on the console, and all of it in the run log
    assert "step 3 | loss " in result.stdout
    log = (tmp_path / "r" / "logs" / "process_0.log").read_text()
    assert re.search(r"^==== .* start: pid \d+ on .*-m mpt_jax train .*--overwrite", log, re.M)
    assert "step 3 | loss " in log and f"run folder: {tmp_path / 'r'}" in log
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert saved["train"]["steps"] == 3 and saved["optim"]["lr"] == 3e-4
    bad = subprocess.run(
        [sys.executable, "-m", "mpt_jax", "train", str(cfg_path), "train.stepz=3"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert bad.returncode == 2 and "train.stepz: unknown key" in bad.stderr
    (tmp_path / "not_mpt").mkdir()
    (tmp_path / "not_mpt" / "config.json").write_text("{}")
    bad = subprocess.run(
        [sys.executable, "-m", "mpt_jax", "train", str(cfg_path), f"init_from={tmp_path}/not_mpt"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    # a config error (exit 2), which the supervisor does not retry, in one line
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "model_type is None, expected 'mpt'" in bad.stderr


def test_remat_policies_do_not_change_the_math(tmp_path):
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    data = batches(2)
    reference, _ = train_losses(config(tmp_path), mesh, data)
    for remat, scan in (("dots_saveable", False), ("full", True)):
        cfg = config(tmp_path, train={"remat": remat}, model={**TINY_MODEL, "scan_layers": scan})
        losses, _ = train_losses(cfg, mesh, data)
        np.testing.assert_allclose(losses, reference, rtol=0, atol=2e-6, err_msg=remat)


@pytest.mark.parametrize("precision, atol", [("fp32", 2e-6), ("amp_bf16", 2e-3)])
def test_chunked_loss_matches_the_whole_logits(tmp_path, precision, atol):
    """Batch-sharded over 2 devices; chunks of 12 positions pad S=32 to 36 (ignored targets)."""
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=1), jax.devices()[:2])
    data = batches(2)
    model = {**TINY_MODEL, "logit_scale": 0.5}
    train = {"precision": precision}
    whole, state_whole = train_losses(config(tmp_path, model=model, train=train), mesh, data)
    cfg = config(tmp_path, model=model, train={**train, "loss_chunk": 12})
    chunked, state_chunked = train_losses(cfg, mesh, data)
    np.testing.assert_allclose(chunked, whole, rtol=0, atol=atol)
    assert_same_params(state_chunked, state_whole, atol=atol)


def test_chunked_loss_makes_no_more_head_matmuls_than_the_whole_logits(tmp_path):
    """Logits, dh and dw once each: the chunked backward does not project the logits again."""
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    V = 4099  # no other dimension of the step has this size
    model = {**TINY_MODEL, "vocab_size": V}
    batch = {"input_ids": jax.ShapeDtypeStruct((8, 32), jnp.int32)}
    head_matmuls = {}
    for chunk in (None, 8):
        cfg = config(tmp_path, model=model, train={"loss_chunk": chunk})
        graphdef, abstract, shardings = abstract_state(cfg, mesh)
        text = jit_train_step(graphdef, cfg, mesh, shardings).lower(abstract, batch).as_text()
        dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
        head_matmuls[chunk] = sum(f"x{V}x" in line or f"<{V}x" in line for line in dots)
    assert head_matmuls == {None: 3, 8: 3}


def test_chunked_loss_never_holds_the_whole_logits(tmp_path):
    """XLA's temporaries of the compiled step shrink by about the (B, S, V) fp32 logits."""
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    model = {**TINY_MODEL, "vocab_size": 8192, "max_seq_len": 64}
    batch = jax.ShapeDtypeStruct((8, 64), jnp.int32)
    temp = {}
    for chunk in (None, 16):
        cfg = config(tmp_path, model=model, train={"loss_chunk": chunk})
        graphdef, abstract, shardings = abstract_state(cfg, mesh)
        step = jit_train_step(graphdef, cfg, mesh, shardings)
        compiled = step.lower(abstract, {"input_ids": batch}).compile()
        temp[chunk] = compiled.memory_analysis().temp_size_in_bytes
    logits_bytes = 8 * 64 * 8192 * 4
    assert temp[None] > logits_bytes  # the whole logits (and their gradient) are there
    assert temp[None] - temp[16] > 0.75 * logits_bytes, temp


@pytest.mark.parametrize(("precision", "bytes_per_param"), [("fp32", 5.5), ("amp_bf16", 8.5)])
def test_step_temporaries_hold_one_copy_of_the_gradients(tmp_path, precision, bytes_per_param):
    """XLA's temporaries of a step whose activations are negligible: the fp32 gradients (4 bytes
    per parameter), in amp_bf16 the bf16 weights and their bf16 gradients (2 + 2), and little
    else: no second buffer to normalize the gradients into, no copies of the old Adam moments
    kept for a skipped step (11.8 bytes per parameter before either was mended)."""
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    model = {**TINY_MODEL, "d_model": 256, "vocab_size": 8192, "max_seq_len": 8}
    cfg = config(tmp_path, model=model, train={"precision": precision, "global_batch": 4})
    graphdef, abstract, shardings = abstract_state(cfg, mesh)
    step = jit_train_step(graphdef, cfg, mesh, shardings)
    batch = {"input_ids": jax.ShapeDtypeStruct((4, 8), jnp.int32)}
    temp = step.lower(abstract, batch).compile().memory_analysis().temp_size_in_bytes
    assert temp / count_params(cfg.model) < bytes_per_param


def test_fsdp_keeps_each_devices_rows_through_the_blocks(tmp_path):
    """Activation-dominated step temporaries shrink with the fsdp devices: XLA kept every row
    of the batch on each device after the embedding gather until the model constrained its
    output to the batch's sharding (at fsdp 8: 0.42 of one device's temporaries, now 0.13)."""
    model = {**TINY_MODEL, "d_model": 256, "n_layers": 2, "vocab_size": 4096, "max_seq_len": 256}
    temps = {}
    for fsdp in (1, 8):
        mesh = make_mesh(MeshConfig(data=1, fsdp=fsdp, tensor=1), jax.devices()[:fsdp])
        cfg = config(
            tmp_path, model=model, mesh={"data": 1, "fsdp": fsdp}, train={"global_batch": 32}
        )
        graphdef, abstract, shardings = abstract_state(cfg, mesh)
        step = jit_train_step(graphdef, cfg, mesh, shardings)
        batch = {
            "input_ids": jax.ShapeDtypeStruct((32, 256), jnp.int32, sharding=batch_sharding(mesh))
        }
        temps[fsdp] = step.lower(abstract, batch).compile().memory_analysis().temp_size_in_bytes
    assert temps[8] < 0.2 * temps[1], temps


def test_backward_keeps_32_bytes_per_token_layer_and_model_dim(tmp_path, monkeypatch):
    """The scanned layers' saved activations in amp_bf16 without remat, as a GPU step saves them.

    Per token and layer: the MLP's input and activation in bf16 (2 x 2F bytes), both norms' inputs
    and outputs and attention's q, k, v and output in bf16 (8 x 2D): 32 D bytes for F = 4D, the
    fp32 statistics aside. Autodiff of the norms and the erf GELU kept 64 D (fp32 copies of the
    centred and normalized inputs, two more (., F) GELU intermediates).
    """
    monkeypatch.setattr(attention_module, "backend", lambda: "gpu")  # our kernels, no scores
    B, S = 4, 32
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    model = {**TINY_MODEL, "attn_impl": "auto", "scan_layers": True}
    cfg = config(tmp_path, model=model, train={"precision": "amp_bf16", "global_batch": B})
    graphdef, abstract, shardings = abstract_state(cfg, mesh)
    step = jit_train_step(graphdef, cfg, mesh, shardings)
    jaxpr = step.trace(abstract, {"input_ids": jax.ShapeDtypeStruct((B, S), jnp.int32)}).jaxpr

    def scans(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "scan":
                yield eqn
            for param in eqn.params.values():
                if hasattr(param, "jaxpr"):  # a ClosedJaxpr
                    yield from scans(getattr(param.jaxpr, "jaxpr", param.jaxpr))

    layer_scans = [e for e in scans(jaxpr.jaxpr) if e.params["length"] == cfg.model.n_layers]
    forward = layer_scans[0]  # the backward scan runs second
    # the stacked outputs, (L, B, S, ...): the carried residual stream is (B, S, D)
    per_token = [v.aval for v in forward.outvars if v.aval.shape[1:3] == (B, S)]
    nbytes = sum(math.prod(a.shape) * a.dtype.itemsize for a in per_token)
    D, L = cfg.model.d_model, cfg.model.n_layers
    assert nbytes / (L * B * S * D) <= 32.5, sorted(a.str_short() for a in per_token)


@pytest.mark.parametrize("loss_chunk", [None, 16])
def test_amp_bf16_step_for_a_gpu_multiplies_in_bf16_only(tmp_path, loss_chunk):
    """The step lowered for CUDA (here, without a GPU): every matmul takes bf16 operands.

    An fp32 matmul in the step (a missed cast, an einsum for a reduction) runs at a fraction of
    the bf16 tensor-core rate on a GPU. Attention is the XLA one here, so its matmuls count too;
    the next test lowers the step with our kernels.
    """
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    model = {**TINY_MODEL, "attn_impl": "xla", "max_seq_len": 64}
    train = {"precision": "amp_bf16", "loss_chunk": loss_chunk}
    cfg = config(tmp_path, model=model, train=train)
    graphdef, abstract, shardings = abstract_state(cfg, mesh)
    step = jit_train_step(graphdef, cfg, mesh, shardings)
    batch = {"input_ids": jax.ShapeDtypeStruct((8, 64), jnp.int32)}
    text = lower_for_cuda(step, abstract, batch, mesh=mesh).as_text()
    operands = re.findall(
        r"stablehlo\.dot_general .*?: \(tensor<\S+x(\w+)>, tensor<\S+x(\w+)>\)", text
    )
    assert len(operands) >= 3 * 2 * cfg.model.n_layers  # qkv, out and two MLP matmuls, fwd + bwd
    assert set(operands) == {("bf16", "bf16")}, sorted(set(operands))


@pytest.mark.parametrize("loss_chunk", [None, 16])
def test_step_built_for_a_gpu_runs_alibi_in_our_triton_kernels(tmp_path, monkeypatch, loss_chunk):
    """The ALiBi step as a GPU host builds it (`attn_impl: auto`), lowered for CUDA here.

    Attention is our three Triton kernels (forward, dq, dk/dv), no (seq, seq) array is left
    anywhere in the step (no bias, no scores) and every other matmul takes bf16 operands.
    """
    monkeypatch.setattr(attention_module, "backend", lambda: "gpu")
    S = 80  # no other dimension of the tiny model is 80
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    model = {**TINY_MODEL, "attn_impl": "auto", "max_seq_len": S}
    cfg = config(tmp_path, model=model, train={"precision": "amp_bf16", "loss_chunk": loss_chunk})
    graphdef, abstract, shardings = abstract_state(cfg, mesh)
    step = jit_train_step(graphdef, cfg, mesh, shardings)
    batch = {"input_ids": jax.ShapeDtypeStruct((4, S), jnp.int32)}
    text = lower_for_cuda(step, abstract, batch, mesh=mesh).as_text()
    kernels = re.findall(r'name = "(mpt_flash_\w+)"', text)
    assert sorted(set(kernels)) == ["mpt_flash_dkdv", "mpt_flash_dq", "mpt_flash_fwd"]
    assert len(kernels) == 3 * cfg.model.n_layers  # unrolled layers: one launch each
    # the forward reads q, k and v from the fused projection (B, S, 3H, K), padded to the
    # kernels' blocks, not from copies of its slices
    H, K = cfg.model.n_heads, cfg.model.d_model // cfg.model.n_heads
    Sp = default_tilings(K).padded_length(S)
    fwd_operands = re.findall(r'name = "mpt_flash_fwd".*?\} : \((tensor<[^>]+>)', text)
    assert fwd_operands and set(fwd_operands) == {f"tensor<4x{Sp}x{3 * H}x{K}xbf16>"}
    assert not re.search(rf"tensor<(\S+x)?{S}x{S}x", text)
    operands = re.findall(
        r"stablehlo\.dot_general .*?: \(tensor<\S+x(\w+)>, tensor<\S+x(\w+)>\)", text
    )
    assert operands and set(operands) == {("bf16", "bf16")}, sorted(set(operands))


@pytest.mark.parametrize("scan_layers", [True, False])
def test_step_built_for_a_gpu_runs_alibi_in_our_hopper_kernels(tmp_path, monkeypatch, scan_layers):
    """The ALiBi step with `attn_impl: pallas_mgpu` (perf.sh's Hopper row), lowered for CUDA.

    Attention is our two Mosaic GPU kernels in each layer (the forward; dq and dk/dv in one
    launch), scanned or not, reading the fused projection in place and writing its gradient in
    place: no slice of it, no concatenation, no (seq, seq) array, every other matmul in bf16.
    """
    monkeypatch.setattr(attention_module, "backend", lambda: "gpu")
    S = 256  # a multiple of the Hopper kernels' blocks; no other dimension of the model is 256
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    model = {
        **TINY_MODEL,
        "d_model": 128,
        "n_heads": 2,  # head dim 64
        "attn_impl": "pallas_mgpu",
        "max_seq_len": S,
        "scan_layers": scan_layers,
    }
    cfg = config(tmp_path, model=model, train={"precision": "amp_bf16", "loss_chunk": 64})
    graphdef, abstract, shardings = abstract_state(cfg, mesh)
    step = jit_train_step(graphdef, cfg, mesh, shardings)
    batch = {"input_ids": jax.ShapeDtypeStruct((2, S), jnp.int32)}
    text = lower_for_cuda(step, abstract, batch, mesh=mesh).as_text()
    launches = len(re.findall(r"stablehlo\.custom_call @mosaic_gpu", text))
    # forward and backward: once in the scanned layer's body, else once per layer
    assert launches == 2 * (1 if scan_layers else cfg.model.n_layers)
    kernels = set(re.findall(r"mpt_flash_mgpu_(fwd|bwd|dq|dkdv)\b", text))
    assert kernels == {"fwd", "bwd"}
    fused_qkv = f"tensor<2x{S}x{3 * model['n_heads']}x64x"  # its gradient: not concatenated
    assert not re.search(rf"stablehlo\.concatenate[^\n]*-> {fused_qkv}", text)
    assert fused_qkv in text
    # no other custom call: no Triton kernel, no cuDNN
    assert all(t.startswith("mosaic_gpu") for t in re.findall(r"custom_call @(\w+)", text))
    assert not re.search(rf"tensor<(\S+x)?{S}x{S}x", text)
    operands = re.findall(
        r"stablehlo\.dot_general .*?: \(tensor<\S+x(\w+)>, tensor<\S+x(\w+)>\)", text
    )
    assert operands and set(operands) == {("bf16", "bf16")}, sorted(set(operands))


@pytest.mark.parametrize(("data", "fsdp", "tensor"), [(2, 2, 1), (1, 2, 2)])
def test_step_hands_each_devices_rows_and_heads_to_the_pallas_kernels(
    tmp_path, monkeypatch, data, fsdp, tensor
):
    """XLA cannot partition a Pallas kernel (a custom call): given the batch split over data and
    fsdp (heads over tensor), it would gather the whole batch (all heads) onto every device and
    run the kernel on all of it. The step, lowered for CUDA on a 4-device mesh, runs attention
    on its own rows and heads, the norms on its own rows."""
    monkeypatch.setattr(attention_module, "backend", lambda: "gpu")
    mesh = make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor), jax.devices()[:4])
    model = {**TINY_MODEL, "attn_impl": "pallas_gpu", "norm_impl": "pallas_gpu"}
    cfg = config(tmp_path, model=model, train={"precision": "amp_bf16", "loss_chunk": 16})
    graphdef, abstract, shardings = abstract_state(cfg, mesh)
    step = jit_train_step(graphdef, cfg, mesh, shardings)
    B, S, D, H = 8, 32, cfg.model.d_model, cfg.model.n_heads
    batch = {"input_ids": jax.ShapeDtypeStruct((B, S), jnp.int32)}
    text = lower_for_cuda(step, abstract, batch, mesh=mesh).as_text()
    Sp = default_tilings(D // H).padded_length(S)

    def first_operands(kernel):
        return set(re.findall(rf'name = "{kernel}".*?\}} : \((tensor<[^>]+>)', text))

    # B / (data * fsdp) rows per device: attention on (rows, S, 3H / tensor, K), reading the
    # q, k and v of its heads in place; the norms on rows x S tokens of D
    rows, qkv_heads = B // (data * fsdp), 3 * H // tensor
    assert first_operands("mpt_flash_fwd") == {f"tensor<{rows}x{Sp}x{qkv_heads}x{D // H}xbf16>"}
    assert first_operands("mpt_flash_dq") == {f"tensor<{rows}x{Sp}x{qkv_heads}x{D // H}xbf16>"}
    assert first_operands("mpt_norm_fwd") == {f"tensor<{rows * S}x{D}xf32>"}
    assert first_operands("mpt_norm_bwd") == {f"tensor<{rows * S}x{D}xbf16>"}


@pytest.mark.parametrize("precision", ["amp_bf16", "pure_bf16"])
def test_bf16_precisions_train(tmp_path, precision):
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    cfg = config(
        tmp_path, train={"precision": precision}, optim={"lr": 3e-3}, schedule={"t_warmup": "1ba"}
    )
    _, state, _ = init_state(cfg, mesh)
    param_dtype = {"amp_bf16": jnp.float32, "pure_bf16": jnp.bfloat16}[precision]
    assert all(x.dtype == param_dtype for x in jax.tree.leaves(state.params))
    fp32, _ = train_losses(
        config(tmp_path, optim={"lr": 3e-3}, schedule={"t_warmup": "1ba"}),
        mesh,
        batches(1, vocab=64) * 6,
    )
    losses, _ = train_losses(cfg, mesh, batches(1, vocab=64) * 6)
    assert losses[-1] < losses[0] - 0.5
    np.testing.assert_allclose(losses[0], fp32[0], rtol=2e-2)


def test_evaluation_batch_divides_over_the_mesh_and_processes(tmp_path):
    from types import SimpleNamespace

    from mpt_jax.train import eval_batch_size

    meta = SimpleNamespace(folder=tmp_path, splits={"val": {"rows": 153}})
    # 153 val rows, a global batch of 160, data 2 x fsdp 4 over 2 processes: 152 rows, not 153
    assert eval_batch_size(meta, 160, data_shards=8, processes=2) == 152
    assert eval_batch_size(meta, 64, data_shards=8, processes=2) == 64
    assert eval_batch_size(meta, 160, data_shards=2, processes=3) == 150
    meta.splits["val"]["rows"] = 5
    with pytest.raises(DataError, match=r"the val split has 5 rows, fewer than the 8 data-para"):
        eval_batch_size(meta, 160, data_shards=8, processes=2)
    meta.splits["val"]["rows"] = 0
    with pytest.raises(DataError, match=r"the val split is empty \(prepared with val_fraction 0"):
        eval_batch_size(meta, 160, data_shards=8, processes=1)


def test_data_eval_adds_val_losses_of_other_datasets(small_dataset, tmp_path):
    from mpt_jax.data import prepare_dataset

    other = prepare_dataset(  # the same documents, split otherwise: other validation rows
        [str(small_dataset / "docs.jsonl")],
        tmp_path / "other",
        seq_len=32,
        val_fraction=0.3,
        progress=False,
    )
    empty = prepare_dataset(
        [str(small_dataset / "docs.jsonl")],
        tmp_path / "empty",
        seq_len=32,
        val_fraction=0.0,
        progress=False,
    )
    evals = [
        {"label": "again", "path": str(small_dataset / "ds")},
        {"label": "other", "path": str(other)},
    ]
    run_dir = tmp_path / "run"
    train = {"steps": 4, "eval_every": 2, "eval_batches": 2}
    final = run(config(small_dataset, run_dir=str(run_dir), data={"eval": evals}, train=train))
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluated = [x for x in lines if "val_loss" in x]
    assert [x["step"] for x in evaluated] == [2, 4]
    for x in evaluated:  # the training data's own val split again: the same loss
        assert x["val_loss/again"] == x["val_loss"]
        assert x["val_loss/other"] != x["val_loss"] and math.isfinite(x["val_loss/other"])
        assert x["val_perplexity/other"] == pytest.approx(math.exp(x["val_loss/other"]))
    assert final["val_loss/other"] == evaluated[-1]["val_loss/other"]

    # bad entries: refused before the run folder is made
    for data, error, message in [
        ({"eval": [evals[0], {**evals[1], "label": "again"}]}, ConfigError, r"given twice"),
        ({"eval": [{"label": "a/b", "path": str(other)}]}, ConfigError, r"without '/'"),
        (
            {"eval": [{"label": "e", "path": str(empty)}]},
            DataError,
            r"data\.eval\[0\] \(e\): .*the val split is empty",
        ),
        (
            {"eval": [{"label": "gone", "path": str(tmp_path / "gone")}]},
            DataError,
            r"data\.eval\[0\] \(gone\): .*gone",
        ),
        # the training data's own val split too, which the run's last step evaluates
        ({"path": str(empty)}, DataError, r"empty: the val split is empty"),
    ]:
        with pytest.raises(error, match=message):
            run(config(small_dataset, run_dir=str(tmp_path / "bad"), data=data, train=train))
        assert not (tmp_path / "bad").exists()


def test_datasets_whose_documents_end_in_other_tokens_are_refused(small_dataset, tmp_path):
    from mpt_jax.data import prepare_dataset
    from mpt_jax.data.tokenizer import train_bpe
    from mpt_jax.train import run

    docs = (small_dataset / "docs.jsonl").read_text().splitlines()
    tok = train_bpe([json.loads(d)["text"] for d in docs], 300, tmp_path / "tokenizer.json")
    # one tokenizer file, prepared with its own end-of-text token and with another
    for name, eos in (("ds_eot", None), ("ds_x", "x")):
        prepare_dataset(
            [str(small_dataset / "docs.jsonl")],
            tmp_path / name,
            seq_len=32,
            val_fraction=0.1,
            tokenizer=str(tok),
            eos_token=eos,
            progress=False,
        )
    model = {**TINY_MODEL, "vocab_size": 300}
    base = dict(model=model, run_dir=str(tmp_path / "run"))
    mixture = {"path": None, "tokenizer": str(tok)}
    mixture["mixture"] = [{"path": str(tmp_path / "ds_eot")}, {"path": str(tmp_path / "ds_x")}]
    evaluated = {"path": str(tmp_path / "ds_eot"), "tokenizer": str(tok)}
    evaluated["eval"] = [{"label": "x", "path": str(tmp_path / "ds_x")}]
    for data, where in ((mixture, ""), (evaluated, r"data\.eval\[0\] \(x\): ")):
        with pytest.raises(
            DataError,
            match=rf"^{where}\S*ds_x/meta\.json: documents end in token \d+, those of \S*ds_eot "
            r"in \d+ \('x' and '<\|endoftext\|>'\); prepare every dataset of a run with the same "
            r"end-of-text token \(tools/prepare_data\.py --eos-token\)$",
        ):
            run(config(tmp_path, data=data, **base))
        assert not (tmp_path / "run").exists()


def test_the_profile_window_holds_its_steps_alone_also_when_resumed_inside_it(
    small_dataset, tmp_path, monkeypatch, capfd
):
    from mpt_jax.profiling import summarize_trace
    from mpt_jax.train import run

    def kernel_runs(run_dir):
        """How often each XLA kernel in the newest trace ran, per step's device: the traced
        steps, if alone (on CPU the host's threads run every device's)."""
        summary = summarize_trace(run_dir / "profile", top=100_000)
        return {k.count / jax.device_count() for k in summary.top}

    sections = dict(train={"steps": 7, "profile": [2, 6]}, checkpoint={"every": None})
    monkeypatch.setenv("MPT_JAX_FAULTS", "sigterm@3")  # stops after steps 2 and 3, saved
    assert run(config(small_dataset, run_dir=str(tmp_path / "run"), **sections))["step"] == 4
    # the host runs a step ahead: without waiting at the window's edges the trace held the
    # tail of the step before it (2.25 and 2.375 runs of some kernels)
    assert kernel_runs(tmp_path / "run") == {2.0}
    monkeypatch.delenv("MPT_JAX_FAULTS")
    capfd.readouterr()
    run(config(small_dataset, run_dir=str(tmp_path / "run"), **sections))
    said = "train.profile: tracing steps [5, 6) only of [2, 6): the run resumed inside the window "
    assert said + "and step 4 compiles" in capfd.readouterr().err
    # the resumed run's trace (the newest) holds step 5 alone: not the compile, not the run's end
    assert kernel_runs(tmp_path / "run") == {1.0}

    with pytest.raises(ConfigError, match=r"train.profile: \[4, 7\) ends past the run's 6 steps"):
        config(small_dataset, train={"steps": 6, "profile": [4, 7]})
    from mpt_jax.train import _Profiler

    _Profiler((0, 1), tmp_path / "p", 0)  # a fresh run's window of its compiling step alone
    assert "train.profile: nothing of [0, 1): step 0 compiles" in capfd.readouterr().err
    _Profiler((2, 5), tmp_path / "p", 6)  # resumed past the window: nothing to say
    assert "train.profile" not in capfd.readouterr().err


def test_batches_the_mesh_cannot_split_evenly_are_refused_naming_the_split(tmp_path):
    from mpt_jax.train import run

    mesh = {"data": 2, "fsdp": 4, "tensor": 1}
    for train, message in (
        ({"global_batch": 12}, r"train.global_batch: 12 is not a multiple of data\*fsdp \(8\)"),
        ({"microbatch": 4}, r"train.microbatch: 4 is not a multiple of data\*fsdp \(8\)"),
    ):
        with pytest.raises(ConfigError, match=message):
            run(config(tmp_path, mesh=mesh, train=train, run_dir=str(tmp_path / "run")))
        assert not (tmp_path / "run").exists()


def test_a_resume_that_stretches_the_schedule_says_how_the_learning_rate_moves(tmp_path):
    from helpers import raw_config

    from mpt_jax.train import _schedule_change

    def raw(steps, **schedule):
        return raw_config(
            tmp_path, train={"steps": steps}, schedule={"t_warmup": "10ba", **schedule}
        )

    extended = config(tmp_path, train={"steps": 500}, schedule={"t_warmup": "10ba"})
    said = _schedule_change(extended, raw(400), 400, 400)
    # the cosine of 400 steps has ended (lr x alpha_f 0); over 500 steps, step 401 (composer's
    # time 400) is well up: lr x (1 + cos(pi (400 - 10) / (500 - 10))) / 2
    now = 1e-3 * (1 + math.cos(math.pi * 390 / 490)) / 2
    assert said == (
        "warning: the run's length changed from 400 to 500 steps, and its schedule "
        f"(cosine_with_warmup, t_max 1dur) with it: the learning rate of step 401 is {now:.3g}, "
        "where the saved run's was 0"
    )
    assert _schedule_change(extended, raw(500), 400, 400) is None  # the same length
    # two of the 400 steps skipped (non-finite): the schedule is 2 updates behind
    behind = 1e-3 * (1 + math.cos(math.pi * 388 / 490)) / 2
    assert f"the learning rate of step 401 is {behind:.3g}," in _schedule_change(
        extended, raw(400), 398, 400
    )
    constant = {"name": "constant_with_warmup", "t_warmup": "10ba"}
    stays = config(tmp_path, train={"steps": 500}, schedule=constant)
    assert _schedule_change(stays, raw(400, name="constant_with_warmup"), 400, 400) is None


def test_a_resume_cuts_metrics_back_but_keeps_the_record_of_its_checkpoints_save(tmp_path):
    from mpt_jax.train import _truncate_metrics

    train = [{"step": s, "loss": 1.0 / s} for s in range(1, 7)]
    saved_4 = {"step": 5, "checkpoint_step": 4, "checkpoint_save_s": 0.4}  # finished a step late
    saved_6 = {"step": 6, "checkpoint_step": 6, "checkpoint_save_s": 0.4}
    lines = [*train[:5], saved_4, train[5], saved_6]
    text = "".join(json.dumps(x) + "\n" for x in lines) + '{"step": 7, "lo'  # cut by a kill
    (tmp_path / "metrics.jsonl").write_text(text)
    _truncate_metrics(tmp_path, 4, lines=4)  # checkpoint 4 was saved when the file had 4 lines
    kept = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == [*train[:4], saved_4]
