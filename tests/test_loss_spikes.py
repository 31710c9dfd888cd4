"""Loss spikes: the monitor's rules, and a spike drill that rolls back, stops or resumes."""

import json
import math
import random
import shutil
import sys

import helpers
import jax
import numpy as np
import pytest
from helpers import config
from test_checkpoint import assert_bitwise_equal, final_params, train_lines

import mpt_jax
from mpt_jax import checkpoint
from mpt_jax.cli import main
from mpt_jax.config import ConfigError, LossSpikeConfig, run_config_from_dict
from mpt_jax.loss_spikes import (
    LOSS_SPIKE_EXIT_CODE,
    LossSpikeError,
    LossSpikeMonitor,
    window_size,
)
from mpt_jax.supervisor import supervise
from mpt_jax.train import run


def events(monitor, losses, first_step=1):
    found = [monitor.observe(step, x) for step, x in enumerate(losses, first_step)]
    return [(e.kind, e.first_step, e.step) for e in found if e is not None]


def test_window_defaults_to_five_percent_of_the_run_but_at_least_100():
    assert window_size(LossSpikeConfig(), 1000) == 100
    assert window_size(LossSpikeConfig(), 4000) == 200
    assert window_size(LossSpikeConfig(window=7), 4000) == 7


def test_patience_plus_one_outliers_in_a_row_are_one_spike():
    monitor = LossSpikeMonitor(LossSpikeConfig(window=10, patience=2), total_steps=100)
    flat = [2.0] * 10
    # two outliers (>= 2 x the mean 2.0) then a normal loss: the streak starts over
    assert events(monitor, [*flat, 4.0, 5.0, 3.0]) == []
    assert monitor.streak == 0
    monitor = LossSpikeMonitor(LossSpikeConfig(window=10, patience=2), total_steps=100)
    # the third outlier in a row is the spike, reported once however long it lasts; a
    # non-finite loss (a skipped update) neither enters the window nor breaks the streak
    # (each outlier enters the window and raises the mean for the next)
    found = events(monitor, [*flat, 6.0, math.nan, 7.0, 8.0, 9.0, 2.0])
    assert found == [("loss_spike", 11, 14)]
    event = LossSpikeMonitor(LossSpikeConfig(window=10, patience=0), 100)
    for step, x in enumerate(flat, 1):
        event.observe(step, x)
    spike = event.observe(11, 5.0)
    assert (spike.running_mean, spike.threshold, spike.count) == (2.0, 4.0, 1)
    assert "steps 11..11 were a loss spike: loss at least 2 x the mean" in spike.describe()
    # just below the threshold is not an outlier
    monitor = LossSpikeMonitor(LossSpikeConfig(window=10, patience=0), 100)
    assert events(monitor, [*flat, np.nextafter(4.0, 0)]) == []


def test_high_losses_need_two_windows_and_half_the_window_above_the_cap():
    cfg = LossSpikeConfig(window=4, patience=100)
    monitor = LossSpikeMonitor(cfg, total_steps=100)
    # the cap: the first window's highest loss (9.0), no more than 10
    assert events(monitor, [5.0, 9.0, 6.0, 7.0]) == [] and monitor.loss_cap == 9.0
    # step 7 has half the window above 9.0 but comes before step 2 x 4; step 8 starts the stretch
    # (each step is judged on the window before it, as llm-foundry does)
    assert events(monitor, [9.5, 9.6, 9.7, 9.8, 9.9, 3.0, 3.0, 3.0, 9.5, 9.5, 9.5], 5) == [
        ("high_loss", 8, 8),
        ("high_loss", 15, 15),  # after the stretch ended (step 13: one of four above) again
    ]
    assert LossSpikeMonitor(LossSpikeConfig(window=2), 10).observe(1, 50.0) is None
    capped = LossSpikeMonitor(LossSpikeConfig(window=2), 10)
    events(capped, [50.0, 40.0])
    assert capped.loss_cap == 10.0  # llm-foundry's ceiling
    assert LossSpikeMonitor(LossSpikeConfig(window=2, loss_cap=3.5), 10).loss_cap == 3.5


