"""Checkpoints and faults: exact resume, preemption, SIGKILL, corruption, NaN, bad input."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import TINY_MODEL, config
from xla_flags import xla_flags

import mpt_jax
from mpt_jax import checkpoint
from mpt_jax.config import ConfigError, MeshConfig, run_config_from_dict, to_dict
from mpt_jax.data import DataError, prepare_dataset
from mpt_jax.sharding import batch_sharding, make_mesh
from mpt_jax.train import (
    NonFiniteLossError,
    _initial_params,
    abstract_state,
    init_state,
    make_train_step,
    run,
)

REPO = Path(__file__).resolve().parent.parent


def final_params(run_dir, step=None):
    """The params of a run folder's latest (or `step`) checkpoint as NumPy arrays."""
    model = mpt_jax.from_pretrained(run_dir, step=step)
    from flax import nnx

    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def train_lines(run_dir):
    lines = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {x["step"]: (x["loss"], x["grad_norm"], x["lr"]) for x in lines if "loss" in x}


def assert_bitwise_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y)


@pytest.mark.parametrize("precision", ["fp32", "amp_bf16"])
def test_sigterm_then_resume_is_bitwise_exact(small_dataset, tmp_path, monkeypatch, precision):
    sections = dict(
        train={"steps": 9, "log_every": 1, "precision": precision, "eval_batches": 1},
        checkpoint={"every": 4},
        mesh={"data": 2, "fsdp": 4},
    )
    run(config(small_dataset, run_dir=str(tmp_path / "whole"), **sections))
    monkeypatch.setenv("MPT_JAX_FAULTS", "sigterm@5")  # the notice arrives before step 5
    stopped = run(config(small_dataset, run_dir=str(tmp_path / "cut"), **sections))
    assert stopped["preempted"] == "SIGTERM" and stopped["step"] == 6  # step 5 was finished
    assert checkpoint.committed_steps(tmp_path / "cut" / "checkpoints") == [4, 6]
    assert not (tmp_path / "cut" / "complete.json").exists()  # launch scripts requeue
    monkeypatch.delenv("MPT_JAX_FAULTS")
    # the dataset moved meanwhile (another mount): the run resumes on it, checked by content
    moved = tmp_path / "moved"
    shutil.copytree(small_dataset / "ds", moved / "ds")
    resumed = run(config(moved, run_dir=str(tmp_path / "cut"), **sections))
    assert resumed["step"] == 9
    assert json.loads((tmp_path / "cut" / "complete.json").read_text())["step"] == 9
    assert_bitwise_equal(final_params(tmp_path / "cut"), final_params(tmp_path / "whole"))
    assert train_lines(tmp_path / "cut") == train_lines(tmp_path / "whole")
    if precision != "fp32":
        return
    # prepared again with other options: other rows at that path, refused before any change
    shutil.rmtree(moved / "ds")
    source = small_dataset / "docs.jsonl"
    prepare_dataset([str(source)], moved / "ds", seq_len=32, val_fraction=0.2, progress=False)
    before = {p: p.read_bytes() for p in (tmp_path / "cut").rglob("*") if p.is_file()}
    with pytest.raises(DataError, match=r"moved/ds is not the dataset the run trained on"):
        run(config(moved, run_dir=str(tmp_path / "cut"), **sections))
    assert {p: p.read_bytes() for p in (tmp_path / "cut").rglob("*") if p.is_file()} == before


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    cfg = config(tmp_path, train={"steps": 4})
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    graphdef, state, _shardings = init_state(cfg, mesh)
    before = [np.asarray(x) for x in jax.tree.leaves((state.params, state.opt_state))]
    poisoned = jax.jit(make_train_step(graphdef, cfg, poison=True))
    ids = np.random.default_rng(0).integers(0, 258, (8, 32), dtype=np.int32)
    batch = {"input_ids": jax.device_put(ids, batch_sharding(mesh))}
    state, out = poisoned(state, batch)
    state, out = poisoned(state, batch)
    after = [np.asarray(x) for x in jax.tree.leaves((state.params, state.opt_state))]
    assert_bitwise_equal(after, before)
    assert not np.isfinite(float(out["loss"]))
    assert int(state.step) == 2 and int(state.skipped_steps) == 2 and int(state.bad_streak) == 2
    state, out = jax.jit(make_train_step(graphdef, cfg))(state, batch)
    assert np.isfinite(float(out["loss"])) and int(state.bad_streak) == 0
    assert int(state.skipped_steps) == 2
    # skips do not advance the schedule: the first applied update is the warmup's first, LR 0,
    # which leaves the parameters as they were, and the logged LR is that one, not step 2's
    # (step 2 of the 2-batch warmup would have had the peak LR)
    assert float(out["lr"]) == 0.0
    assert_bitwise_equal(
        jax.tree.leaves(state.params), before[: len(jax.tree.leaves(state.params))]
    )


