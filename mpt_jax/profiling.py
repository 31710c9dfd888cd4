"""Where the time goes: a text summary of a `jax.profiler` Perfetto trace, no TensorBoard needed.

    summary = summarize_trace("runs/x/profile", steps=3)
    print(format_summary(summary))

`jax.profiler.trace(dir, create_perfetto_trace=True)` (also `start_trace(...)`, the trainer's
`train.profile` and `tools/bench_train.py --profile`) writes
`dir/plugins/profile/<time>/perfetto_trace.json.gz`: Chrome trace-event JSON whose processes are
named by metadata events (`ph == "M"`, name `process_name`), e.g. `/device:GPU:0 NVIDIA H100 ...`
and `/host:CPU` (the same JSON as the `<host>.trace.json.gz` beside it, which is read when there
is no Perfetto file), and whose threads ("lines") by `thread_name` events. Timed work is complete
events (`ph == "X"`, `ts` and `dur` in microseconds).

Which events count (the device's own work, each microsecond once):

- Processes: every `/device:GPU:N ...` / `/device:TPU:N ...` process (else any `/device:...`),
  figures averaged over them (per device).
  Without one (a CPU run) the `/host:CPU` process is used, and the summary says so.
- Lines of a GPU process: the CUPTI stream lines (`Stream #N`, `Stream #N(Kernel,MemcpyH2D)`),
  which hold the kernels and copies as they ran. The same process also has lines derived from
  them -- `XLA Ops` (one event per HLO op, spanning its kernels), `XLA Modules` (one per
  program), `Steps`, `Framework Ops` / `TensorFlow Ops`, name scopes, `Source code`,
  `Launch Stats` -- which repeat the same time under other names, and `CUPTI overhead`; those are
  skipped whenever stream lines exist. Without stream lines (TPU) the `XLA Ops` line is used,
  else every line that is not a derived one.
- Lines of the host process (CPU fallback): the XLA runtime's threads (`tf_XLAEigen/<id>`, where
  XLA CPU runs the ops, and `tf_XLAPjRtCpuClient/<id>`, which runs small ops inline), not the
  `python` thread (dispatch, `PjitFunction`). Only events named like HLO instructions count
  (`fusion.3`, `all-reduce.12`, `ynn_fusion`); the runtime's own events are dropped:
  `ThunkExecutor::Execute (wait for completion)` (a client thread waiting for the whole
  program), `CommonPjRtLoadedExecutable::Execute` (dispatch), `ThreadpoolListener::...`,
  `end: <op>` markers, and `Rendezvous` / `Wait: pending_threads=...` inside a collective (which
  so stay the collective's time).
- Nesting: an event's time is its self time (its duration less the events nested in it on the
  same line), so a parent op and its children never count twice.

Figures: `kernel` time is the sum of self times over the chosen lines (over several streams or
CPU threads running at once it can exceed the wall time); `busy` is the union of those events'
intervals (time when at least one chosen line ran something); `span` is from the first chosen
event's start to the last one's end, so `1 - busy / span` is the share of the traced window in
which the device sat idle (waiting for the host, for data, for a collective on another line...).
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
import re
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

TRACE_NAME = "perfetto_trace.json.gz"
FALLBACK_PATTERN = "*.trace.json.gz"  # <host>.trace.json.gz, written with every trace

# (category, regex searched in the lower-cased event name); the first match wins
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("attention", r"mpt_flash|flash|fmha|cudnn|sdpa|attention|splash"),
    (
        "collectives",
        r"nccl|all-reduce|all_reduce|allreduce|all-gather|all_gather|allgather|reduce-scatter"
        r"|reduce_scatter|reducescatter|collective-permute|collective_permute|all-to-all"
        r"|all_to_all|alltoall|\bsend\b|\brecv\b",
    ),
    ("matmul", r"gemm|cublas|cutlass|nvjet|xmma|wgmma|\bdot|dot[._]|matmul|convolution"),
    (  # plain copies and fusions of nothing but data movement (not `copy_add_fusion`)
        "memory copies",
        r"memcpy|memset|^(wrapped_|loop_|input_)?(copy|transpose)([.-]\d+|_\d+)*$"
        r"|^(wrapped_|loop_|input_)?((copy|transpose|bitcast)_)+fusion"
        r"|dynamic[-_]update[-_]slice",
    ),
    (
        "fused elementwise / reductions",  # and our norm kernels (mpt_norm_fwd, mpt_norm_bwd)
        r"mpt_norm|fusion|loop_|input_|reduce|convert|broadcast|add|multiply|subtract|divide|select"
        r"|exp|log|tanh|rsqrt|sqrt|power|maximum|minimum|compare|iota|concatenate|slice"
        r"|scatter|gather|pad|reshape|bitcast|negate|triton",
    ),
)
OTHER = "other"
CATEGORY_NAMES = (*(name for name, _ in CATEGORIES), OTHER)
_CATEGORY_RES = tuple((name, re.compile(pattern)) for name, pattern in CATEGORIES)

# lines of a device process derived from the stream lines (the same time again, other names)
_DERIVED_LINES = re.compile(
    r"^(steps|xla modules|xla ops|async xla ops|xla tracemes?|framework ops|tensorflow ops"
    r"|framework name scope|tensorflow name scope|source code|launch stats|cupti overhead)\b",
    re.IGNORECASE,
)
_ACCELERATOR = re.compile(r"^/device:(GPU|TPU):\d+")
_STREAM_LINE = re.compile(r"^stream #", re.IGNORECASE)
_HOST_XLA_LINE = re.compile(r"^tf_xla", re.IGNORECASE)
# an HLO instruction name (`fusion.3`, `all-reduce.12`, `ynn_fusion`): the host's op events
_HLO_NAME = re.compile(r"^[a-z][a-z0-9_-]*(\.[a-z0-9_-]+)*$")


def categorize(name: str) -> str:
    """The category of a kernel or op name (CATEGORIES, first match), else 'other'."""
    lower = name.lower()
    for category, pattern in _CATEGORY_RES:
        if pattern.search(lower):
            return category
    return OTHER


@dataclasses.dataclass(frozen=True)
class Category:
    name: str
    time_us: float  # self time summed over the chosen lines, per device
    share: float  # of the summary's kernel time, 0..1
    count: float  # events, per device


@dataclasses.dataclass(frozen=True)
class Kernel:
    name: str
    category: str
    time_us: float
    share: float
    count: float


@dataclasses.dataclass(frozen=True)
class TraceSummary:
    """Totals over the traced window, per device (mean over `n_devices` device processes).

    Times are in microseconds; `per_step(x)` divides a figure by `steps` when it was given.
    """

    trace_file: Path
    processes: tuple[str, ...]  # names of the processes used
    lines: tuple[str, ...]  # names of the threads / streams used
    host_fallback: bool  # no device process: the host's XLA threads were used
    n_devices: int
    kernel_us: float  # sum of event self times
    busy_us: float  # union of the events' intervals
    span_us: float  # first event start .. last event end
    window_us: float  # the whole trace (all processes), for reference
    categories: tuple[Category, ...]  # every category, largest first
    top: tuple[Kernel, ...]  # the `top` largest names
    n_names: int  # distinct names in total
    steps: int | None = None

    @property
    def busy_share(self) -> float:
        return self.busy_us / self.span_us if self.span_us > 0 else 0.0

    def per_step(self, value: float) -> float:
        return value / self.steps if self.steps else value


# ---------------------------------------------------------------------------------------------
# Loading


def find_trace(trace_dir: str | Path) -> Path:
    """The newest `**/perfetto_trace.json.gz` under trace_dir (or trace_dir itself if a file).

    Without one, the newest `**/*.trace.json.gz`: the trace-viewer JSON every jax.profiler trace
    writes, which jax copies (less its `metadata`) into the Perfetto file; so traces taken without
    `create_perfetto_trace=True` are read too.
    """
    path = Path(trace_dir)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such folder")
    for pattern in (TRACE_NAME, FALLBACK_PATTERN):
        found = [p for p in path.rglob(pattern) if p.is_file()]
        if found:
            return max(found, key=lambda p: (p.stat().st_mtime, str(p)))
    raise FileNotFoundError(
        f"{path}: no {TRACE_NAME} (or {FALLBACK_PATTERN}) in this folder: not a jax.profiler trace"
    )


def load_events(trace_file: str | Path) -> list[dict[str, Any]]:
    """The trace's `traceEvents`; a corrupt or foreign file is a one-line ValueError."""
    path = Path(trace_file)
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, json.JSONDecodeError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(f"{path}: not a readable gzip JSON trace ({reason})") from None
    events = data.get("traceEvents") if isinstance(data, dict) else data
    if not isinstance(events, list):
        raise ValueError(f"{path}: no traceEvents list in this JSON")
    return [e for e in events if isinstance(e, dict)]