def test_a_restored_monitor_decides_as_the_uninterrupted_one():
    rng = random.Random(5)
    losses = [rng.uniform(1.5, 2.5) for _ in range(100)]
    losses[30:36] = [rng.uniform(5, 6) for _ in range(6)]  # a spike
    losses[50] = math.nan
    losses[60:80] = [rng.uniform(5, 6) for _ in range(20)]  # a spike, then high losses
    cfg = LossSpikeConfig(window=20, patience=3, outlier_multiplier=1.8, loss_cap=4.0)
    whole = events(LossSpikeMonitor(cfg, 100), losses)
    assert whole == [("loss_spike", 31, 34), ("loss_spike", 61, 64), ("high_loss", 71, 71)]
    for cut in range(len(losses)):
        first = LossSpikeMonitor(cfg, 100)
        before = events(first, losses[:cut])
        second = LossSpikeMonitor(cfg, 100)
        # as a checkpoint's meta holds it
        second.restore(json.loads(json.dumps(first.state())), cut)
        assert before + events(second, losses[cut:], cut + 1) == whole
    # a window made smaller on resume keeps the newest losses
    monitor = LossSpikeMonitor(LossSpikeConfig(window=3), 60)
    monitor.restore({"losses": [1.0, 2.0, 3.0, 4.0, 5.0]}, 5)
    assert list(monitor.losses) == [3.0, 4.0, 5.0] and monitor.loss_cap == 5.0
    # a checkpoint from before the monitor: an empty window; past step 0 the first window is
    # gone, and a cap from a later one would sit just above a plateau: the ceiling instead
    monitor.restore(None, 5000)
    assert list(monitor.losses) == [] and monitor.streak == 0 and monitor.loss_cap == 10.0
    monitor.restore(None, 0)
    assert monitor.loss_cap is None


def test_a_patience_lowered_on_resume_still_catches_the_open_streak():
    cfg = LossSpikeConfig(window=10, patience=4)
    monitor = LossSpikeMonitor(cfg, 100)
    assert events(monitor, [2.0] * 10 + [9.0, 9.5, 9.9]) == []  # three outliers: no spike yet
    lowered = LossSpikeMonitor(LossSpikeConfig(window=10, patience=1), 100)
    lowered.restore(monitor.state(), 13)
    assert events(lowered, [10.0, 10.5], 14) == [("loss_spike", 11, 14)]  # once
    raised = LossSpikeMonitor(LossSpikeConfig(window=10, patience=1), 100)
    raised.restore(lowered.state(), 15)
    assert events(raised, [11.0], 16) == []  # reported already


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("action", "kill", "must be one of 'off' | 'log' | 'stop' | 'rollback'"),
        ("outlier_multiplier", 1.0, "must be > 1"),
        ("patience", -1, "must be >= 0"),
        ("window", 0, "must be >= 1"),
        ("loss_cap", 0, "must be > 0"),
        ("windows", 5, "unknown key"),
    ],
)
def test_bad_loss_spike_settings_are_refused(small_dataset, field, value, message):
    raw = helpers.raw_config(small_dataset, train={"loss_spike": {field: value}})
    with pytest.raises(ConfigError, match=rf"train\.loss_spike\.{field}: {message}"):
        run_config_from_dict(raw)


# a tiny run learns to about 1.8 by step 27; the drill's batches of random tokens give about 7
SPIKE = "spike@27-31"  # data batches 27..31: steps 28..32, across the checkpoint of step 30


def spike_sections(action):
    return dict(
        train={
            "steps": 40,
            "log_every": 1,
            "eval_batches": 1,
            "loss_spike": {"action": action, "window": 20, "outlier_multiplier": 1.5},
            "export_hf_every": 10,
        },
        checkpoint={"every": 5},
    )