def test_nan_streak_rolls_back_and_skips_the_bad_data(small_dataset, tmp_path, monkeypatch, capfd):
    # data batches 6..10 are poison: steps 7..11 skip their updates, and the fifth in a row
    # rolls back to the scheduled checkpoint of step 8
    sections = dict(
        train={"steps": 14, "log_every": 1, "nonfinite_patience": 5, "eval_batches": 1},
        checkpoint={"every": 4},
    )
    monkeypatch.setenv("MPT_JAX_FAULTS", "nan@6-10")
    restore = checkpoint.Checkpointer.restore_latest

    def slow_restore(*args, **kwargs):  # a large model's restore: seconds, not milliseconds
        time.sleep(1.0)
        return restore(*args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(checkpoint.Checkpointer, "restore_latest", slow_restore)
        final = run(config(small_dataset, run_dir=str(tmp_path / "run"), **sections))
    err = capfd.readouterr().err
    # the data goes on after step 11's batch (10): batches 8..10 skipped
    assert (
        "steps 7..11 had non-finite losses: rolled back to step 8, skipping 3 data batches (8..10)"
    ) in err
    assert np.isfinite(final["loss"]) and final["step"] == 14
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["rollback_to_step"] for x in lines if "rollback_to_step" in x] == [8]
    # the restore is no step's time: the clock starts again after it, and the first step after
    # it has no rate, as the first step of a start
    after = lines[next(i for i, x in enumerate(lines) if "rollback_to_step" in x) :]
    after = [x for x in after if "loss" in x]
    assert after[0]["step"] == 9 and after[0]["tokens_per_s"] is None
    assert all(x["step_time"] < 1.0 for x in after) and after[1]["tokens_per_s"] > 0
    meta = checkpoint.read_meta(tmp_path / "run" / "checkpoints" / "14")
    assert meta["data"]["batches"] == 17 and meta["rollbacks"] == 1

    # stopped by SIGTERM inside the streak, at step 9: resumed, it does not roll back to that
    # preemption save (which it deletes) but to step 8, as the uninterrupted run
    monkeypatch.setenv("MPT_JAX_FAULTS", "nan@6-10,sigterm@8")
    assert run(config(small_dataset, run_dir=str(tmp_path / "cut"), **sections))["step"] == 9
    monkeypatch.setenv("MPT_JAX_FAULTS", "nan@6-10")
    capfd.readouterr()
    run(config(small_dataset, run_dir=str(tmp_path / "cut"), **sections))
    assert "rolled back to step 8, skipping 3 data batches (8..10), deleting the checkpoint " in (
        capfd.readouterr().err
    )
    assert_bitwise_equal(final_params(tmp_path / "cut"), final_params(tmp_path / "run"))
    assert train_lines(tmp_path / "cut") == train_lines(tmp_path / "run")

    monkeypatch.setenv("MPT_JAX_FAULTS", "nan@0-20")
    with pytest.raises(NonFiniteLossError, match="no checkpoint to roll back to"):
        run(config(small_dataset, run_dir=str(tmp_path / "bad"), train={"steps": 8}))


def val_lines(run_dir):
    lines = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(x["step"], x["val_loss"]) for x in lines if "val_loss" in x]