# ---------------------------------------------------------------------------------------------
# Choosing the device's lines


def _names(events: list[dict[str, Any]]) -> tuple[dict[Any, str], dict[tuple[Any, Any], str]]:
    processes: dict[Any, str] = {}
    threads: dict[tuple[Any, Any], str] = {}
    for e in events:
        if e.get("ph") != "M":
            continue
        name = str((e.get("args") or {}).get("name", ""))
        if e.get("name") == "process_name":
            processes[e.get("pid")] = name
        elif e.get("name") == "thread_name":
            threads[(e.get("pid"), e.get("tid"))] = name
    return processes, threads


def _device_lines(tids: Iterable[Any], names: dict[Any, str]) -> list[Any]:
    """Stream lines if any; else `XLA Ops`; else every line that is not derived."""
    tids = sorted(tids, key=str)
    streams = [t for t in tids if _STREAM_LINE.match(names.get(t, ""))]
    if streams:
        return streams
    ops = [t for t in tids if names.get(t, "").strip().lower() == "xla ops"]
    if ops:
        return ops
    return [t for t in tids if not _DERIVED_LINES.match(names.get(t, ""))]


def _host_lines(tids: Iterable[Any], names: dict[Any, str]) -> list[Any]:
    tids = sorted(tids, key=str)
    xla = [t for t in tids if _HOST_XLA_LINE.match(names.get(t, ""))]
    return xla or [t for t in tids if names.get(t, "") != "python"]


