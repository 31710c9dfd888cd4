"""Sweeps: expansion and validation of sweep files, device groups, the SLURM array, and a real
sweep (trainer and eval processes) that is preempted, resumed, reported and skipped."""

import csv
import importlib.util
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import write_config

from mpt_jax.config import ConfigError, parse_value
from mpt_jax.sweep import report, runner
from mpt_jax.sweep.spec import SEED_KEY, load_sweep, override_text

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
SWEEP_TOOL = ROOT / "tools" / "sweep.py"


def write_base(tmp_path: Path, data: Path) -> Path:
    return write_config(
        tmp_path / "base.yaml",
        tmp_path,
        data={"path": str(data)},
        train={"steps": 40, "log_every": 1},
        checkpoint={"every": 10},
        run_dir=str(tmp_path / "unused"),
    )


def write_sweep(tmp_path: Path, name: str = "sweep.yaml", **spec) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"base": "base.yaml", **spec}))
    return path


def test_grid_zip_members_and_seeds_expand_to_their_product(tmp_path):
    write_base(tmp_path, tmp_path / "ds")
    path = write_sweep(
        tmp_path,
        overrides={"train": {"steps": 4}},
        grid={"optim.lr": [1e-3, 3e-3]},
        zip={"model.alibi": [True, False], "model.learned_pos_emb": [False, True]},
        members=[{"name": "wide", "model.d_model": 128}, {"model.n_layers": 3}],
        seeds=[1, 2],
    )
    sweep = load_sweep(path, tmp_path / "out")
    assert len(sweep.members) == 2 * 2 * 2 * 2
    assert sweep.axes[:3] == ("optim.lr", "model.alibi", "model.learned_pos_emb")
    assert sweep.axes[-1] == SEED_KEY
    names = [m.name for m in sweep.members]
    assert len(set(names)) == len(names)
    seen = set()
    for m in sweep.members:
        cfg = m.config
        assert cfg["train"]["steps"] == 4  # common override
        assert cfg["optim"]["lr"] == m.params["optim.lr"]
        assert cfg["model"]["alibi"] is not cfg["model"]["learned_pos_emb"]  # zipped, not crossed
        assert cfg["train"]["seed"] == m.params[SEED_KEY]
        assert cfg["run_dir"] == str(m.run_dir) and m.run_dir.parent == tmp_path / "out" / "runs"
        wide = "wide" in m.name.split(",")
        assert cfg["model"]["d_model"] == (128 if wide else 64)
        assert cfg["model"]["n_layers"] == (2 if wide else 3)
        seen.add((m.params["optim.lr"], cfg["model"]["alibi"], wide, cfg["train"]["seed"]))
    assert len(seen) == 16


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"grid": {"optim.lrr": [1e-3]}}, r"'optim\.lrr' is not a config key"),
        ({"grid": {"model.d_modle": [64]}}, r"'model\.d_modle' is not a config key"),
        ({"grid": {"optim.lr.x": [1]}}, r"'optim\.lr\.x' is not a config key"),
        ({"grid": {"optim.lr": []}}, r"grid axis 'optim\.lr': the list of values is empty"),
        ({"grid": {"optim.lr": 0.1}}, r"grid axis 'optim\.lr': expected a list"),
        ({}, r"the sweep has no axes"),
        ({"grid": {}, "seeds": [1]}, r"grid: empty \(no axes\)"),
        ({"grids": {"optim.lr": [1]}}, r"unknown key 'grids'"),
        (
            {"zip": {"optim.lr": [1e-3, 2e-3], "train.seed": [1]}},
            r"zip: lists must have the same length \(optim\.lr has 2, train\.seed has 1\)",
        ),
        ({"members": [{"optim.lr": 1e-3}, {"optim.lr": 1e-3}]}, r"two members have the same"),
        ({"grid": {"optim.lr": ["fast"]}}, r"sweep member lr=fast: .*optim\.lr"),
        ({"grid": {"run_dir": ["a"]}}, r"run_dir is set per member"),
        ({"seeds": [1.5]}, r"seeds: expected a list of integers"),
        ({"grid": {"train.seed": [1]}, "seeds": [2]}, r"train\.seed is also swept"),
        ({"seeds": [1], "eval": {"tasks": "missing.yaml"}}, r"eval\.tasks: .*does not exist"),
        ({"seeds": [1, 2], "reference": "seed=3"}, r"reference: no member is named 'seed=3'"),
        # YAML reads an unquoted 1e-3 as 0.001: the folder would not be named as written
        ({"members": [{"name": 1e-3, "optim.lr": 1e-3}]}, r"members\[0\]\.name: 0\.001 is not a"),
        ({"seeds": [1], "reference": 1e-3}, r"reference: 0\.001 is not a string; quote the"),
        ({"members": [{"name": 8, "optim.lr": 1e-3}]}, r"members\[0\]\.name: 8 is not a string"),
        ({"members": [{"name": True, "optim.lr": 1e-3}]}, r"\.name: True is not a string; quote"),
        (
            {"grid": {"optim": {"lr": [1e-3, 2e-3]}, "optim.lr": [5e-3]}},
            r"grid: 'optim\.lr' is given twice \(nested and dotted\)",
        ),
        (
            {"grid": {"data.path": ["/data/" + "x" * 250, "/data/y"]}},
            r"member path=_data_xxx.*: its name \(\d+ bytes\) is too long for its log file's",
        ),
    ],
)
def test_bad_sweep_files_give_one_line_naming_the_fault(tmp_path, spec, message):
    write_base(tmp_path, tmp_path / "ds")
    with pytest.raises(ConfigError, match=message) as info:
        load_sweep(write_sweep(tmp_path, **spec))
    assert "\n" not in str(info.value)