def test_resume_keeps_metrics_whole_and_refuses_what_it_cannot_continue(
    small_dataset, tmp_path, monkeypatch
):
    sections = dict(
        train={"steps": 8, "log_every": 1, "eval_every": 4, "eval_batches": 1},
        checkpoint={"every": 4},
    )
    whole = tmp_path / "whole"
    run(config(small_dataset, run_dir=str(whole), **sections))
    assert [step for step, _ in val_lines(whole)] == [4, 8]
    # stopped at an evaluation step: saved before evaluating; the resumed run evaluates it
    cut = tmp_path / "cut"
    monkeypatch.setenv("MPT_JAX_FAULTS", "sigterm@3")
    stopped = run(config(small_dataset, run_dir=str(cut), **sections))
    assert stopped["step"] == 4 and stopped["checkpoint_saved"] and val_lines(cut) == []
    monkeypatch.delenv("MPT_JAX_FAULTS")
    with open(cut / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # a line cut short by a crash
    run(config(small_dataset, run_dir=str(cut), **sections))
    assert val_lines(cut) == val_lines(whole) and train_lines(cut) == train_lines(whole)
    # a finished run started again logs its final evaluation once
    run(config(small_dataset, run_dir=str(cut), **sections))
    assert val_lines(cut) == val_lines(whole)
    # a run shorter than its checkpoint cannot continue from it
    with pytest.raises(ConfigError, match=r"train\.steps: the run ends at step 6, before its"):
        run(config(small_dataset, run_dir=str(cut), **{**sections, "train": {"steps": 6}}))
    # checkpoints off for a run that has some: it resumes from them and saves nothing
    off = dict(train={**sections["train"], "steps": 12}, checkpoint={"enabled": False})
    monkeypatch.setenv("MPT_JAX_FAULTS", "sigterm@9")
    stopped = run(config(small_dataset, run_dir=str(cut), **off))
    assert stopped["step"] == 10 and not stopped["checkpoint_saved"]
    assert sorted(train_lines(cut)) == list(range(1, 11))
    assert checkpoint.committed_steps(cut / "checkpoints") == [4, 8]
    # a finished run extended past a step that is no evaluation step keeps its final one
    more = {**sections, "train": {**sections["train"], "steps": 9, "eval_every": 3}}
    run(config(small_dataset, run_dir=str(whole), **more))
    assert [step for step, _ in val_lines(whole)] == [4, 8, 9]
    # a fresh start in a folder is a new W&B run: the old run id goes
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "wandb_run_id").write_text("0123abcd\n")
    run(config(small_dataset, run_dir=str(tmp_path / "fresh"), train={"steps": 1}))
    assert not (tmp_path / "fresh" / "wandb_run_id").exists()


def test_no_readable_checkpoint_is_an_error_and_moves_nothing(tmp_path):
    from mpt_jax.config import CheckpointConfig

    ckpt = checkpoint.Checkpointer(tmp_path / "c", CheckpointConfig(every=1))
    x, meta = {"w": jnp.arange(4.0)}, {"config": {}}
    for step in (1, 2):
        ckpt.save(step, params=x, opt_state=x, counters={"step": jnp.int32(step)}, meta=meta)
    ckpt.wait()
    abstract = {k: jax.ShapeDtypeStruct((4,), jnp.float32) for k in ("w",)}
    target = {"params": abstract, "opt_state": abstract, "counters": {"step": jnp.int32(0)}}
    (tmp_path / "c" / "2" / "meta" / "metadata").unlink()
    assert ckpt.restore_latest(target).step == 1  # the newer one moved aside only now
    assert checkpoint.committed_steps(tmp_path / "c") == [1]
    assert len(list((tmp_path / "c" / checkpoint.CORRUPT_DIR).iterdir())) == 1
    (tmp_path / "c" / "1" / "meta" / "metadata").unlink()
    with pytest.raises(checkpoint.CheckpointError, match=r"no checkpoint could be restored"):
        ckpt.restore_latest(target)
    assert checkpoint.committed_steps(tmp_path / "c") == [1]  # kept for a later try
    ckpt.close()


def test_checkpointer_retention_and_time_backstop(tmp_path):
    from mpt_jax.config import CheckpointConfig

    cfg = CheckpointConfig(every=None, every_minutes=0.01, keep=2, keep_every=4)
    ckpt = checkpoint.Checkpointer(tmp_path / "c", cfg)
    assert not ckpt.due(1)  # the time backstop is 0.6 s
    time.sleep(0.7)
    assert ckpt.due(1)
    x = {"w": jnp.arange(4.0)}
    for step in range(1, 11):
        ckpt.save(
            step, params=x, opt_state=x, counters={"step": jnp.int32(step)}, meta={"config": {}}
        )
    ckpt.wait()
    assert checkpoint.committed_steps(tmp_path / "c") == [4, 8, 9, 10]
    assert [d["checkpoint_step"] for d in ckpt.completed] == list(range(1, 11))
    assert all(d["checkpoint_blocked_s"] > 0 < d["checkpoint_save_s"] for d in ckpt.completed)
    ckpt.close()