# ---------------------------------------------------------------------------------------------
# Time


def _self_times(events: list[tuple[float, float, str]]) -> list[tuple[str, float]]:
    """(name, self time) of each event of one line: its duration less its nested events'."""
    order = sorted(events, key=lambda e: (e[0], -e[1]))
    out: list[list[Any]] = []
    stack: list[tuple[float, int]] = []  # (end, index in out)
    for start, dur, name in order:
        end = start + dur
        while stack and stack[-1][0] <= start:
            stack.pop()
        out.append([name, dur])
        if stack:  # nested in the innermost open event: not its parent's own time
            parent_end, parent = stack[-1]
            out[parent][1] -= min(end, parent_end) - start
        stack.append((end, len(out) - 1))
    return [(name, max(t, 0.0)) for name, t in out]


def _union(intervals: list[tuple[float, float]]) -> float:
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def summarize_trace(
    trace_dir: str | Path, *, steps: int | None = None, top: int = 20
) -> TraceSummary:
    """Summarize the newest Perfetto trace under trace_dir (see the module docstring)."""
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    trace_file = find_trace(trace_dir)
    events = load_events(trace_file)
    processes, threads = _names(events)

    timed: dict[tuple[Any, Any], list[tuple[float, float, str]]] = {}
    window = [float("inf"), float("-inf")]
    for e in events:
        if e.get("ph") != "X":
            continue
        try:
            start, dur = float(e["ts"]), float(e.get("dur", 0.0))
        except (KeyError, TypeError, ValueError):
            continue
        window[0], window[1] = min(window[0], start), max(window[1], start + dur)
        timed.setdefault((e.get("pid"), e.get("tid")), []).append(
            (start, dur, str(e.get("name", "")))
        )
    if not timed:
        raise ValueError(f"{trace_file}: no timed events (ph 'X') in this trace")

    pids_with_events = {pid for pid, _ in timed}
    devices = {p: n for p, n in processes.items() if p in pids_with_events}
    accelerators = [p for p, n in devices.items() if _ACCELERATOR.match(n)]
    device_pids = sorted(
        accelerators or [p for p, n in devices.items() if n.startswith("/device:")],
        key=lambda p: processes[p],
    )
    host_fallback = not device_pids
    if host_fallback:
        host = [p for p, n in processes.items() if n.startswith("/host:") and p in pids_with_events]
        device_pids = host[:1] or sorted(pids_with_events, key=str)[:1]

    times: dict[str, float] = {}
    counts: dict[str, int] = {}
    busy = span = 0.0
    used_lines: list[str] = []
    for pid in device_pids:
        names = {tid: name for (p, tid), name in threads.items() if p == pid}
        tids = [tid for p, tid in timed if p == pid]
        chosen = (_host_lines if host_fallback else _device_lines)(tids, names)
        intervals: list[tuple[float, float]] = []
        for tid in chosen:
            line = timed[(pid, tid)]
            if host_fallback:
                line = [ev for ev in line if _HLO_NAME.match(ev[2])]
            if not line:
                continue
            used_lines.append(names.get(tid, str(tid)))
            intervals += [(start, start + dur) for start, dur, _ in line]
            for name, t in _self_times(line):
                times[name] = times.get(name, 0.0) + t
                counts[name] = counts.get(name, 0) + 1
        if intervals:
            busy += _union(intervals)
            span += max(e for _, e in intervals) - min(s for s, _ in intervals)

    n = len(device_pids)
    kernel = sum(times.values()) / n
    by_category: dict[str, list[float]] = {c: [0.0, 0.0] for c in CATEGORY_NAMES}
    for name, t in times.items():
        acc = by_category[categorize(name)]
        acc[0] += t / n
        acc[1] += counts[name] / n

    def share(t: float) -> float:
        return t / kernel if kernel > 0 else 0.0

    categories = tuple(
        sorted(
            (Category(c, t, share(t), k) for c, (t, k) in by_category.items()),
            key=lambda c: (-c.time_us, CATEGORY_NAMES.index(c.name)),
        )
    )
    ranked = sorted(times.items(), key=lambda item: (-item[1], item[0]))[: max(top, 0)]
    kernels = tuple(
        Kernel(name, categorize(name), t / n, share(t / n), counts[name] / n) for name, t in ranked
    )
    return TraceSummary(
        trace_file=trace_file,
        processes=tuple(processes[p] if p in processes else str(p) for p in device_pids),
        lines=tuple(dict.fromkeys(used_lines)),
        host_fallback=host_fallback,
        n_devices=n,
        kernel_us=kernel,
        busy_us=busy / n,
        span_us=span / n,
        window_us=window[1] - window[0],
        categories=categories,
        top=kernels,
        n_names=len(times),
        steps=steps,
    )