def test_a_spike_rolls_back_before_it_and_resumes_as_the_uninterrupted_run(
    small_dataset, tmp_path, monkeypatch, capfd
):
    monkeypatch.setenv("MPT_JAX_FAULTS", SPIKE)
    whole = tmp_path / "whole"
    run(config(small_dataset, run_dir=str(whole), **spike_sections("rollback")))
    err = capfd.readouterr().err
    assert "steps 28..32 were a loss spike: 5 losses in a row at least 1.5 x the mean" in err
    # the save due at step 30 waited, the streak being open: no checkpoint holds the spike;
    # waiting, each step's loss is read at once, so nothing past step 32 was handed out
    assert "rolled back to step 25, skipping 7 data batches (25..31); rollback 1 of 3" in err
    lines = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [x["loss_spike_from_step"] for x in lines if "loss_spike_from_step" in x] == [28]
    assert [x["rollback_to_step"] for x in lines if "rollback_to_step" in x] == [25]
    meta = checkpoint.read_meta(whole / "checkpoints" / "30")
    assert meta["data"]["batches"] == 37 and meta["rollbacks"] == 1
    assert max(loss for step, (loss, _, _) in train_lines(whole).items() if step > 25) < 3.0
    assert not list((whole / "checkpoints").glob("discarded-*"))
    # the HF export of step 30, written inside the spike, was deleted and written again
    exports = sorted(p.name for p in (whole / "hf-steps").iterdir())
    assert exports == ["ba10", "ba20", "ba30", "ba40"]
    assert_bitwise_equal(hf_params(whole / "hf-steps" / "ba30"), final_params(whole, step=30))

    # the same run, only logging spikes, stopped by SIGTERM inside the spike: it saves step 30,
    # three outliers in (with stop or rollback it would not save inside an open streak)
    cut = tmp_path / "cut"
    monkeypatch.setenv("MPT_JAX_FAULTS", f"{SPIKE},sigterm@29")
    stopped = run(config(small_dataset, run_dir=str(cut), **spike_sections("log")))
    assert stopped["step"] == 30 and stopped["checkpoint_saved"]
    assert checkpoint.read_meta(cut / "checkpoints" / "30")["loss_spike"]["streak"] == 3
    # resumed with rollbacks and stopped again at step 31: the streak is open, nothing is saved
    monkeypatch.setenv("MPT_JAX_FAULTS", f"{SPIKE},sigterm@30")
    stopped = run(config(small_dataset, run_dir=str(cut), **spike_sections("rollback")))
    assert stopped["step"] == 31 and not stopped["checkpoint_saved"]
    assert "a loss streak is open" in stopped["not_saved"]
    # told to stop at a spike, the resumed run exits 3 and leaves its checkpoints as they were
    monkeypatch.setenv("MPT_JAX_FAULTS", SPIKE)
    path = helpers.write_config(
        tmp_path / "stop.yaml", small_dataset, run_dir=str(cut), **spike_sections("stop")
    )
    capfd.readouterr()
    assert main(["train", str(path)]) == LOSS_SPIKE_EXIT_CODE
    err = capfd.readouterr().err
    assert "error: steps 28..32 were a loss spike" in err
    assert "train.loss_spike.action=rollback" in err
    assert checkpoint.committed_steps(cut / "checkpoints") == [20, 25, 30]
    # resumed with rollbacks, it deletes the checkpoint of step 30 (three of the spike's
    # updates) and ends bit for bit as the uninterrupted run, metrics.jsonl line for line
    run(config(small_dataset, run_dir=str(cut), **spike_sections("rollback")))
    assert "rolled back to step 25, skipping 7 data batches (25..31), deleting the " in (
        capfd.readouterr().err
    )
    assert_bitwise_equal(final_params(cut), final_params(whole))
    assert records(cut) == records(whole)

    # killed after the rollback (checkpoints 35 and 40 and complete.json gone): the resume from
    # the second pass's checkpoint 30 keeps the first pass's lines and the rollback's record
    shutil.rmtree(cut / "checkpoints" / "35")
    shutil.rmtree(cut / "checkpoints" / "40")
    (cut / "complete.json").unlink()
    run(config(small_dataset, run_dir=str(cut), **spike_sections("rollback")))
    assert records(cut) == records(whole)