def test_time_backstop_with_several_processes_checks_at_the_pace_of_the_steps(tmp_path):
    # process 0's view of the collective: its own decision comes back from the broadcast
    from jax.experimental import multihost_utils

    from mpt_jax.config import CheckpointConfig

    clock = [1000.0]
    ckpt = checkpoint.Checkpointer(tmp_path / "c", CheckpointConfig(every=None, every_minutes=1))
    decisions = []

    def broadcast(x):
        decisions.append(int(x[1]))
        return x

    with (
        mock.patch.object(jax, "process_count", return_value=2),
        mock.patch.object(multihost_utils, "broadcast_one_to_all", side_effect=broadcast),
        mock.patch.object(checkpoint.time, "monotonic", side_effect=lambda: clock[0]),
    ):
        ckpt.start_clock()
        due = []
        for step in range(1, 61):  # 1.5 s a step: a check about every 3 s (1/20 of a minute)
            due.append(ckpt.due(step))
            clock[0] += 1.5
        # the first check knows no pace (the next step checks again), then every second step;
        # the minute is up at step 41, seen at 42 (nothing saves here, so it stays up)
        assert decisions[:3] == [1, 2, 2] and len(decisions) == 31  # steps 1, 2, 4, ..., 60
        assert [step for step, d in enumerate(due, 1) if d] == list(range(42, 61, 2))
        decisions.clear()
        clock[0] += 600.0  # two slow steps: from then on, a check on every step
        assert not ckpt.due(61) and ckpt.due(62) and decisions == [1]
        clock[0] += 300.0
        assert ckpt.due(63) and decisions == [1, 1]
        assert ckpt.due(5)  # back at step 5 (a rollback): checked at once
    ckpt.close()


def _corrupt_latest(run_dir, how):
    step_dir = (
        Path(run_dir)
        / "checkpoints"
        / str(checkpoint.committed_steps(Path(run_dir) / "checkpoints")[-1])
    )
    if how == "truncate":
        data = max((step_dir / "params" / "d").iterdir(), key=lambda p: p.stat().st_size)
        with open(data, "r+b") as f:
            f.truncate(data.stat().st_size // 2)
    else:
        (step_dir / "meta" / "metadata").unlink()
    return int(step_dir.name)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(small_dataset, tmp_path, capfd):
    run_dir = tmp_path / "run"
    cfg8 = config(
        small_dataset,
        run_dir=str(run_dir),
        train={"steps": 8, "log_every": 1, "eval_batches": 1},
        checkpoint={"every": 4},
    )
    run(cfg8)
    original = train_lines(run_dir)
    for how in ("truncate", "delete"):
        assert _corrupt_latest(run_dir, how) == 8
        run(cfg8)
        err = capfd.readouterr().err
        assert f"checkpoint {run_dir / 'checkpoints' / '8'} is unreadable" in err
        assert f"resuming from {run_dir / 'checkpoints' / '4'}" in err
        assert train_lines(run_dir) == original  # steps 5..8 again, bit for bit
    assert len(list((run_dir / "checkpoints" / "corrupt").iterdir())) == 2
    assert checkpoint.committed_steps(run_dir / "checkpoints") == [4, 8]

    # restore onto another mesh and device count: saved with fsdp 8, read with data 4 on 4 devices
    cfg4 = run_config_from_dict({**to_dict(cfg8), "mesh": {"data": 4, "fsdp": 1, "tensor": 1}})
    mesh4 = make_mesh(cfg4.mesh, jax.devices()[:4])
    _graphdef, abstract, _shardings = abstract_state(cfg4, mesh4)
    ckpt = checkpoint.Checkpointer(run_dir / "checkpoints", cfg4.checkpoint)
    restored = ckpt.restore_latest(
        {
            "params": abstract.params,
            "opt_state": abstract.opt_state,
            "counters": abstract.counters(),
        }
    )
    ckpt.close()
    assert restored.step == 8
    leaves = jax.tree.leaves(restored.params)
    assert all(leaf.sharding.mesh.devices.size == 4 for leaf in leaves)
    assert_bitwise_equal([np.asarray(x) for x in leaves], final_params(run_dir))

    # weights only: init_from a run folder, and the HF export of the same weights
    out = tmp_path / "hf"
    assert (
        subprocess.run(
            [sys.executable, str(REPO / "tools" / "convert_hf.py"), str(run_dir), str(out)],
            capture_output=True,
            timeout=300,
        ).returncode
        == 0
    )
    for source in (run_dir, out):
        cfg = run_config_from_dict({**to_dict(cfg8), "init_from": str(source)})
        params = _initial_params(cfg, abstract_state(cfg, make_mesh(cfg.mesh))[1].params)
        assert_bitwise_equal(
            [np.asarray(x) for x in jax.tree.leaves(params)], final_params(run_dir)
        )
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 258, (2, 32)))
    np.testing.assert_allclose(
        mpt_jax.from_pretrained(run_dir)(ids), mpt_jax.from_pretrained(out)(ids), atol=1e-6
    )
    # an HF folder into a run whose layers are scanned (the large presets'): the same weights,
    # stacked, and so the same logits but for the scan's rounding (the dropout of training and,
    # with ALiBi, the context length may differ)
    model = {**to_dict(cfg8)["model"], "scan_layers": True, "resid_pdrop": 0.1}
    model["max_seq_len"] = 64  # ALiBi: a longer context from the same weights
    scanned = run_config_from_dict({**to_dict(cfg8), "model": model, "init_from": str(out)})
    graphdef, abstract = abstract_state(scanned, make_mesh(scanned.mesh))[:2]
    stacked = nnx.merge(graphdef, _initial_params(scanned, abstract.params))
    np.testing.assert_allclose(stacked(ids), mpt_jax.from_pretrained(out)(ids), atol=1e-5)

    # bad input: another model's checkpoint, a foreign folder
    other = {**to_dict(cfg8), "model": {**TINY_MODEL, "d_model": 32}, "init_from": str(run_dir)}
    cfg_other = run_config_from_dict(other)
    abstract_other = abstract_state(cfg_other, make_mesh(cfg_other.mesh))[1].params
    with pytest.raises(ConfigError, match=r"holds a different model \(d_model"):
        _initial_params(cfg_other, abstract_other)
    (tmp_path / "foreign").mkdir()
    cfg_foreign = run_config_from_dict({**other, "init_from": str(tmp_path / "foreign")})
    with pytest.raises(ConfigError, match="neither a run folder"):
        _initial_params(cfg_foreign, abstract_other)
    copied = tmp_path / "copied"
    shutil.copytree(run_dir / "checkpoints", copied / "checkpoints")
    other_run = {**other, "init_from": None, "run_dir": str(copied)}
    with pytest.raises(ConfigError, match=r"checkpoint step 8: written for a different config"):
        run(run_config_from_dict(other_run))
    # the checkpoint alone refuses what config.yaml would: precision, schedule, data order
    same_model = {**to_dict(cfg8), "run_dir": str(copied)}
    for section, change, key in [
        ("train", {"precision": "pure_bf16"}, "train.precision"),
        ("schedule", {"alpha_f": 0.5}, "schedule.alpha_f"),
        ("data", {"shuffle": False}, "data.shuffle"),
    ]:
        changed = {**same_model, section: {**same_model[section], **change}}
        with pytest.raises(ConfigError, match=rf"step 8: written for a different config \({key}"):
            run(run_config_from_dict(changed))
    assert sorted(p.name for p in copied.iterdir()) == ["checkpoints"]  # refused before a write