# ---------------------------------------------------------------------------------------------
# Text


def _ms(us: float) -> str:
    ms = us / 1000
    return f"{ms:,.0f}" if ms >= 1000 else f"{ms:.4g}" if ms >= 0.001 else f"{ms:.3g}"


def _count(value: float) -> str:
    return f"{value:g}" if float(value).is_integer() else f"{value:.3g}"


def _cell(text: str, limit: int = 100) -> str:
    text = text.replace("|", "/").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _line_list(lines: tuple[str, ...]) -> str:
    """Line names without their numeric ids (`tf_XLAPjRtCpuClient/123` -> `tf_XLAPjRtCpuClient`),
    repeated ones counted: `Stream #13(Kernel), tf_XLAEigen x2`."""
    counts: dict[str, int] = {}
    for line in lines:
        base = re.sub(r"/-?\d+$", "", line)
        counts[base] = counts.get(base, 0) + 1
    return ", ".join(f"{name} x{n}" if n > 1 else name for name, n in counts.items()) or "none"


def format_summary(summary: TraceSummary) -> str:
    """Markdown: what was used, busy vs span, then the category and top-name tables."""
    s = summary
    per = "per step" if s.steps else "in total"
    unit = f"ms {per}" if s.steps else "ms"
    if s.host_fallback:
        where = (
            f"no device process in the trace: host process `{s.processes[0]}` used (its XLA "
            f"threads: {_line_list(s.lines)})"
        )
    else:
        devices = s.processes[0] if s.n_devices == 1 else f"{s.n_devices} device processes"
        where = f"device process: `{devices}`, lines: {_line_list(s.lines)}"
        if s.n_devices > 1:
            where += " (figures per device, mean over devices)"
    steps = f" over {s.steps} step{'s' if s.steps != 1 else ''}" if s.steps else ""
    lines = [
        f"Trace: `{s.trace_file}`{steps}",
        where,
        f"Busy {_ms(s.per_step(s.busy_us))} ms of a {_ms(s.per_step(s.span_us))} ms span {per}"
        f" ({100 * s.busy_share:.1f}% busy, {100 * (1 - s.busy_share):.1f}% idle);"
        f" kernel time {_ms(s.per_step(s.kernel_us))} ms {per}"
        f" (whole trace window {_ms(s.window_us)} ms)",
        "",
        f"| category | {unit} | share | count |",
        "|---|---|---|---|",
    ]
    for c in s.categories:
        lines.append(
            f"| {c.name} | {_ms(s.per_step(c.time_us))} | {100 * c.share:.1f}% |"
            f" {_count(s.per_step(c.count))} |"
        )
    lines += [
        "",
        f"Top {len(s.top)} of {s.n_names} names:",
        "",
        f"| name | category | {unit} | share | count |",
        "|---|---|---|---|---|",
    ]
    for k in s.top:
        lines.append(
            f"| {_cell(k.name)} | {k.category} | {_ms(s.per_step(k.time_us))} |"
            f" {100 * k.share:.1f}% | {_count(s.per_step(k.count))} |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Nsight Compute (ncu) kernel reports

# ncu metric names (sections SpeedOfLight, LaunchStats, Occupancy, WarpStateStats,
# ComputeWorkloadAnalysis), in the order the kernel table shows them
NCU_METRICS = (
    "Duration",
    "Compute (SM) Throughput",
    "Memory Throughput",
    "DRAM Throughput",
    "Executed Ipc Active",
    "Issue Slots Busy",
    "Registers Per Thread",
    "Dynamic Shared Memory Per Block",
    "Block Size",
    "Grid Size",
    "Theoretical Occupancy",
    "Achieved Occupancy",
    "Warp Cycles Per Issued Instruction",
)
_NCU_HEADER = '"ID","Process ID"'


def summarize_ncu_csv(text: str, metrics: tuple[str, ...] = NCU_METRICS) -> str:
    """Markdown: one row per kernel name (its last launch), one column per metric ncu reported.

    text: the output of `ncu --csv --page details`, which may hold the profiled program's own
    lines and ncu's `==PROF==` lines before and between the CSV rows.
    """
    start = text.find(_NCU_HEADER)
    if start < 0:
        raise ValueError('no ncu CSV in the text (no header line starting with "ID")')
    rows = [line for line in text[start:].splitlines() if line.startswith('"')]
    records = list(csv.DictReader(rows))
    needed = {"ID", "Kernel Name", "Metric Name", "Metric Value"}
    missing = needed - set(records[0] if records else {})
    if missing:
        raise ValueError(f"ncu CSV lacks the columns {sorted(missing)}")
    launches: dict[str, dict[str, str]] = {}  # launch ID -> metric -> "value unit"
    names: dict[str, str] = {}
    for r in records:
        value = f"{r['Metric Value']} {r.get('Metric Unit') or ''}".strip()
        launches.setdefault(r["ID"], {})[r["Metric Name"]] = value
        names[r["ID"]] = r["Kernel Name"]
    last: dict[str, str] = {}  # kernel name -> its last launch ID (rows come in launch order)
    for launch_id in launches:
        last[names[launch_id]] = launch_id
    shown = [m for m in metrics if any(m in launches[i] for i in last.values())]
    lines = [
        f"| kernel | launches | {' | '.join(shown)} |",
        "|---|---|" + "---|" * len(shown),
    ]
    counts = {name: sum(n == name for n in names.values()) for name in last}
    for name, launch_id in last.items():
        cells = [launches[launch_id].get(m, "") for m in shown]
        lines.append(f"| {_cell(name, 60)} | {counts[name]} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


__all__ = [
    "CATEGORIES",
    "NCU_METRICS",
    "Category",
    "Kernel",
    "TraceSummary",
    "categorize",
    "find_trace",
    "format_summary",
    "load_events",
    "summarize_ncu_csv",
    "summarize_trace",
]