def hf_params(folder):
    from flax import nnx

    model = mpt_jax.from_pretrained(folder)
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def records(run_dir):
    """metrics.jsonl in order: each line's step and the values that do not depend on timing."""
    keys = ("loss", "val_loss", "loss_spike_from_step", "rollback_to_step", "skipped_steps")
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(x["step"], {k: x[k] for k in keys if k in x}) for x in lines if set(keys) & set(x)]


def test_saves_wait_while_a_streak_is_open(small_dataset, tmp_path, monkeypatch, capfd):
    # a spike over steps 30..34 (the save due at 30 waits: checkpoint.keep 1 still holds 25),
    # then after the rollback a two-outlier blip over steps 30 and 31: the save waits to 32
    monkeypatch.setenv("MPT_JAX_FAULTS", "spike@29-33,spike@38-39")
    sections = spike_sections("rollback")
    sections["checkpoint"] = {"every": 5, "keep": 1}
    run(config(small_dataset, run_dir=str(tmp_path / "run"), **sections))
    assert "rolled back to step 25, skipping 9 data batches (25..33)" in capfd.readouterr().err
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    saved = sorted({int(x["checkpoint_step"]) for x in lines if "checkpoint_step" in x})
    assert saved == [5, 10, 15, 20, 25, 32, 35, 40]


def test_every_rollback_counts_against_max_rollbacks(small_dataset, tmp_path, monkeypatch, capfd):
    # three spikes, each rolled back to the checkpoint of step 25, whose meta counts none
    monkeypatch.setenv("MPT_JAX_FAULTS", "spike@27-31,spike@33-37,spike@41-45")
    sections = spike_sections("rollback")
    sections["train"]["max_rollbacks"] = 2
    with pytest.raises(LossSpikeError, match=r"no rollback left \(train.max_rollbacks 2"):
        run(config(small_dataset, run_dir=str(tmp_path / "run"), **sections))
    err = capfd.readouterr().err
    assert "rollback 1 of 2" in err and "rollback 2 of 2" in err
    # and a rollback needs checkpoints
    with pytest.raises(ConfigError, match="rollback needs checkpoints"):
        config(small_dataset, **{**sections, "checkpoint": {"enabled": False}})


def test_a_spike_that_is_only_logged_trains_on(small_dataset, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("MPT_JAX_FAULTS", SPIKE)
    sections = spike_sections("log")
    sections["checkpoint"] = {"enabled": False}
    final = run(config(small_dataset, run_dir=str(tmp_path / "run"), **sections))
    assert final["step"] == 40
    err = capfd.readouterr().err
    assert "warning: steps 28..32 were a loss spike" in err and "training on" in err
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert sum("loss_spike_from_step" in x for x in lines) == 1
    assert "rollback" not in "".join(lines)


def test_the_supervisor_does_not_restart_a_stop_for_a_loss_spike(tmp_path, capfd):
    calls = tmp_path / "calls"
    child = f"open({str(calls)!r}, 'a').write('x'); raise SystemExit({LOSS_SPIKE_EXIT_CODE})"
    code = supervise(
        ["-c", child], run_dir=tmp_path, max_restarts=3, backoff_s=0, launcher=[sys.executable]
    )
    assert code == LOSS_SPIKE_EXIT_CODE and calls.read_text() == "x"
    # said and recorded like every failure, with what was done about it
    assert "exit code 3 (stopped for a loss spike or a lasting high loss); not restarted" in (
        capfd.readouterr().err
    )
    (record,) = [json.loads(x) for x in (tmp_path / "restarts.jsonl").read_text().splitlines()]
    assert record["failure"] == "exit code 3" and record["action"] == "not restarted"
    # a config refused before its run folder exists: said, and no folder made to record it in
    missing = tmp_path / "never-made"
    code = supervise(
        ["-c", "raise SystemExit(2)"], run_dir=missing, max_restarts=3, launcher=[sys.executable]
    )
    assert code == 2 and not missing.exists()
    assert "(bad config or data); not restarted" in capfd.readouterr().err
