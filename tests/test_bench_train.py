"""tools/bench_train.py: table columns, llm-foundry's MFU/HFU, skipped and non-fitting rows, errors.

Every row that runs uses the same shape (tiny, seq 32, global batch 16, microbatch 8, fp32, full
remat, 1x8x1 mesh), so the compiled step comes from the persistent XLA cache after the first.
"""

import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import jax
import pytest

from mpt_jax.config import ModelConfig
from mpt_jax.metrics import flops_per_sequence

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_train", REPO / "tools" / "bench_train.py")
bench_train = importlib.util.module_from_spec(_spec)
sys.modules["bench_train"] = bench_train
_spec.loader.exec_module(bench_train)

COL = {name: i for i, name in enumerate(bench_train.COLUMNS)}
ROW = [
    "--models=tiny",
    "--seq-lens=32",
    "--microbatch=8",
    "--precision=fp32",
    "--remat=full",
    "--warmup=1",
    "--steps=2",
]


def read(out: Path) -> tuple[list[dict[str, str]], list[list[str]]]:
    """CSV rows as dicts, and the Markdown table's cells (header first, separator dropped)."""
    with open(out / "bench_train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    lines = [line for line in (out / "bench_train.md").read_text().splitlines() if line[:1] == "|"]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return rows, [cells[0], *cells[2:]]


def test_table_rows_columns_and_llm_foundry_mfu(tmp_path, capsys):
    peak_tflops = 0.5
    code = bench_train.main(
        [
            *ROW,
            "--global-batch=16,12",  # 12: the microbatch 8 does not divide it
            "--mesh=data=1,fsdp=-1,tensor=1",
            "--mesh=data=3,fsdp=1,tensor=1",  # 3 devices: not this machine's 8
            f"--peak-tflops={peak_tflops}",
            "--in-process",
            f"--out={tmp_path}",
        ]
    )
    assert code == 0
    rows, md = read(tmp_path)
    assert tuple(md[0]) == bench_train.COLUMNS
    assert tuple(rows[0]) == bench_train.COLUMNS
    assert len(rows) == len(md) - 1 == 4  # 2 batches x 2 meshes
    assert [r["GlobalBatchSize"] for r in rows] == ["16", "16", "12", "12"]
    assert [r["Mesh (data x fsdp x tensor)"] for r in rows] == ["1x8x1", "3x1x1", "1x-1x1", "3x1x1"]
    assert capsys.readouterr().out.count("\n") == 2 + 4  # the Markdown table is printed

    ok, bad_mesh, *indivisible = rows
    assert ok["Status"] == "ok", ok["Status"]
    assert bad_mesh["Status"].startswith("skipped: mesh:") and "8 devices" in bad_mesh["Status"]
    assert all(r["Status"].startswith("skipped: microbatch 8") for r in indivisible)
    assert all(r["GradAccum"] == "" for r in indivisible)
    assert all(r["Device"] == "cpu" and r["# Devices"] == "8" for r in rows)
    assert bad_mesh["MFU"] == "" and md[2][COL["MFU"]] == "-"

    # llm-foundry's formula, recomputed from the table's own throughput
    seq, devices = 32, jax.device_count()
    model = ModelConfig.from_dict({**bench_train.TINY_MODEL, "max_seq_len": seq})
    seqs_per_s = float(ok["Throughput (S/s)"])
    tflops = seqs_per_s * flops_per_sequence(model, seq) / devices / 1e12
    assert math.isclose(float(ok["TFLOP/s/device"]), tflops, rel_tol=1e-4)
    assert math.isclose(float(ok["MFU"]), 100 * tflops / peak_tflops, rel_tol=1e-4)
    assert math.isclose(float(ok["HFU"]) / float(ok["MFU"]), 4 / 3, rel_tol=1e-4)  # full remat
    assert math.isclose(float(ok["Step time (s)"]), 16 / seqs_per_s, rel_tol=1e-4)
    assert math.isclose(float(ok["Throughput (T/s)"]), seqs_per_s * seq, rel_tol=1e-4)
    assert math.isclose(
        float(ok["Throughput (T/s/device)"]), seqs_per_s * seq / devices, rel_tol=1e-4
    )
    # per-device microbatch x accumulation x batch shards = global batch, as llm-foundry
    assert (ok["MicroBatchSize"], ok["GradAccum"]) == ("1", "2")
    assert ok["Sharding Strategy"] == "fsdp (FULL_SHARD)"
    assert ok["Activation Checkpointing"] == "full" and ok["Precision"] == "fp32"
    assert int(ok["NumParams"]) > 0
    assert ok["Peak memory (GiB/device)"].endswith("(est.)")  # CPU: XLA's estimate
    assert not list(tmp_path.glob(".*.tmp*"))  # no temporary left


def test_row_that_cannot_fit_is_reported_not_crashed(tmp_path):
    code = bench_train.main(
        [
            *ROW,
            "--global-batch=16",
            "--device-memory-gib=0.0001",
            "--in-process",
            f"--out={tmp_path}",
        ]
    )
    assert code == 0
    (row,), _ = read(tmp_path)
    assert row["Status"].startswith("does not fit: needs "), row["Status"]
    assert "GiB/device, 0.0001 GiB available" in row["Status"]
    assert row["Throughput (S/s)"] == ""


def test_rows_run_in_subprocesses_by_default(tmp_path):
    """The row process inherits XLA_FLAGS (conftest's 8 host devices) and reports back."""
    assert bench_train.main([*ROW, "--global-batch=16", f"--out={tmp_path}"]) == 0
    (row,), _ = read(tmp_path)
    assert row["Status"] == "ok" and row["# Devices"] == "8"
    assert float(row["Throughput (S/s)"]) > 0 and row["MFU"] == ""  # no CPU peak
    assert row["Peak memory (GiB/device)"].endswith("(est.)")


def test_profile_traces_extra_steps_and_prints_their_summary(tmp_path, capsys):
    """--profile: steps traced after the timed ones, summarized below the table."""
    out, profile = tmp_path / "out", tmp_path / "profile"
    args = [*ROW, "--global-batch=16", "--in-process", f"--out={out}", f"--profile={profile}"]
    args.append("--profile-steps=1")  # the default 3 costs seconds more on CPU
    assert bench_train.main(args) == 0
    (row,), _ = read(out)
    assert row["Status"] == "ok" and float(row["Step time (s)"]) > 0

    label = "tiny_seq32_gb16_mb8_1x-1x1_fp32_full_chunknone"
    assert [p.name for p in profile.iterdir()] == [label]
    summary = (profile / label / "summary.md").read_text()
    assert "over 1 step" in summary and "host process `/host:CPU` used" in summary
    assert "| category | ms per step | share | count |" in summary

    printed = capsys.readouterr().out
    table, _, rest = printed.partition(f"\n## Profile: {label}\n\n")
    assert table.splitlines()[2].startswith("| tiny | 32 |")  # the timed row, then the summary
    assert table.count("\n") == 2 + 1 and rest == summary


def test_a_row_cut_off_while_tracing_keeps_its_timings(monkeypatch):
    """The row process prints its timed result before tracing; a timeout then returns it."""
    timed = {"status": "ok", "step_times": [0.5, 0.5], "profile_error": "cut off"}

    def cut_off_after(printed: str):
        def run(command, **kwargs):
            output = printed.encode()  # TimeoutExpired holds bytes, whatever text= said
            raise bench_train.subprocess.TimeoutExpired(command, kwargs["timeout"], output=output)

        return run

    marker = f"{bench_train._RESULT_MARKER}{json.dumps(timed)}\n"
    monkeypatch.setattr(bench_train.subprocess, "run", cut_off_after(f"compiling\n{marker}"))
    assert bench_train.run_isolated({"aot": False}, timeout=7) == timed
    monkeypatch.setattr(bench_train.subprocess, "run", cut_off_after("compiling\n"))
    assert bench_train.run_isolated({"aot": False}, timeout=7) == {
        "status": "failed: timed out after 7 s"
    }


@pytest.mark.parametrize(
    "args, argument",
    [
        (["--models=mpt-125m,mpt-9b"], "--models: unknown preset 'mpt-9b' (known: tiny, mpt-125m"),
        (["--models=tiny", "--mesh=data=2,fsdp=x"], "--mesh: 'data=2,fsdp=x'"),
        (["--models=tiny", "--mesh=pipeline=2"], "--mesh: 'pipeline=2'"),
        (["--models=tiny", "--seq-lens=0"], "--seq-lens: '0' is not a positive integer"),
        (["--models=tiny", "--precision=fp16"], "--precision: unknown value 'fp16'"),
        (["--models=tiny", "--profile-steps=0"], "--profile-steps: must be >= 1, got 0"),
        (["--models=tiny", "--model-override=n_heads=5"], "--model-override: tiny: model.n_heads"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args, argument, tmp_path, capsys):
    assert bench_train.main([*args, f"--out={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {argument}"), err
    assert err.count("\n") == 1
    assert not list(tmp_path.iterdir())


def test_argparse_errors_are_one_line_too(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_train.main(["--steps=many"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: argument --steps") and err.count("\n") == 1


def test_judge_reads_perf_rows_and_the_anchor_and_gives_a_verdict_each(tmp_path, capsys):
    """--judge over a folder laid out as tools/gpu/perf.sh leaves it, rows written by the tool's
    own CSV writer; the figures are the H200's of 2026-11-28 and two made-up rows."""

    def write_row(name, seq, tokens, mfu, status="ok"):
        row = dict.fromkeys(bench_train.COLUMNS)
        row.update({"SeqLen (T)": seq, "Throughput (T/s)": tokens, "MFU": mfu, "Status": status})
        (tmp_path / name).mkdir()
        (tmp_path / name / "bench_train.csv").write_text(bench_train.to_csv([row]))

    write_row("scan_2048", 2048, 48045.0, 44.06)
    write_row("scan_2048_hopper", 2048, 66000.0, 60.5)
    write_row("scan_8192", 8192, 35088.0, 45.03)
    write_row("unrolled_2048", 2048, None, None, status="failed: out of memory")
    anchor = {"jax_plain_mpt1b": {"tokens_per_s": 48933.0, "batch": 16}}
    (tmp_path / "anchor_jax_plain_mpt1b.json").write_text(json.dumps(anchor))
    assert bench_train.main(["--judge", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "anchor jax_plain_mpt1b: 48,933 tokens/s",
        "target scan_2048 (seq 2048): 48,045 tokens/s; MFU 44.06% (at least 60%: MISSED); "
        "0.98x the anchor (1.3x: MISSED)",
        "target scan_2048_hopper (seq 2048): 66,000 tokens/s; MFU 60.50% (at least 60%: met); "
        "1.35x the anchor (1.3x: met)",
        "target scan_8192 (seq 8192): 35,088 tokens/s; MFU 45.03% (at least 50%: MISSED)",
        "target unrolled_2048: no result (failed: out of memory)",
    ]
    (tmp_path / "anchor_jax_plain_mpt1b.json").unlink()  # the anchor failed: no speedup verdict
    lines = bench_train.judge(tmp_path)
    assert lines[0] == "anchor: none (FileNotFoundError), so no speedup verdict"
    assert "the anchor" not in lines[1] and "MFU 44.06%" in lines[1]
    # a folder mistyped, or without rows, or a table cut short: one line and exit 2, so that
    # perf.sh's report never reads as "no target missed"
    table = tmp_path / "scan_8192" / "bench_train.csv"
    table.write_text(table.read_text().splitlines()[0] + "\n8192,x\n")
    for folder, message in (
        (tmp_path / "nowhere", "nowhere is not a folder: nothing to judge"),
        (tmp_path / "scan_2048", "scan_2048 holds no DIR/*/bench_train.csv: nothing to judge"),
        (tmp_path, "scan_8192/bench_train.csv line 2: "),
    ):
        assert bench_train.main(["--judge", str(folder)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --judge: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize("tool", ["bench_data", "bench_checkpoint"])
def test_the_data_and_checkpoint_benchmarks_refuse_a_workdir_under_a_file(tool, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(tool, REPO / "tools" / f"{tool}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (tmp_path / "notes").write_text("x")
    for workdir in (tmp_path / "notes", tmp_path / "notes" / "bench"):
        assert module.main(["--workdir", str(workdir)]) == 2
        err = capsys.readouterr().err
        assert err == f"error: --workdir: {tmp_path / 'notes'} is a file, not a folder\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]