# ---------------------------------------------------------------------------------------------
# Real processes: SIGTERM, SIGKILL under the supervisor, a hang, a full disk

ONE_DEVICE = {**os.environ, "XLA_FLAGS": xla_flags(1)}


def write_config(tmp_path, small_dataset, run_dir, *, mesh=None, saves=None, **train):
    return helpers.write_config(
        tmp_path / f"{Path(run_dir).name}.yaml",
        small_dataset,
        schedule={"t_warmup": "100ba"},
        train={"eval_batches": 1, "log_every": 1, **train},
        checkpoint=saves or {"every": 3},
        run_dir=str(run_dir),
        **({} if mesh is None else {"mesh": mesh}),
    )


def trainer(cfg_path, *extra, env=ONE_DEVICE, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "mpt_jax", "train", str(cfg_path), *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def children(pid):
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def newest_save(checkpoints):
    """The highest step with a folder, finished or still being written (a tmp name)."""
    if not checkpoints.is_dir():
        return -1
    steps = [int(p.name.split(".")[0]) for p in checkpoints.iterdir() if p.name[0].isdigit()]
    return max(steps, default=-1)


def test_sigterm_and_ten_sigkills_under_the_supervisor(small_dataset, tmp_path):
    steps = 90
    # saves change nothing a run computes: the reference saves only its final state
    only_final = {"every": None, "every_minutes": None}
    reference = write_config(
        tmp_path, small_dataset, tmp_path / "ref", steps=steps, saves=only_final
    )
    result = subprocess.run(
        [sys.executable, "-m", "mpt_jax", "train", str(reference)],
        env=ONE_DEVICE,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]

    cfg = write_config(tmp_path, small_dataset, tmp_path / "faulty", steps=steps)
    checkpoints = tmp_path / "faulty" / "checkpoints"
    # preemption: SIGTERM finishes the step in flight, saves synchronously, exits 0
    proc = trainer(cfg)
    while newest_save(checkpoints) < 3 and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped by SIGTERM at step" in out and "finishing the step in flight" in err
    stopped_at = int(out.split("stopped by SIGTERM at step ")[1].split(":")[0])
    assert stopped_at in checkpoint.committed_steps(checkpoints)

    # ten SIGKILLs at random moments (some during async saves); the supervisor restarts each time
    rng = random.Random(0)
    supervisor = trainer(cfg, "--max-restarts", "20", "--restart-backoff", "0")
    kills = 0
    while kills < 10:
        seen = newest_save(checkpoints)
        while newest_save(checkpoints) <= seen and supervisor.poll() is None:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.05))
        victims = children(supervisor.pid)
        assert supervisor.poll() is None, "the run finished before ten kills"
        if victims:
            os.kill(victims[0], signal.SIGKILL)
            kills += 1
            while victims[0] in children(supervisor.pid):
                time.sleep(0.005)
    out, err = supervisor.communicate(timeout=600)
    assert supervisor.returncode == 0, err[-3000:]
    records = [
        json.loads(x) for x in (tmp_path / "faulty" / "restarts.jsonl").read_text().splitlines()
    ]
    assert len(records) == 10 and all(r["failure"] == "killed by SIGKILL" for r in records)
    assert err.count("resuming from") == 11  # the first attempt resumes the SIGTERM checkpoint
    assert_bitwise_equal(final_params(tmp_path / "faulty"), final_params(tmp_path / "ref"))
    assert train_lines(tmp_path / "faulty") == train_lines(tmp_path / "ref")
    # TensorBoard shows each step once too: what a killed attempt logged past its checkpoint
    # is hidden (the resumed attempt's SessionLog START)
    shown = [helpers.tensorboard_scalars(tmp_path / r / "tensorboard") for r in ("faulty", "ref")]
    assert shown[0]["loss"] == shown[1]["loss"] and len(shown[1]["loss"]) == steps