def test_bad_sweep_file_exits_2_with_one_line(tmp_path):
    write_base(tmp_path, tmp_path / "ds")
    path = write_sweep(tmp_path, grid={"optim.betass": [[0.9, 0.95]]})
    result = subprocess.run(
        [sys.executable, str(SWEEP_TOOL), str(path), "--list"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "'optim.betass' is not a config key" in result.stderr


@pytest.mark.parametrize("value", [1e-3, 3, True, None, [0.9, 0.95], "1e-3", "cosine", "true"])
def test_override_text_reads_back_as_the_value(value):
    key, _, text = override_text("k", value).partition("=")
    assert key == "k" and parse_value(text) == value and type(parse_value(text)) is type(value)


def test_device_groups_are_disjoint_and_equal(monkeypatch):
    groups = runner.device_groups(2, gpus=[0, 1, 2, 3, 4])
    assert [g.ids for g in groups] == [(0, 1), (2, 3)]
    assert groups[1].env() == {"CUDA_VISIBLE_DEVICES": "2,3"}
    with pytest.raises(ConfigError, match=r"--parallel: 3 members at once need at least 3 gpu"):
        runner.device_groups(3, gpus=[0, 1])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPUs: CPU cores are shared out
    cores = sorted(os.sched_getaffinity(0))
    groups = runner.device_groups(len(cores))
    assert {c for g in groups for c in g.ids} == set(cores) and all(g.kind == "cpu" for g in groups)
    assert runner.device_groups(1)[0].kind == "all"


def test_seed_means_and_best_member_in_the_markdown(tmp_path):
    write_base(tmp_path, tmp_path / "ds")
    sweep = load_sweep(write_sweep(tmp_path, grid={"optim.lr": [1e-3, 1e-2]}, seeds=[1, 2, 3]))
    losses = [3.0, 3.2, 3.7, 2.0, 2.5, 2.6]
    rows = [
        {"member": m.name, **m.params, "status": "finished", "val_loss": loss}
        for m, loss in zip(sweep.members, losses, strict=True)
    ]
    text = report.markdown(sweep, report.columns(sweep, rows), rows)
    assert "| **2** |" in text  # the lowest validation loss
    low, high = losses[:3], losses[3:]
    assert f"| 0.001 | 3 | {statistics.mean(low):.4g} ± {statistics.stdev(low):.4g} |" in text
    assert f"| 0.01 | 3 | {statistics.mean(high):.4g} ± {statistics.stdev(high):.4g} |" in text
    logs = {m.name: report.read_log(m) for m in sweep.members}  # no run folders: empty logs
    paths = report.plot(sweep, rows, logs, tmp_path / "plots")  # no curves, no error
    assert [p.name for p in paths] == ["loss_curves.png", "metrics_vs_optim_lr.png"]
    assert all(p.read_bytes()[:8] == PNG for p in paths)


def compiling_steps(run_dir: Path) -> set[int]:
    """The logged steps without a throughput rate: the first of each start."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    return {r["step"] for r in rows if "loss" in r and r["tokens_per_s"] is None}


def _run_tool(*args, env=None, check_rc=0):
    result = subprocess.run(
        [sys.executable, str(SWEEP_TOOL), *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )
    assert result.returncode == check_rc, result.stdout + result.stderr
    return result.stdout


def test_sweep_preempted_on_slurm_resumes_locally_reports_and_skips(tmp_path, small_dataset):
    """One member runs through the SLURM array script and is preempted (it requeues itself);
    the local runner then resumes it and trains the other beside it on its own CPU core, both
    are evaluated on an ICL task, and a third run skips both."""
    write_base(tmp_path, small_dataset / "ds")
    task_rows = [{"context": f"def f{i}(x", "continuation": "):"} for i in range(6)]
    (tmp_path / "lm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in task_rows))
    tasks = {
        "icl_tasks": [
            {
                "label": "close_paren",
                "dataset_uri": str(tmp_path / "lm.jsonl"),
                "num_fewshot": [0],
                "icl_task_type": "language_modeling",
            }
        ]
    }
    (tmp_path / "tasks.yaml").write_text(yaml.safe_dump(tasks))
    path = write_sweep(  # seeds only: the members share one compiled step (faster test)
        tmp_path,
        out_dir="out",
        seeds=[1, 2],
        eval={"tasks": "tasks.yaml", "batch_size": 8},
        reference="seed=1",
    )
    out = tmp_path / "out"
    sweep = load_sweep(path, out)
    first, second = sweep.members

    printed = _run_tool(path, "--out-dir", out, "--slurm", "--gpus-per-member", "0")
    assert f"then collect: python tools/sweep.py {path} --out-dir {out} --report-only" in printed
    lines = (out / "commands.txt").read_text().splitlines()
    assert len(lines) == 2 and "train.seed=1" in lines[0] and "train.seed=2" in lines[1]
    sbatch = (out / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0,1\n" in sbatch and "--gpus-per-task" not in sbatch  # a CPU array

    # array task 0 on a "cluster": scontrol is a stub that records the requeue
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "requeued"}\n')
    (stub / "scontrol").chmod(0o755)
    python_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "PATH": f"{stub}:{python_dir}:{os.environ['PATH']}",
        "SLURM_ARRAY_TASK_ID": "0",
        "SLURM_ARRAY_JOB_ID": "77",
        "MPT_JAX_FAULTS": "sigterm@3",  # the trainer is preempted after step 3
    }
    done = subprocess.run(
        ["bash", str(out / "sweep.sbatch")], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "requeued").read_text().split() == ["requeue", "77_0"]
    assert not (first.run_dir / "complete.json").exists()
    assert any((first.run_dir / "checkpoints").iterdir())
    assert not runner.eval_path(first).exists()  # not evaluated before the end

    # the local runner on 2 CPU cores, stopped by SIGTERM once the second member is training
    sweep_proc = subprocess.Popen(
        [sys.executable, str(SWEEP_TOOL), str(path), "--out-dir", str(out), "--parallel", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    logged = second.run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (logged.exists() and logged.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    sweep_proc.send_signal(signal.SIGTERM)
    text, _ = sweep_proc.communicate(timeout=300)
    assert sweep_proc.returncode == 1, text
    assert "2 members, 0 finished (skipped), 2 to run, 2 at once" in text
    assert "SIGTERM: stopping" in text and "run the same command again to resume" in text
    assert not (second.run_dir / "complete.json").exists()
    assert any((second.run_dir / "checkpoints").iterdir())  # saved on the way out

    text = _run_tool(path, "--out-dir", out, "--parallel", "2")
    for member in sweep.members:
        assert "resuming from" in (out / "logs" / f"{member.name}.train.log").read_text()
    with open(out / "results.csv") as f:
        rows = {r["member"]: r for r in csv.DictReader(f)}
    assert set(rows) == {first.name, second.name}
    for member in sweep.members:
        row = rows[member.name]
        assert row["status"] == "finished" and row["steps"] == "40"
        logged = [json.loads(line) for line in (member.run_dir / "metrics.jsonl").open()]
        train = [r["loss"] for r in logged if "loss" in r]
        assert [r["step"] for r in logged if "loss" in r] == list(range(1, 41))  # no gap
        assert float(row["train_loss"]) == train[-1]
        assert float(row["best_train_loss"]) == min(train)
        assert float(row["val_loss"]) == [r["val_loss"] for r in logged if "val_loss" in r][-1]
        assert 0.0 <= float(row["icl/close_paren/0-shot"]) <= 1.0
        # each start's first step compiles: no rate, and the median leaves it out
        log = (out / "logs" / f"{member.name}.train.log").read_text()
        resumed = {int(n) for n in re.findall(r"resuming from \S+/checkpoints/(\d+)", log)}
        compiling = compiling_steps(member.run_dir)
        assert 1 in compiling and compiling <= {1} | {n + 1 for n in resumed}, (compiling, resumed)
        rates = [r["tokens_per_s"] for r in logged if r.get("tokens_per_s") is not None]
        assert float(row["tokens_per_s"]) == pytest.approx(statistics.median(rates), rel=1e-6)
    assert len(compiling_steps(first.run_dir)) >= 2  # preempted on the "cluster", resumed
    reference = {
        r["step"]: r["loss"]
        for r in map(json.loads, first.run_dir.joinpath("metrics.jsonl").open())
        if "loss" in r
    }
    other = [json.loads(line) for line in (second.run_dir / "metrics.jsonl").open()]
    diffs = [abs(r["loss"] - reference[r["step"]]) for r in other if "loss" in r]
    assert float(rows[first.name]["loss_diff_max"]) == 0.0
    assert float(rows[second.name]["loss_diff_max"]) == max(diffs) > 0  # seeds differ
    assert float(rows[second.name]["loss_diff_last"]) == diffs[-1]
    results_md = (out / "results.md").read_text()
    assert first.name in results_md and "![loss_curves](loss_curves.png)" in results_md
    assert (out / "loss_curves.png").read_bytes()[:8] == PNG

    again = _run_tool(path, "--out-dir", out)
    assert "2 members, 2 finished (skipped), 0 to run" in again
    assert "training on" not in again


@pytest.mark.parametrize(
    "path", sorted((ROOT / "experiments" / "sweeps").glob("*.yaml")), ids=lambda p: p.stem
)
def test_shipped_sweeps_validate(path, tmp_path):
    sweep = load_sweep(path, tmp_path)
    assert len(sweep.members) >= 2 and len({m.name for m in sweep.members}) == len(sweep.members)


def test_loss_deviation_over_common_steps_and_nan_is_worst(tmp_path):
    from mpt_jax.metrics import MetricsLogger

    write_base(tmp_path, tmp_path / "ds")
    (member,) = load_sweep(write_sweep(tmp_path, seeds=[1]), tmp_path / "out").members
    with MetricsLogger(member.run_dir, tensorboard=False) as logger:  # the trainer's logger
        for step, loss in ((1, 3.0), (2, 2.5), (3, math.nan), (4, 2.0)):
            logger.log(step, {"loss": loss})
    ours = report.curves(report.read_log(member))["loss"]
    assert ours[:2] == [(1, 3.0), (2, 2.5)] and math.isnan(ours[2][1]) and ours[3] == (4, 2.0)
    reference = [(1, 3.5), (2, 2.0), (3, 2.2), (4, 2.25)]
    assert report.loss_deviation(ours, reference)["loss_diff_max"] == math.inf
    out = report.loss_deviation(ours[:2] + ours[3:], reference[:3])  # step 4: not in both
    assert out == {"loss_diff_max": 0.5, "loss_diff_last": 0.5}


def test_a_diverged_member_reports_and_plots(tmp_path):
    from mpt_jax.metrics import MetricsLogger

    write_base(tmp_path, tmp_path / "ds")
    sweep = load_sweep(write_sweep(tmp_path, grid={"optim.lr": [1e-3, 1.0]}), tmp_path / "out")
    for member, last in zip(sweep.members, (2.0, math.inf), strict=True):
        with MetricsLogger(member.run_dir, tensorboard=False) as logger:
            for step, loss in ((1, 3.0), (2, 2.5), (3, last)):
                logger.log(step, {"loss": loss})
    rows = [
        {"member": m.name, **report.member_metrics(sweep, m, report.read_log(m))}
        for m in sweep.members
    ]
    # the last logged loss, infinite included; the best one is still the best finite one
    assert rows[0]["train_loss"] == 2.0 and rows[1]["train_loss"] == math.inf
    assert rows[1]["best_train_loss"] == 2.5
    logs = {m.name: report.read_log(m) for m in sweep.members}
    paths = report.plot(sweep, rows, logs, tmp_path / "plots")  # an infinite loss: no error
    assert paths[0].name == "loss_curves.png" and paths[0].read_bytes()[:8] == PNG


def test_named_members_keep_their_names_and_slurm_redoes_changed_ones(tmp_path):
    write_base(tmp_path, tmp_path / "ds")
    members = [{"name": "baseline"}, {"name": "hot", "optim.lr": 1e-2}]
    sweep = load_sweep(write_sweep(tmp_path, members=members, seeds=[1, 2]), tmp_path / "out")
    assert [m.name for m in sweep.members][:2] == ["baseline,seed=1", "baseline,seed=2"]
    # a member finished under an older sweep file (its folder holds another config)
    member = sweep.members[0]
    (member.run_dir / "checkpoints" / "5").mkdir(parents=True)  # something to resume from
    (member.run_dir / "config.yaml").write_text(yaml.safe_dump({**member.config, "old": 1}))
    (member.run_dir / "complete.json").write_text("{}")
    _, sbatch, todo = runner.write_slurm(sweep, runner.SlurmOptions())
    assert todo == [0, 1, 2, 3] and not (member.run_dir / "complete.json").exists()
    # set aside, not deleted: the trainer may refuse the change, and the old results stay
    assert (member.run_dir / "complete.json.before-sweep-change").read_text() == "{}"
    assert (tmp_path / "out" / "logs").is_dir()  # SLURM writes --output there, it makes no folder
    assert f"#SBATCH --output={tmp_path / 'out'}/logs/" in sbatch.read_text()
    # run locally, the member's stale results are set aside too, before the trainer runs
    runner.eval_path(member).write_text('{"icl": []}')
    (member.run_dir / "complete.json").write_text('{"step": 5}')
    local = runner.LocalRunner(sweep, runner.device_groups(1, []), log=lambda line: None)
    status = local.run([member])
    assert status[member.name].startswith("failed"), status
    assert not runner.eval_path(member).exists()
    kept = runner.eval_path(member).with_name(f"{runner.EVAL_FILE}.before-sweep-change")
    assert kept.read_text() == '{"icl": []}'
    assert not (member.run_dir / "complete.json").exists()
    assert (member.run_dir / "complete.json.before-sweep-change").read_text() == '{"step": 5}'


def test_a_changed_member_without_checkpoints_is_refused_not_trained_anew(tmp_path):
    write_base(tmp_path, tmp_path / "ds")
    sweep = load_sweep(write_sweep(tmp_path, grid={"optim.lr": [1e-3, 2e-3]}), tmp_path / "out")
    member = sweep.members[0]
    member.run_dir.mkdir(parents=True)
    # finished with checkpoint.enabled false under an older sweep file (fewer steps)
    saved = {**member.config, "train": {**member.config["train"], "steps": 3}}
    (member.run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    (member.run_dir / "complete.json").write_text('{"step": 3}')
    (member.run_dir / "metrics.jsonl").write_text('{"step": 3, "loss": 2.0}\n')
    with pytest.raises(ConfigError, match=rf"member {member.name}: its config changed and its "):
        runner.write_slurm(sweep, runner.SlurmOptions())
    lines = []
    local = runner.LocalRunner(sweep, runner.device_groups(1, []), log=lines.append)
    status = local.run([member])
    assert status[member.name].startswith("failed: its config changed") and "saved no" in lines[0]
    assert not any("training on" in line for line in lines)  # the trainer never started
    assert (member.run_dir / "complete.json").read_text() == '{"step": 3}'  # its results stay
    assert (member.run_dir / "metrics.jsonl").read_text() == '{"step": 3, "loss": 2.0}\n'


def test_a_member_that_breaks_its_worker_fails_and_the_others_still_run(tmp_path, monkeypatch):
    write_base(tmp_path, tmp_path / "ds")
    sweep = load_sweep(write_sweep(tmp_path, grid={"optim.lr": [1e-3, 2e-3]}), tmp_path / "out")
    first, second = sweep.members

    def run_member(self, member, group):
        if member is first:
            raise OSError(36, "File name too long")
        return "finished"

    monkeypatch.setattr(runner.LocalRunner, "_run_member", run_member)
    local = runner.LocalRunner(sweep, runner.device_groups(1, []), log=lambda line: None)
    status = local.run(sweep.members)
    assert status == {first.name: "failed: [Errno 36] File name too long", second.name: "finished"}


def test_seed_cells_say_how_many_seeds_logged_the_metric(tmp_path):
    write_base(tmp_path, tmp_path / "ds")
    sweep = load_sweep(write_sweep(tmp_path, seeds=[1, 2, 3]), tmp_path / "out")
    values = [0.5, None, 0.75]  # the second seed stopped before any evaluation
    rows = [
        {"member": m.name, **m.params, "status": "finished", "val_loss": v, "train_loss": 1.0}
        for m, v in zip(sweep.members, values, strict=True)
    ]
    text = report.markdown(sweep, report.columns(sweep, rows), rows)
    assert f"| 3 | 0.625 ± {statistics.stdev([0.5, 0.75]):.4g} (n=2) | 1 ± 0 |" in text
    rows[2]["val_loss"] = None
    assert "| 3 | 0.5 (n=1) | 1 ± 0 |" in report.markdown(sweep, report.columns(sweep, rows), rows)


def test_a_member_finished_before_a_config_field_existed_stays_finished(tmp_path):
    write_base(tmp_path, tmp_path / "ds")
    sweep = load_sweep(write_sweep(tmp_path, grid={"optim.lr": [1e-3, 2e-3]}), tmp_path / "out")
    member = sweep.members[0]
    member.run_dir.mkdir(parents=True)
    # its config.yaml, written before train.mixed_precision existed: the default by omission
    saved = {**member.config, "train": dict(member.config["train"])}
    del saved["train"]["mixed_precision"]
    (member.run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    (member.run_dir / "complete.json").write_text("{}")
    assert runner.is_finished(sweep, member)
    _, _, todo = runner.write_slurm(sweep, runner.SlurmOptions())
    assert todo == [1] and (member.run_dir / "complete.json").read_text() == "{}"


def test_visible_gpus_reads_indices_not_lines(tmp_path, monkeypatch):
    smi = tmp_path / "nvidia-smi"
    smi.write_text(
        "#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: GPU-a)'\n"
        "echo '  MIG 3g.40gb Device 0: (UUID: MIG-b)'\necho 'GPU 1: NVIDIA H100 (UUID: GPU-c)'\n"
    )
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert runner.visible_gpus() == [0, 1]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,-1,3")  # as CUDA: up to the first invalid
    assert runner.visible_gpus() == [0, 1]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")  # no GPU: CPU cores are shared out
    assert runner.visible_gpus() == [] and runner.device_groups(2)[0].kind == "cpu"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-a,GPU-c")
    with pytest.raises(ConfigError, match=r"CUDA_VISIBLE_DEVICES='GPU-a,GPU-c': --parallel"):
        runner.device_groups(2)


def _sweep_tool_main(argv, capsys) -> tuple[int, list[str]]:
    """tools/sweep.py in this process (no interpreter start): its exit status and stderr lines."""
    spec = importlib.util.spec_from_file_location("sweep_tool", SWEEP_TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    capsys.readouterr()
    code = tool.main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--gpus-per-member", "-1"], "--gpus-per-member: must be >= 0, got -1"),
        (["--cpus-per-member", "0"], "--cpus-per-member: must be >= 1, got 0"),
        (["--max-concurrent", "0"], "--max-concurrent: must be >= 1, got 0"),
        (["--time", "banana"], "--time: 'banana' is not a SLURM time (minutes, MM:SS,"),
        (["--time", "1:2:3:4"], "--time: '1:2:3:4' is not a SLURM time"),
        (["--time", "-5"], "--time: '-5' is not a SLURM time"),
        # the local runner's flags would be ignored: SLURM places the tasks
        (["--parallel", "4"], "--parallel: only for a local run; with --slurm use --max-conc"),
        (["--gpus", "0,1"], "--gpus: only for a local run; with --slurm use --max-conc"),
    ],
)
def test_slurm_flags_out_of_range_are_one_line_and_write_nothing(tmp_path, capsys, flags, message):
    write_base(tmp_path, tmp_path / "ds")
    path = write_sweep(tmp_path, grid={"optim.lr": [1e-3, 2e-3]})
    out = tmp_path / "out"
    code, err = _sweep_tool_main([path, "--slurm", "--out-dir", out, *flags], capsys)
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_slurm_time_takes_the_formats_sbatch_reads_only(tmp_path):
    write_base(tmp_path, tmp_path / "ds")
    sweep = load_sweep(write_sweep(tmp_path, seeds=[1]), tmp_path / "out")
    for time_limit in ["90", "30:00", "24:00:00", "2-0", "1-12:30", "1-00:00:00"]:
        _, sbatch, _ = runner.write_slurm(sweep, runner.SlurmOptions(time=time_limit))
        assert f"#SBATCH --time={time_limit}\n" in sbatch.read_text()
    for time_limit in ["1h", "1:2:3:4", "1-2-3", "1:", ""]:
        with pytest.raises(ConfigError, match=f"--time: '{time_limit}' is not a SLURM time"):
            runner.SlurmOptions(time=time_limit)


def test_out_dir_under_a_file_is_one_line_naming_where_it_was_given(tmp_path, capsys):
    write_base(tmp_path, tmp_path / "ds")
    path = write_sweep(tmp_path, grid={"optim.lr": [1e-3, 2e-3]})
    (tmp_path / "file").write_text("")
    reason = f"{tmp_path / 'file'} is a file, not a folder"
    for mode in ([], ["--slurm"], ["--report-only"]):
        code, err = _sweep_tool_main([path, *mode, "--out-dir", tmp_path / "file" / "x"], capsys)
        assert code == 2 and err == [f"error: --out-dir: {reason}"]
    in_file = write_sweep(tmp_path, "in_file.yaml", seeds=[1], out_dir=str(tmp_path / "file" / "x"))
    code, err = _sweep_tool_main([in_file, "--report-only"], capsys)
    assert code == 2 and err == [f"error: {in_file}: out_dir: {reason}"]
    assert _sweep_tool_main([in_file, "--list"], capsys)[0] == 0  # --list writes nothing
