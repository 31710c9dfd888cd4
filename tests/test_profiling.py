"""mpt_jax.profiling and tools/profile_summary.py: a real CPU trace, a GPU-shaped one, bad input."""

import csv
import gzip
import importlib.util
import io
import json
import math
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from mpt_jax import profiling
from mpt_jax.profiling import format_summary, summarize_trace

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location(
    "profile_summary", REPO / "tools" / "profile_summary.py"
)
profile_summary = importlib.util.module_from_spec(_spec)
sys.modules["profile_summary"] = profile_summary
_spec.loader.exec_module(profile_summary)


def _table(text: str, header: str) -> list[list[str]]:
    """The rows of the Markdown table whose header starts with `header` (separator dropped)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header} |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


# ---------------------------------------------------------------------------------------------
# A real trace on CPU


def test_real_cpu_trace(tmp_path):
    @jax.jit
    def f(a, b):
        return jnp.tanh(a @ b).sum()

    a = jnp.ones((128, 128))
    f(a, a).block_until_ready()  # compiled before the trace
    with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
        for _ in range(3):
            f(a, a).block_until_ready()

    summary = summarize_trace(tmp_path, steps=3)
    assert summary.host_fallback and summary.processes == ("/host:CPU",)
    assert summary.lines and all(line.startswith("tf_XLA") for line in summary.lines)
    assert 0 < summary.busy_us <= summary.span_us <= summary.window_us
    assert summary.kernel_us > 0
    assert math.isclose(sum(c.share for c in summary.categories), 1.0, rel_tol=1e-9)
    assert {c.name for c in summary.categories} == set(profiling.CATEGORY_NAMES)

    # the top names are the ops XLA CPU ran (on its own threads, not the python thread)
    events = profiling.load_events(summary.trace_file)
    threads = {
        (e["pid"], e["tid"]): e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "thread_name"
    }
    on_xla = [
        e
        for e in events
        if e.get("ph") == "X" and threads.get((e["pid"], e["tid"]), "").startswith("tf_XLA")
    ]
    top = summary.top[0]
    mine = [e for e in on_xla if e["name"] == top.name]
    assert math.isclose(top.time_us, sum(e["dur"] for e in mine), rel_tol=1e-9)
    assert top.count == len(mine) and top.count % 3 == 0  # once (or k times) per call
    assert {k.name for k in summary.top} <= {e["name"] for e in on_xla}
    assert math.isclose(sum(k.time_us for k in summary.top), summary.kernel_us, rel_tol=1e-9)

    text = format_summary(summary)
    assert "no device process in the trace: host process `/host:CPU` used" in text
    assert "over 3 steps" in text and "ms per step" in text
    categories = _table(text, "category")
    assert len(categories) == len(profiling.CATEGORY_NAMES)
    assert sum(float(row[2].rstrip("%")) for row in categories) == pytest.approx(100, abs=0.5)
    assert _table(text, "name")[0][0] == top.name


# ---------------------------------------------------------------------------------------------
# A GPU-shaped trace (the layout jax.profiler writes for a GPU: CUPTI stream lines plus the lines
# derived from them, which repeat the same time)


def _meta(pid, name, tid=None):
    event = {"ph": "M", "pid": pid, "name": "thread_name" if tid else "process_name"}
    return (
        {**event, "tid": tid, "args": {"name": name}} if tid else {**event, "args": {"name": name}}
    )


def _x(pid, tid, name, ts, dur):
    return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts, "dur": dur}


GPU_STEP = [  # (line, name, start within the step, duration), microseconds
    (1, "mpt_flash_fwd", 0, 100),
    (1, "nvjet_tst_128x256_64x4_2x1_v_bz_gemm", 100, 300),
    (1, "loop_add_fusion", 400, 50),
    (2, "ncclDevKernel_AllReduce_Sum_f32_RING_LL", 200, 250),  # concurrent with the gemm
    (2, "MemcpyD2D", 500, 20),
]


@pytest.mark.parametrize(
    ("name", "category"),
    [
        ("mpt_flash_dkdv", "attention"),
        ("mpt_norm_bwd", "fused elementwise / reductions"),  # our norm kernels are memory-bound
        ("nvjet_tst_128x256_64x4_2x1_v_bz_gemm", "matmul"),
        ("some_kernel_we_never_named", "other"),
    ],
)
def test_kernel_names_fall_in_their_categories(name, category):
    assert profiling.categorize(name) == category


def _write_gpu_trace(
    folder: Path, *, streams: bool = True, name: str = profiling.TRACE_NAME
) -> Path:
    host, gpu = 7, 3
    events = [
        _meta(host, "/host:CPU"),
        _meta(host, "python", tid=10),
        _meta(gpu, "/device:GPU:0 NVIDIA H100 80GB HBM3"),
        _meta(gpu, "XLA Modules", tid=50),
        _meta(gpu, "XLA Ops", tid=51),
        _meta(gpu, "Steps", tid=52),
    ]
    if streams:
        events += [_meta(gpu, "Stream #13(Kernel)", tid=1)]
        events += [_meta(gpu, "Stream #20(Kernel,MemcpyD2D)", tid=2)]
    for step in range(2):
        o = 1000.0 * step
        if streams:
            events += [_x(gpu, line, name, o + ts, dur) for line, name, ts, dur in GPU_STEP]
        # host work and the derived lines: never counted while stream lines exist
        events += [_x(host, 10, "PjitFunction(step)", o - 50, 900)]
        events += [_x(host, 10, "loop_add_fusion", o, 5000)]
        events += [_x(gpu, 50, "jit_step", o, 520), _x(gpu, 52, "step", o, 520)]
        events += [_x(gpu, 51, "while.1", o, 500), _x(gpu, 51, "fusion.1", o + 100, 300)]
        events += [_x(gpu, 51, "dot.1", o + 100, 100)]  # nested in fusion.1 (in while.1)
    path = folder / "plugins" / "profile" / "2026_01_01_00_00_00" / name
    path.parent.mkdir(parents=True)
    with gzip.open(path, "wt") as f:
        json.dump({"displayTimeUnit": "ns", "traceEvents": events}, f)
    return path


def test_gpu_shaped_trace_counts_the_stream_lines_once(tmp_path):
    _write_gpu_trace(tmp_path)
    s = summarize_trace(tmp_path, steps=2, top=3)
    assert not s.host_fallback and s.n_devices == 1
    assert s.processes == ("/device:GPU:0 NVIDIA H100 80GB HBM3",)
    assert s.lines == ("Stream #13(Kernel)", "Stream #20(Kernel,MemcpyD2D)")
    assert s.kernel_us == 2 * 720
    assert s.busy_us == 2 * 470  # [0, 450] and [500, 520] per step
    assert s.span_us == 1520  # first kernel start .. last kernel end
    assert s.window_us == 6050  # -50 .. 6000: the host's events included
    times = {c.name: (c.time_us, c.share, c.count) for c in s.categories}
    assert times == {
        "matmul": (600, 300 / 720, 2),
        "collectives": (500, 250 / 720, 2),
        "attention": (200, 100 / 720, 2),
        "fused elementwise / reductions": (100, 50 / 720, 2),
        "memory copies": (40, 20 / 720, 2),
        "other": (0, 0, 0),
    }
    assert [c.name for c in s.categories][:3] == ["matmul", "collectives", "attention"]
    assert [(k.name, k.time_us, k.count) for k in s.top] == [
        ("nvjet_tst_128x256_64x4_2x1_v_bz_gemm", 600, 2),
        ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", 500, 2),
        ("mpt_flash_fwd", 200, 2),
    ]
    assert s.n_names == 5

    text = format_summary(s)
    assert "device process: `/device:GPU:0 NVIDIA H100 80GB HBM3`" in text
    assert "Busy 0.47 ms of a 0.76 ms span per step (61.8% busy, 38.2% idle)" in text
    assert "kernel time 0.72 ms per step" in text
    assert _table(text, "category")[0] == ["matmul", "0.3", "41.7%", "1"]
    assert _table(text, "name") == [
        ["nvjet_tst_128x256_64x4_2x1_v_bz_gemm", "matmul", "0.3", "41.7%", "1"],
        ["ncclDevKernel_AllReduce_Sum_f32_RING_LL", "collectives", "0.25", "34.7%", "1"],
        ["mpt_flash_fwd", "attention", "0.1", "13.9%", "1"],
    ]
    whole = format_summary(summarize_trace(tmp_path))  # no steps: totals
    assert "| matmul | 0.6 | 41.7% | 2 |" in whole and "ms in total" in whole


def test_without_stream_lines_the_xla_ops_line_counts_self_time(tmp_path):
    _write_gpu_trace(tmp_path, streams=False)
    s = summarize_trace(tmp_path, steps=2)
    assert s.lines == ("XLA Ops",)
    top = {k.name: k.time_us for k in s.top}
    # while.1 [0, 500] holds fusion.1 [100, 400], which holds dot.1 [100, 200]
    assert top == {"while.1": 2 * 200, "fusion.1": 2 * 200, "dot.1": 2 * 100}
    assert s.kernel_us == s.busy_us == 2 * 500


def test_several_devices_are_averaged(tmp_path):
    path = _write_gpu_trace(tmp_path)
    with gzip.open(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    second = [  # GPU:1 ran the first step only
        {**e, "pid": 4} for e in events if e.get("pid") == 3 and (e["ph"] == "M" or e["ts"] < 1000)
    ]
    second[0] = {**second[0], "args": {"name": "/device:GPU:1 NVIDIA H100 80GB HBM3"}}
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events + second}, f)
    s = summarize_trace(tmp_path, steps=2)
    assert s.n_devices == 2 and s.processes[1].startswith("/device:GPU:1")
    assert s.kernel_us == (2 * 720 + 720) / 2 and s.busy_us == (2 * 470 + 470) / 2
    assert {k.name: k.count for k in s.top}["mpt_flash_fwd"] == 1.5
    assert "2 device processes" in format_summary(s)


def test_trace_viewer_json_is_read_without_a_perfetto_file(tmp_path):
    """Traces taken without create_perfetto_trace=True still have <host>.trace.json.gz."""
    path = _write_gpu_trace(tmp_path, name="vm.trace.json.gz")
    s = summarize_trace(tmp_path, steps=2)
    assert s.trace_file == path and s.kernel_us == 2 * 720


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_is_one_line(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))) as info:
        summarize_trace(tmp_path)
    assert "\n" not in str(info.value)

    bad = tmp_path / "run" / profiling.TRACE_NAME
    bad.parent.mkdir()
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=re.escape(str(bad))) as info:
        summarize_trace(tmp_path / "run")
    assert "\n" not in str(info.value)
    with gzip.open(bad, "wt") as f:
        f.write('{"traceEvents": [')  # cut short
    with pytest.raises(ValueError, match="not a readable gzip JSON trace"):
        summarize_trace(tmp_path / "run")

    assert profile_summary.main([str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}:") and err.count("\n") == 1
    assert profile_summary.main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'missing'}: no such folder") and err.count("\n") == 1


def test_cli_prints_the_tables(tmp_path, capsys):
    _write_gpu_trace(tmp_path)
    assert profile_summary.main([str(tmp_path), "--steps", "2", "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert out == format_summary(summarize_trace(tmp_path, steps=2, top=2))
    assert len(_table(out, "name")) == 2
    with pytest.raises(SystemExit) as info:
        profile_summary.main([str(tmp_path), "--steps", "0"])
    assert info.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def _ncu_report(launches: list[tuple[str, dict[str, tuple[str, str]]]]) -> str:
    """Text as `ncu --csv --page details` prints it: the program's and ncu's lines, then CSV."""
    columns = ["ID", "Process ID", "Process Name", "Host Name", "Kernel Name", "Context", "Stream"]
    columns += ["Block Size", "Grid Size", "Device", "CC", "Section Name", "Metric Name"]
    columns += ["Metric Unit", "Metric Value"]
    out = io.StringIO()
    out.write("==PROF== Connected to process 4242 (/usr/bin/python3)\n")
    out.write("device: NVIDIA H200, jax 0.11.2\n")  # the profiled program's own output
    writer = csv.writer(out, quoting=csv.QUOTE_ALL, lineterminator="\n")
    writer.writerow(columns)
    for launch_id, (kernel, metrics) in enumerate(launches):
        for metric, (unit, value) in metrics.items():
            where = [launch_id, 4242, "python3", "127.0.0.1", kernel, 1, 7, "(256, 1, 1)"]
            section = ["(16, 16, 8)", 0, "9.0", "GPU Speed Of Light Throughput"]
            writer.writerow([*where, *section, metric, unit, value])
    out.write("==PROF== Disconnected from process 4242\n")
    return out.getvalue()


def test_ncu_report_gives_one_row_per_kernel_from_its_last_launch(tmp_path, capsys):
    fwd = "mpt_flash_fwd"
    sdpa = "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x128x128"
    text = _ncu_report(
        [
            (fwd, {"Duration": ("us", "701.31"), "Registers Per Thread": ("", "255")}),
            (sdpa, {"Duration": ("us", "470.02"), "Achieved Occupancy": ("%", "11.93")}),
            (fwd, {"Duration": ("us", "596.80"), "Registers Per Thread": ("", "1,024")}),
        ]
    )
    table = profiling.summarize_ncu_csv(text)
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    assert header == [
        "kernel",
        "launches",
        "Duration",
        "Registers Per Thread",
        "Achieved Occupancy",
    ]
    rows = _table(table, "kernel")
    assert rows[0] == ["mpt_flash_fwd", "2", "596.80 us", "1,024", ""]
    assert rows[1][0].startswith("cudnn_generated_fort_native_sdpa") and rows[1][0].endswith("...")
    assert rows[1][1:] == ["1", "470.02 us", "", "11.93 %"]
    assert len(rows) == 2
    report = tmp_path / "ncu.csv"
    report.write_text(text)
    assert profile_summary.main(["--ncu", str(report)]) == 0
    assert capsys.readouterr().out == table
    report.write_text("==PROF== Connected\nno report: the kernel filter matched nothing\n")
    assert profile_summary.main(["--ncu", str(report)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no ncu CSV in the text") and err.count("\n") == 1
    with pytest.raises(SystemExit):
        profile_summary.main([])  # neither a trace folder nor --ncu
    assert capsys.readouterr().err.startswith("error: give TRACE_DIR or --ncu FILE")