def test_fault_drill_specs_parse_or_are_refused():
    from mpt_jax.resilience import InjectedFaults

    faults = InjectedFaults("nan@5-7, hang@12,sigterm@9,nan@20,spike@3-4")
    assert faults.nan_batches == {5, 6, 7, 20} and faults.hang_step == 12
    assert faults.spike_batches == {3, 4} and faults.scrambles(4) and not faults.scrambles(5)
    assert faults.sigterm_step == 9 and InjectedFaults("").nan_batches == set()
    for spec, message in (
        ("nan@7-5", "'nan@7-5' is an empty range"),
        ("hang@3-9", r"cannot parse 'hang@3-9' \(hang@N\)"),
        ("hang@3,hang@8", "hang is given twice"),
        ("oops@1", "unknown fault 'oops@1'"),
        ("nan@x", r"cannot parse 'nan@x' \(nan@A-B or nan@A\)"),
        ("spike@2-1", "'spike@2-1' is an empty range"),
    ):
        with pytest.raises(ConfigError, match=rf"MPT_JAX_FAULTS: .*{message}"):
            InjectedFaults(spec)


SUPERVISED = """
import sys
from mpt_jax.supervisor import supervise
child = {"stubborn": "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
         "print('up', flush=True); time.sleep(120)",
         "crash": "print('up', flush=True); raise SystemExit(1)",
         # prints each signal it gets, exits 0 a second after the first (a save's time)
         "saving": "import signal, time; seen = []; "
         "[signal.signal(s, lambda n, f: seen.append(signal.Signals(n).name)) "
         "for s in (signal.SIGINT, signal.SIGTERM)]; print('up', flush=True); "
         "exec('while not seen: time.sleep(0.01)'); time.sleep(1); print(*seen, flush=True)",
         }[sys.argv[1]]
code = supervise(["-c", child], run_dir=sys.argv[2], max_restarts=3, backoff_s=60,
                 stop_grace_s=1.0, launcher=[sys.executable])
print("returned", code, flush=True)
"""


@pytest.mark.parametrize("child, code", [("stubborn", 137), ("crash", 143)])
def test_supervisor_stops_promptly(tmp_path, child, code):
    # a child that ignores SIGTERM is killed after the grace period; a SIGTERM during the
    # 60 s wait before a restart ends the wait at once
    proc = subprocess.Popen(
        [sys.executable, "-c", SUPERVISED, child, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "up"
    time.sleep(0.5)  # the crash is seen and the wait begins; the stubborn child runs on
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert time.monotonic() - started < 10, err
    assert f"returned {code}" in out, out + err


def test_a_terminals_ctrl_c_reaches_the_supervised_trainer_once_as_an_interrupt(tmp_path):
    # Ctrl-C signals the terminal's whole process group: the child gets the SIGINT itself, and
    # the supervisor passes on a SIGTERM, not a second SIGINT (which would interrupt the save)
    proc = subprocess.Popen(
        [sys.executable, "-c", SUPERVISED, "saving", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout.readline().strip() == "up"
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert out.splitlines() == ["SIGINT SIGTERM", "returned 0"], out + err


def test_supervisor_passes_overwrite_until_an_attempt_has_set_up_the_run(tmp_path):
    from mpt_jax.supervisor import supervise

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("old run\n")
    calls = tmp_path / "calls"
    # attempt 1 dies in --overwrite's deletion, having removed config.yaml only (as a failed
    # rmtree can); attempt 2 writes config.yaml anew, then crashes
    child = (
        "import sys, pathlib; calls = pathlib.Path(sys.argv[1]); "
        "config = pathlib.Path(sys.argv[2]) / 'config.yaml'; "
        "calls.open('a').write(' '.join(sys.argv[2:]) + '\\n'); "
        "n = len(calls.read_text().splitlines()); "
        "n == 1 and config.unlink(); n == 2 and config.write_text('new run\\n'); "
        "raise SystemExit(0 if n == 3 else 1)"
    )
    code = supervise(
        ["-c", child, str(calls), str(run_dir)],
        run_dir=run_dir,
        max_restarts=3,
        backoff_s=0,
        first_extra=["--overwrite"],
        launcher=[sys.executable],
    )
    assert code == 0
    attempts = calls.read_text().splitlines()
    assert [a.endswith("--overwrite") for a in attempts] == [True, True, False]


@pytest.mark.parametrize("disarm, code", [(False, 75), (True, 0)])
def test_a_disarmed_watchdog_waits_for_the_next_heartbeat(disarm, code):
    script = (
        "import time\nfrom mpt_jax.resilience import Watchdog\n"
        f"dog = Watchdog(0.2)\ndog.heartbeat()\nif {disarm}: dog.disarm()\ntime.sleep(1.0)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert done.returncode == code, done.stderr[-500:]


def test_watchdog_exits_on_a_hang_and_the_supervisor_gives_up(small_dataset, tmp_path):
    cfg = write_config(tmp_path, small_dataset, tmp_path / "hung", steps=20, watchdog_minutes=0.05)
    env = {**ONE_DEVICE, "MPT_JAX_FAULTS": "hang@4"}
    proc = trainer(cfg, "--max-restarts", "1", "--restart-backoff", "0", env=env)
    _out, err = proc.communicate(timeout=600)
    assert proc.returncode == 75
    assert err.count("watchdog: no training step completed") == 2
    assert "in before_step" in err  # the hung thread's stack was dumped
    assert "giving up after 1 restarts" in err
    # both attempts in the run log, each with its stacks
    log = (tmp_path / "hung" / "logs" / "process_0.log").read_text()
    assert log.count(" start: pid ") == 2
    assert log.count("watchdog: no training step completed") == 2
    assert log.count("in before_step") == 2
    records = [
        json.loads(x) for x in (tmp_path / "hung" / "restarts.jsonl").read_text().splitlines()
    ]
    assert [r["action"] for r in records] == ["restart in 0.0 s", "gave up"]
    assert records[0]["failure"] == "exit code 75"


def test_watchdog_watches_a_start_before_its_first_step(small_dataset, tmp_path):
    # a restore stuck at a barrier or a first batch that never comes hangs before any step
    cfg = write_config(tmp_path, small_dataset, tmp_path / "hung", steps=5, watchdog_minutes=0.05)
    proc = trainer(cfg, env={**ONE_DEVICE, "MPT_JAX_FAULTS": "hang@0"})
    _out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-2000:]
    assert "hanging before step 0" in err and "watchdog: no training step completed" in err


def test_error_line_keeps_tensorstores_cause_and_drops_its_spec():
    # the shape of the error a full disk gave (CI, 2026-12-06): the cause, then the spec being
    # opened (here shortened; a kilobyte or more), then the OS error code
    spec = json.dumps({"driver": "zarr", "kvstore": {"path": "/x/" * 200}, "dtype": "float32"})
    text = (
        'OUT_OF_RANGE: Error opening "zarr" driver: Error writing "1.mu.blocks.1.ffn.down_proj'
        '.kernel.value/.zarray" in OCDBT database at local file "/tmp/run/checkpoints/6.orbax-'
        'checkpoint-tmp/opt_state/d/b5b55fecc96e15f5": Failed to write 57328 bytes to file 40: '
        f"File too large [tensorstore_spec='{spec}'] [os_error_code='27']\nsecond line"
    )
    line = checkpoint._error_line(ValueError(text))
    assert "File too large" in line and line.endswith("[os_error_code='27']")
    assert "tensorstore_spec" not in line and "second line" not in line
    assert line.startswith("OUT_OF_RANGE: Error opening") and len(line) <= 300
    # a truncated file read: two specs, the cause after both
    read = (
        f"DATA_LOSS: Error reading \"params\" [tensorstore_spec='{spec}'] "
        f"[tensorstore_spec[1]='{spec}'] Requested byte range [0, 895) is not valid for value "
        "of size 10"
    )
    line = checkpoint._error_line(ValueError(read))
    assert "tensorstore_spec" not in line and line.endswith("not valid for value of size 10")
    assert checkpoint._error_line(OSError()) == "OSError"


def test_disk_full_during_a_save_keeps_earlier_checkpoints(small_dataset, tmp_path):
    import resource

    cfg = write_config(tmp_path, small_dataset, tmp_path / "full", steps=4)
    assert trainer(cfg).wait(timeout=600) == 0
    cfg = write_config(tmp_path, small_dataset, tmp_path / "full", steps=8)

    def small_disk():  # files may not grow past 64 KiB, as on a disk that is full
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    proc = trainer(cfg, preexec_fn=small_disk)
    _out, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "saving the checkpoint failed" in last, err[-2000:]
    assert "File too large" in last, err[-2000:]
    assert "the earlier checkpoints (steps 3, 4) are intact" in last, err[-2000:]
    assert trainer(cfg).wait(timeout=600) == 0  # with room again, it resumes and finishes
    assert checkpoint.committed_steps(tmp_path / "full" / "checkpoints")[-1] == 8


TWO_PROCESS_TRAINER = """
import os, sys
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
jax.config.update("jax_num_cpu_devices", 2)
pid, port = int(sys.argv[1]), sys.argv[2]
jax.distributed.initialize(f"127.0.0.1:{port}", 2, pid, initialization_timeout=120)
from mpt_jax.train import load_and_run
final = load_and_run(sys.argv[3], [])
print(f"preempted={final.get('preempted')} step={final['step']}", flush=True)
"""


def test_two_processes_agree_on_the_preemption_step_and_on_a_readable_checkpoint(
    small_dataset, tmp_path
):
    import socket

    script = tmp_path / "trainer.py"
    script.write_text(TWO_PROCESS_TRAINER)
    # parameters sharded over both processes' devices
    mesh = {"data": 1, "fsdp": 4, "dcn_fsdp": 2}
    cfg = write_config(tmp_path, small_dataset, tmp_path / "mp", mesh=mesh, steps=40)
    env = {**ONE_DEVICE, "XLA_FLAGS": xla_flags()}  # its devices come from the script

    def launch():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return [
            subprocess.Popen(
                [sys.executable, str(script), str(i), str(port), str(cfg)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(2)
        ]

    procs = launch()
    metrics = tmp_path / "mp" / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        assert all(p.poll() is None for p in procs), procs[0].communicate()[1][-2000:]
        time.sleep(0.01)
    # only one process gets the notice, a Ctrl-C (passed on as the SIGTERM the others hear of)
    procs[1].send_signal(signal.SIGINT)
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[1][1][-2000:]
    assert "SIGINT received: passing it on as SIGTERM" in outs[1][1]
    steps = {out.split("step=")[-1].strip() for out, _ in outs}
    assert all("preempted=SIGTERM" in out for out, _ in outs) and len(steps) == 1
    stopped = int(steps.pop())
    checkpoints = tmp_path / "mp" / "checkpoints"
    assert 5 <= stopped < 40 and stopped in checkpoint.committed_steps(checkpoints)

    # that checkpoint's largest shard file of process 1 is damaged: process 0 alone could read
    # the step, and would train on alone; both fall back to the previous checkpoint instead
    shards = (checkpoints / str(stopped) / "params" / "ocdbt.process_1" / "d").iterdir()
    damaged = max(shards, key=lambda p: p.stat().st_size)
    damaged.write_bytes(damaged.read_bytes()[:1000])
    previous = max(s for s in checkpoint.committed_steps(checkpoints) if s < stopped)
    outs = [p.communicate(timeout=300) for p in launch()]  # both resume and finish
    assert all("preempted=None step=40" in out for out, _ in outs), outs[0][1][-2000:]
    unreadable = f"checkpoint {checkpoints / str(stopped)} is unreadable ("
    assert f"process 1: {unreadable}" in outs[1][1], outs[1][1][-2000:]
    assert f"process 0: {unreadable}process 1 could not read it)" in outs[0][1]
    assert f"resuming from {checkpoints / str(previous)}" in outs[0][1]  # process 0 says it
    assert [p.name.split("-")[0] for p in (checkpoints / "corrupt").iterdir()] == [str(stopped)]
