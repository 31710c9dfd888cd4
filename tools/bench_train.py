"""Training throughput on synthetic tokens: llm-foundry's benchmark columns as Markdown and CSV.

    python tools/bench_train.py --models mpt-125m,mpt-1b --seq-lens 2048 --global-batch 32 \\
        [--microbatch N[,N...]] [--mesh data=1,fsdp=-1,tensor=1 [--mesh ...]] \\
        [--precision amp_bf16[,fp32,...]] [--mixed-precision FULL[,PURE,...]] \\
        [--remat none[,dots_saveable,full]] \\
        [--warmup 3] [--steps 10] [--out DIR] [--peak-tflops X] [--device-memory-gib X] \\
        [--model-override key=value ...] [--in-process] [--row-timeout 3600] \\
        [--profile DIR [--profile-steps 3]] [--aot h100|h200 [--aot-rates ...] [--aot-plugin DIR]]

Every combination of models x seq lens x global batches x microbatches x meshes x precisions x
mixed-precision modes x remat policies is one row. A model is a preset (experiments/models/), a
YAML file or `tiny` (a very small model for CPU); its max_seq_len is set to the row's seq len (so
NumParams grows with seq when positions are learned, as in llm-foundry's tables). `--microbatch`
is train.microbatch: sequences per forward/backward over all devices (default: the global batch,
no accumulation).

Each row builds the trainer's state and step (mpt_jax.train: same shardings, donation), compiles
it, checks XLA's memory estimate against the device memory, runs --warmup steps, then times
--steps steps on a fixed batch of random token ids. MFU/HFU/TFLOP/s use mpt_jax.metrics
(llm-foundry's formula) with the median step time. Rows run one per subprocess (isolated peak
memory counters, an OOM or a crash ends only its row) unless --in-process is given.

With --profile DIR, each row that ran then traces --profile-steps (3) more steps with
jax.profiler into DIR/<row label>/ -- after the timed ones, so the table's timings carry no
tracing overhead -- and after the table the tool prints each row's "where the time goes" summary
(mpt_jax.profiling), also written to DIR/<row label>/summary.md; tools/profile_summary.py reads
such a trace again.

With --aot CARD nothing runs: each row is compiled for that GPU on this host, without one
(mpt_jax.aot: XLA's deviceless compilation through the CUDA PJRT plugin, found on --aot-plugin),
and the table has XLA's memory estimate, what the optimized program does (mpt_jax.hlo_cost:
matmul and attention FLOPs, bytes moved by copies and by other kernels) and a predicted step
from --aot-rates (defaults: the H200 figures of 2026-11-28, docs/performance.md); each row's
top memory-bound launch sites go to DIR/<row label>.aot.md with --out.

Writes DIR/bench_train.md and DIR/bench_train.csv with --out, and prints the Markdown table.
Exit status 0 when the table was written, also when rows did not fit or failed; 2 for bad
arguments.
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import io
import itertools
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
import typing
from pathlib import Path
from typing import Any

from mpt_jax import aot, hlo_cost, metrics, profiling
from mpt_jax.atomic_write import write_atomic
from mpt_jax.config import (
    ConfigError,
    MeshConfig,
    MixedPrecision,
    ModelConfig,
    Precision,
    Remat,
    count_params,
    load_model_config,
    preset_names,
)
from mpt_jax.memory import compiled_bytes, device_memory_bytes

# a very small model for CPU runs: the presets' layout (learned positions, biases) scaled down
TINY_MODEL = dict(
    d_model=64,
    n_heads=4,
    n_layers=2,
    expansion_ratio=4,
    max_seq_len=64,
    vocab_size=512,
    learned_pos_emb=True,
    no_bias=False,
)

COLUMNS = (
    "Model",
    "SeqLen (T)",
    "# Devices",
    "Device",
    "MFU",
    "HFU",
    "TFLOP/s/device",
    "MicroBatchSize",
    "GradAccum",
    "GlobalBatchSize",
    "Throughput (S/s)",
    "Throughput (T/s)",
    "Throughput (T/s/device)",
    "Step time (s)",
    "Precision",
    "MP Mode",
    "Mesh (data x fsdp x tensor)",
    "Sharding Strategy",
    "Activation Checkpointing",
    "Loss chunk",
    "NumParams",
    "Peak memory (GiB/device)",
    "Status",
)

AOT_COLUMNS = (
    "Model",
    "SeqLen (T)",
    "Device",
    "GlobalBatchSize",
    "Precision",
    "MP Mode",
    "Layers",
    "Activation Checkpointing",
    "Loss chunk",
    "NumParams",
    "XLA memory (GiB/device)",
    "Matmul TFLOP",
    "Attention TFLOP",
    "Copies GB",
    "Elementwise GB",
    "Predicted step (s)",
    "Predicted T/s",
    "Predicted MFU",
    "Status",
)
# --aot's default rates: MPT-1B with ALiBi on an H200, 2026-11-28 (docs/performance.md): the
# matmuls' 2.58e14 FLOP in 345.7 ms; our kernels at the tuned tilings, 2.05 ms for the 6.19e11
# FLOP they execute at (8, 2048, 16, 128); the copies and other kernels' 842 GB (as mpt_jax.
# hlo_cost counts that program) in 228.9 ms
AOT_RATES = {"matmul": 745.0, "attention": 302.0, "memory": 3.68}
# beside this Python's packages: `make setup` installs it there, matched to the venv's jaxlib
DEFAULT_AOT_PLUGIN = Path(sys.prefix) / "aot-plugin"

_RESULT_MARKER = "BENCH_TRAIN_ROW "
_OOM_MARKERS = ("RESOURCE_EXHAUSTED", "out of memory", "Out of memory")
GIB = 2**30


class ArgError(Exception):
    """A bad command-line value; printed as `error: <argument>: <message>`."""

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(f"{argument}: {message}")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        """One line on stderr and exit status 2 (argparse's own adds the usage)."""
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------------------------------------
# Arguments


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _positive_ints(text: str, argument: str) -> list[int]:
    """'2048,8192' -> [2048, 8192]; anything else is an ArgError."""
    values = []
    for part in _split(text):
        try:
            value = int(part)
        except ValueError:
            value = 0
        if value <= 0:
            raise ArgError(argument, f"{part!r} is not a positive integer")
        values.append(value)
    if not values:
        raise ArgError(argument, "expected one or more comma-separated integers")
    return values


def _choices(text: str, argument: str, allowed: tuple[str, ...]) -> list[str]:
    values = _split(text)
    for value in values:
        if value not in allowed:
            raise ArgError(argument, f"unknown value {value!r} (known: {', '.join(allowed)})")
    if not values:
        raise ArgError(argument, f"expected one or more of {', '.join(allowed)}")
    return values


def resolve_model(name: str, overrides: list[str]) -> ModelConfig:
    """A preset name, a YAML file or `tiny`, plus `key=value` overrides."""
    if name == "tiny":
        source: Any = TINY_MODEL
    elif Path(name).is_file() or (Path(name).suffix == "" and name in preset_names()):
        source = name
    elif Path(name).suffix in (".yaml", ".yml"):
        raise ArgError("--models", f"{name}: no such file")
    else:
        known = ", ".join(["tiny", *preset_names()])
        raise ArgError("--models", f"unknown preset {name!r} (known: {known})")
    try:
        return load_model_config(source, overrides)
    except ConfigError as e:
        argument = "--model-override" if overrides else "--models"
        raise ArgError(argument, f"{name}: {e}") from e


def parse_mesh(spec: str) -> MeshConfig:
    """'data=1,fsdp=-1,tensor=1' (missing axes take MeshConfig's defaults) -> MeshConfig."""
    sizes: dict[str, int] = {}
    for part in _split(spec):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in ("data", "fsdp", "tensor") or key in sizes:
            raise ArgError("--mesh", f"{spec!r}: expected data=N,fsdp=N,tensor=N (one may be -1)")
        try:
            sizes[key] = int(value)
        except ValueError:
            raise ArgError("--mesh", f"{spec!r}: {key}={value} is not an integer") from None
    try:
        return MeshConfig(**sizes)
    except ConfigError as e:
        raise ArgError("--mesh", f"{spec!r}: {e}") from e


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--models", default="mpt-125m", help="comma-separated presets, YAML files or 'tiny'")
    add("--seq-lens", default="2048", help="comma-separated sequence lengths")
    add("--global-batch", default="32", help="comma-separated global batches (sequences)")
    add("--microbatch", default=None, help="comma-separated train.microbatch values")
    add("--mesh", action="append", metavar="SPEC", help="data=N,fsdp=N,tensor=N; repeatable")
    add("--precision", default="amp_bf16", help="comma-separated: amp_bf16, pure_bf16, fp32")
    add(
        "--mixed-precision",
        default="FULL",
        help="comma-separated train.mixed_precision: FULL, DEFAULT, PURE",
    )
    add("--remat", default="none", help="comma-separated: none, dots_saveable, full")
    add("--loss-chunk", default="none", help="comma-separated: none or train.loss_chunk values")
    add("--model-override", action="append", default=[], metavar="KEY=VALUE", help="repeatable")
    add("--warmup", type=int, default=3, help="untimed steps after compilation")
    add("--steps", type=int, default=10, help="timed steps (median step time)")
    add("--seed", type=int, default=0, help="seed of the synthetic tokens")
    add("--out", metavar="DIR", help="write DIR/bench_train.md and DIR/bench_train.csv")
    add("--peak-tflops", type=float, help="peak per device (default: metrics.PEAK_FLOPS)")
    add("--device-memory-gib", type=float, help="memory per device (default: the device's)")
    add("--in-process", action="store_true", help="run the rows here, not one per subprocess")
    add("--row-timeout", type=float, default=3600.0, help="seconds per row subprocess")
    add("--profile", metavar="DIR", help="trace more steps per row into DIR/<row label>/")
    add("--profile-steps", type=int, default=3, help="steps traced after the timed ones")
    add(
        "--judge",
        metavar="DIR",
        default=None,
        help="instead of running: judge DIR's rows (DIR/*/bench_train.csv, as tools/gpu/perf.sh "
        "leaves them) and its anchor_jax_plain_mpt1b.json against the [gpu-perf] targets",
    )
    add("--aot", choices=sorted(aot.CARDS), help="compile for this GPU here, without one; no run")
    add(
        "--aot-rates",
        default=None,
        metavar="matmul=T,attention=T,memory=B",
        help="--aot's prediction: matmul and attention-kernel TFLOP/s, memory-bound TB/s",
    )
    add(
        "--aot-plugin",
        default=str(DEFAULT_AOT_PLUGIN),
        metavar="DIR",
        help="where jax's CUDA PJRT plugin is installed (make aot-plugin)",
    )
    add("--_row", default=None, help=argparse.SUPPRESS)  # internal: run one row, print JSON
    return parser


# the [gpu-perf] issue's targets for MPT-1B with ALiBi on an H200: MFU (%) at least, per seq
# len, and at seq 2048 also at least 1.3x the plain-JAX anchor's tokens/s in the same run
PERF_TARGETS = {2048: 60.0, 8192: 50.0}
ANCHOR_SPEEDUP = 1.3


def judge(perf_dir: Path) -> list[str]:
    """A line per row under perf_dir (its bench_train.csv) against PERF_TARGETS and the anchor
    (perf_dir/anchor_jax_plain_mpt1b.json, if there); ArgError if it holds no row to judge."""

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    tables = sorted(perf_dir.glob("*/bench_train.csv"))
    if not tables:
        what = "holds no DIR/*/bench_train.csv" if perf_dir.is_dir() else "is not a folder"
        raise ArgError("--judge", f"{perf_dir} {what}: nothing to judge")

    anchor = None
    try:
        anchor_file = perf_dir / "anchor_jax_plain_mpt1b.json"
        anchor = float(json.loads(anchor_file.read_text())["jax_plain_mpt1b"]["tokens_per_s"])
    except (OSError, KeyError, ValueError) as e:
        lines = [f"anchor: none ({type(e).__name__}), so no speedup verdict"]
    else:
        lines = [f"anchor jax_plain_mpt1b: {anchor:,.0f} tokens/s"]
    for csv_path in tables:
        for number, row in enumerate(csv.DictReader(csv_path.open()), 2):
            try:
                name, seq = csv_path.parent.name, int(row["SeqLen (T)"])
                if not row["MFU"] or not row["Throughput (T/s)"]:
                    lines.append(f"target {name}: no result ({row['Status']})")
                    continue
                mfu, tokens = float(row["MFU"]), float(row["Throughput (T/s)"])
            except (KeyError, TypeError, ValueError) as e:
                problem = f"no column {e}" if isinstance(e, KeyError) else str(e)
                raise ArgError("--judge", f"{csv_path} line {number}: {problem}") from None
            parts = [f"{tokens:,.0f} tokens/s"]
            if seq in PERF_TARGETS:
                goal = PERF_TARGETS[seq]
                parts.append(f"MFU {mfu:.2f}% (at least {goal:.0f}%: {verdict(mfu >= goal)})")
            if seq == min(PERF_TARGETS) and anchor is not None:
                ratio = tokens / anchor
                parts.append(
                    f"{ratio:.2f}x the anchor ({ANCHOR_SPEEDUP}x: "
                    f"{verdict(ratio >= ANCHOR_SPEEDUP)})"
                )
            lines.append(f"target {name} (seq {seq}): " + "; ".join(parts))
    return lines


def parse_aot_rates(text: str | None) -> dict[str, float]:
    """--aot-rates `matmul=745,attention=302,memory=3.7` over AOT_RATES; ArgError if bad."""
    rates = dict(AOT_RATES)
    for item in _split(text or ""):
        key, sep, value = item.partition("=")
        if not sep or key not in rates:
            keys = ", ".join(rates)
            raise ArgError("--aot-rates", f"expected KEY=VALUE with KEY in {keys}, got {item!r}")
        try:
            rates[key] = float(value)
        except ValueError:
            rates[key] = float("nan")
        if not rates[key] > 0:
            raise ArgError("--aot-rates", f"{key} must be a number > 0, got {value!r}")
    return rates


def plan_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One spec per combination, in the order of the table; raises ArgError on bad input."""
    if args.warmup < 0:
        raise ArgError("--warmup", f"must be >= 0, got {args.warmup}")
    if args.steps < 1:
        raise ArgError("--steps", f"must be >= 1, got {args.steps}")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        raise ArgError("--peak-tflops", f"must be > 0, got {args.peak_tflops}")
    if args.device_memory_gib is not None and not args.device_memory_gib > 0:
        raise ArgError("--device-memory-gib", f"must be > 0, got {args.device_memory_gib}")
    if args.row_timeout <= 0:
        raise ArgError("--row-timeout", f"must be > 0, got {args.row_timeout}")
    if args.profile_steps < 1:
        raise ArgError("--profile-steps", f"must be >= 1, got {args.profile_steps}")
    rates = parse_aot_rates(args.aot_rates) if args.aot else None
    if args.aot_rates is not None and not args.aot:
        raise ArgError("--aot-rates", "only with --aot")
    names = _split(args.models)
    if not names:
        raise ArgError("--models", "expected one or more model names")
    models = [(name, resolve_model(name, args.model_override)) for name in names]
    seq_lens = _positive_ints(args.seq_lens, "--seq-lens")
    batches = _positive_ints(args.global_batch, "--global-batch")
    micros = [None] if args.microbatch is None else _positive_ints(args.microbatch, "--microbatch")
    meshes = [parse_mesh(spec) for spec in (args.mesh or ["data=1,fsdp=-1,tensor=1"])]
    precisions = _choices(args.precision, "--precision", typing.get_args(Precision))
    modes = _choices(args.mixed_precision, "--mixed-precision", typing.get_args(MixedPrecision))
    remats = _choices(args.remat, "--remat", typing.get_args(Remat))
    chunk_texts = [c for c in _split(args.loss_chunk) if c != "none"]
    chunks = [None] * (len(_split(args.loss_chunk)) > len(chunk_texts))
    chunks += _positive_ints(",".join(chunk_texts), "--loss-chunk") if chunk_texts else []
    if not chunks:
        raise ArgError("--loss-chunk", "expected none or positive integers")
    profile = None if args.profile is None else Path(args.profile)
    specs = []
    rows = itertools.product(
        models, seq_lens, batches, micros, meshes, precisions, modes, remats, chunks
    )
    for (name, model), seq, batch, micro, mesh, precision, mode, remat, chunk in rows:
        model_dict = {**model.to_dict(), "max_seq_len": seq}
        specs.append(
            dict(
                label=Path(name).stem if name.endswith((".yaml", ".yml")) else name,
                model=model_dict,
                seq=seq,
                global_batch=batch,
                microbatch=batch if micro is None else micro,
                mesh={"data": mesh.data, "fsdp": mesh.fsdp, "tensor": mesh.tensor},
                precision=precision,
                mixed_precision=mode,
                remat=remat,
                loss_chunk=chunk,
                warmup=args.warmup,
                steps=args.steps,
                seed=args.seed,
                device_memory_gib=args.device_memory_gib,
                isolated=not args.in_process,
                aot=args.aot,
                aot_rates=rates,
                aot_plugin=args.aot_plugin,
            )
        )
    seen: dict[str, int] = {}
    for spec in specs:  # the same row twice (a model listed twice): a folder each
        label = row_label(spec)
        seen[label] = seen.get(label, 0) + 1
        label += f"-{seen[label]}" if seen[label] > 1 else ""
        spec["profile_dir"] = None if profile is None else str(profile / label)
        spec["profile_steps"] = args.profile_steps
    return specs


def _mesh_text(sizes: Any) -> str:
    """data x fsdp x tensor sizes as `1x-1x1`."""
    return "x".join(map(str, sizes))


def _requested_mesh(spec: dict[str, Any]) -> list[int]:
    return [spec["mesh"][a] for a in ("data", "fsdp", "tensor")]


def row_label(spec: dict[str, Any]) -> str:
    """A filesystem-safe name of the row: mpt-1b_seq2048_gb16_mb16_1x-1x1_amp_bf16_none_chunk512."""
    text = (
        f"{spec['label']}_seq{spec['seq']}_gb{spec['global_batch']}_mb{spec['microbatch']}"
        f"_{_mesh_text(_requested_mesh(spec))}_{spec['precision']}"
        + ("" if spec["mixed_precision"] == "FULL" else f"_{spec['mixed_precision']}")
        + f"_{spec['remat']}_chunk{spec['loss_chunk'] or 'none'}"
    )
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


# ---------------------------------------------------------------------------------------------
# One row (imports jax: in the row subprocess, or here with --in-process)


def _run_config(spec: dict[str, Any]) -> dict[str, Any]:
    """A RunConfig mapping: nothing reads `data.path` or `run_dir` (no files are touched)."""
    return {
        "model": spec["model"],
        "data": {"path": "synthetic:unused"},
        "train": {
            "global_batch": spec["global_batch"],
            "microbatch": spec["microbatch"],
            "steps": spec["warmup"] + spec["steps"],
            "precision": spec["precision"],
            "mixed_precision": spec["mixed_precision"],
            "remat": spec["remat"],
            "loss_chunk": spec["loss_chunk"],
            "progress": False,
        },
        "mesh": spec["mesh"],
        "checkpoint": {"enabled": False},
        "run_dir": "unused",
    }


def _available_bytes(devices: list[Any], gib: float | None) -> int:
    """Memory per device: --device-memory-gib, the allocator's limit, or host RAM / devices."""
    return int(gib * GIB) if gib is not None else device_memory_bytes(devices)


def _fit_status(needed: int | None, available: float) -> str | None:
    """The status of a row whose compiled step (XLA's estimate) needs more than is available."""
    if needed is None or needed <= available:
        return None
    return (
        f"does not fit: needs {_gib(needed)} GiB/device, {_gib(available)} GiB available"
        " (XLA's estimate of the compiled step)"
    )


def _is_oom(error: BaseException) -> bool:
    return any(marker in str(error) for marker in _OOM_MARKERS)


def _one_line(error: BaseException, limit: int = 160) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[0] if lines else ''}".replace("|", "/")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _timed_steps(step: Any, state: Any, batch: Any, n: int) -> tuple[Any, list[float]]:
    """Run n steps as the trainer does (step i-1 is read after step i is dispatched)."""
    import jax

    times: list[float] = []
    pending = None
    last = time.perf_counter()
    for _ in range(n):
        state, out = step(state, batch)
        if pending is not None:
            jax.block_until_ready(pending)
            now = time.perf_counter()
            times.append(now - last)
            last = now
        pending = out
    jax.block_until_ready((state, pending))
    times.append(time.perf_counter() - last)
    return state, times


def _traced_steps(
    step: Any, state: Any, batch: Any, spec: dict[str, Any]
) -> tuple[Any, str | None]:
    """spec's profile_steps more steps under jax.profiler (after the timed ones: the table's
    timings carry no tracing overhead); a tracing error is returned, the row stays measured."""
    import jax

    try:
        jax.profiler.start_trace(spec["profile_dir"], create_perfetto_trace=True)
    except Exception as e:
        return state, _one_line(e)
    error = None
    try:
        state, _ = _timed_steps(step, state, batch, spec["profile_steps"])
    except Exception as e:
        error = _one_line(e)
    finally:
        try:
            jax.profiler.stop_trace()
        except Exception as e:
            error = error or _one_line(e)
    return state, error


def _abstract_step(spec: dict[str, Any], devices: list[Any]) -> tuple[Any, ...]:
    """(run config, mesh, jitted step, abstract state, abstract batch) of a row over devices."""
    import jax
    import numpy as np

    from mpt_jax import sharding
    from mpt_jax.config import run_config_from_dict
    from mpt_jax.train import abstract_state, jit_train_step

    cfg = run_config_from_dict(_run_config(spec))
    mesh = sharding.make_mesh(cfg.mesh, devices)
    graphdef, abstract, shardings = abstract_state(cfg, mesh)
    step = jit_train_step(graphdef, cfg, mesh, shardings)
    shape_bs = (cfg.train.global_batch, cfg.seq_len)
    ids = jax.ShapeDtypeStruct(shape_bs, np.int32, sharding=sharding.batch_sharding(mesh))
    batch = {"input_ids": ids}
    if cfg.model.attn_uses_sequence_id:
        batch["segment_ids"] = ids
    return cfg, mesh, step, abstract, batch


def run_row(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one row; the status says why a row was skipped, did not fit or failed."""
    if spec.get("aot"):
        return compile_row(spec)
    import jax
    import numpy as np

    from mpt_jax import sharding
    from mpt_jax.train import init_state

    devices = jax.devices()
    result: dict[str, Any] = {
        "n_devices": len(devices),
        "device_kind": devices[0].device_kind,
        "mesh": None,
    }
    try:
        shape = sharding.mesh_shape(MeshConfig(**spec["mesh"]), len(devices))
    except ConfigError as e:
        return {**result, "status": f"skipped: {e}"}
    result["mesh"] = list(shape)
    shards = shape[0] * shape[1]
    for what, value in (("global batch", spec["global_batch"]), ("microbatch", spec["microbatch"])):
        if value % shards:
            reason = f"{what} {value} is not a multiple of data*fsdp ({shards})"
            return {**result, "status": f"skipped: {reason}"}
    try:
        cfg, mesh, step, abstract, batch_abstract = _abstract_step(spec, devices)
        batch_sharding = sharding.batch_sharding(mesh)
        shape_bs = batch_abstract["input_ids"].shape
        compiled = step.lower(abstract, batch_abstract).compile()
        needed = compiled_bytes(compiled)
        result["estimated_bytes"] = needed
        available = _available_bytes(jax.local_devices(), spec["device_memory_gib"])
        if status := _fit_status(needed, available):
            return {**result, "status": status}

        _, state, _ = init_state(cfg, mesh)
        rng = np.random.default_rng(spec["seed"])
        ids_bs = rng.integers(0, cfg.model.vocab_size, shape_bs, dtype=np.int32)
        batch = {"input_ids": jax.device_put(ids_bs, batch_sharding)}
        if "segment_ids" in batch_abstract:  # one document per row
            batch["segment_ids"] = jax.device_put(np.zeros_like(ids_bs), batch_sharding)
        if spec["warmup"]:
            state, _ = _timed_steps(compiled, state, batch, spec["warmup"])
        state, times = _timed_steps(compiled, state, batch, spec["steps"])
        stats = [d.memory_stats() for d in jax.local_devices()]
        if spec["isolated"] and all(s and "peak_bytes_in_use" in s for s in stats):
            result["peak_bytes"] = max(int(s["peak_bytes_in_use"]) for s in stats)
        if spec.get("profile_dir"):
            if spec["isolated"]:  # the timings so far, for a row cut off while it traces
                cut = "cut off by --row-timeout while tracing"
                provisional = {**result, "status": "ok", "step_times": times, "profile_error": cut}
                print(_RESULT_MARKER + json.dumps(provisional), flush=True)
            state, result["profile_error"] = _traced_steps(compiled, state, batch, spec)
        del state
    except Exception as e:  # one row's failure is its status, never the end of the table
        if _is_oom(e):
            return {**result, "status": f"does not fit: out of device memory ({_one_line(e)})"}
        return {**result, "status": f"failed: {_one_line(e)}"}
    return {**result, "status": "ok", "step_times": times}


def _aot_environment(plugin: str) -> dict[str, str]:
    """The variables an --aot row needs: the CUDA PJRT plugin importable, jax on the CPU."""
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": plugin + (os.pathsep + path if path else ""), "JAX_PLATFORMS": "cpu"}


def compile_row(spec: dict[str, Any]) -> dict[str, Any]:
    """Compile one row for spec's GPU card on this host (mpt_jax.aot) and read the program."""
    card = aot.card(spec["aot"])
    result: dict[str, Any] = {"n_devices": 1, "device_kind": card.device_kind, "mesh": None}
    try:
        devices = aot.compile_only_devices(spec["aot"])
        _, mesh, step, abstract, batch = _abstract_step(spec, devices)
        result["mesh"] = list(mesh.axis_sizes)
        with aot.lowering_for(mesh):
            compiled = step.trace(abstract, batch).lower().compile()
        cost = hlo_cost.analyze(compiled.as_text())
    except Exception as e:
        return {**result, "status": f"failed: {_one_line(e)}"}
    rates = spec["aot_rates"]
    seconds = hlo_cost.predict_seconds(
        cost,
        hlo_cost.Rates(
            matmul_flops=rates["matmul"] * 1e12,
            attention_flops=rates["attention"] * 1e12,
            memory_bytes=rates["memory"] * 1e12,
        ),
    )
    needed = compiled_bytes(compiled)
    # the allocator's share of the card, as on the GPU, or --device-memory-gib
    fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75"))
    available = card.memory_bytes * fraction
    if spec["device_memory_gib"] is not None:
        available = spec["device_memory_gib"] * GIB
    return {
        **result,
        "status": _fit_status(needed, available) or "compiled",
        "estimated_bytes": needed,
        "aot": {
            "matmul_flops": cost.total("flops", hlo_cost.MATMUL),
            "attention_flops": cost.total("flops", hlo_cost.ATTENTION),
            "copies_bytes": cost.total("bytes", hlo_cost.COPIES),
            "elementwise_bytes": cost.total("bytes", hlo_cost.ELEMENTWISE),
            "seconds": seconds,
            "report": hlo_cost.format_cost(cost),
        },
    }


def run_isolated(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """run_row in a fresh Python (inherits the environment, so XLA_FLAGS' device count too)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--_row", json.dumps(spec)]
    env = {**os.environ, **_aot_environment(spec["aot_plugin"])} if spec.get("aot") else None
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        # a row timed before it was cut off (while tracing) printed its result already
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout
        for line in reversed((out or "").splitlines()):
            if line.startswith(_RESULT_MARKER):
                return json.loads(line[len(_RESULT_MARKER) :])
        return {"status": f"failed: timed out after {timeout:g} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(_RESULT_MARKER):
            return json.loads(line[len(_RESULT_MARKER) :])
    if done.returncode == -9:
        return {"status": "failed: row process killed by SIGKILL (out of host memory?)"}
    lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
    last = lines[-1].replace("|", "/")[:160] if lines else "no output"
    if _is_oom(Exception(done.stderr)):
        return {"status": f"does not fit: out of device memory ({last})"}
    return {"status": f"failed: row process exited with status {done.returncode} ({last})"}


# ---------------------------------------------------------------------------------------------
# The table


def _gib(n_bytes: float) -> str:
    gib = n_bytes / GIB
    return f"{gib:,.0f}" if gib >= 1000 else f"{gib:.3g}"


def sharding_strategy(mesh: list[int]) -> str:
    """The mesh in JAX terms with the FSDP strategy it corresponds to."""
    data, fsdp, tensor = mesh
    if data * fsdp * tensor == 1:
        name = "single device"
    elif fsdp > 1 and data > 1:
        name = "data x fsdp (HYBRID_SHARD)"
    elif fsdp > 1:
        name = "fsdp (FULL_SHARD)"
    elif data > 1:
        name = "replicated (NO_SHARD, DDP)"
    else:
        name = "replicated"
    return name + (" + tensor parallel" if tensor > 1 else "")


def _rates(
    spec: dict[str, Any],
    model: ModelConfig,
    kind: str,
    n_devices: int,
    step_time: float,
    peak_tflops: float | None,
) -> dict[str, float]:
    """mpt_jax.metrics' rates (llm-foundry's formula) for one step of spec's global batch."""
    peak = peak_tflops * 1e12 if peak_tflops else metrics.peak_flops(kind, spec["precision"])
    throughput = metrics.Throughput.from_config(
        model, spec["seq"], n_devices=n_devices, peak=peak, remat=spec["remat"]
    )
    throughput.update(step_time, spec["global_batch"], spec["global_batch"] * spec["seq"])
    return throughput.compute()


def table_row(
    spec: dict[str, Any], result: dict[str, Any], peak_tflops: float | None
) -> dict[str, Any]:
    """Raw values by column (None: unknown); rates from mpt_jax.metrics (llm-foundry's formula)."""
    model = ModelConfig.from_dict(spec["model"])
    mesh = result.get("mesh")
    kind = result.get("device_kind")
    skipped = spec["global_batch"] % spec["microbatch"] != 0
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update(
        {
            "Model": spec["label"],
            "SeqLen (T)": spec["seq"],
            "# Devices": result.get("n_devices"),
            "Device": kind,
            "GlobalBatchSize": spec["global_batch"],
            "GradAccum": None if skipped else spec["global_batch"] // spec["microbatch"],
            "Precision": spec["precision"],
            "MP Mode": spec["mixed_precision"],
            "Mesh (data x fsdp x tensor)": _mesh_text(mesh or _requested_mesh(spec)),
            "Sharding Strategy": None if mesh is None else sharding_strategy(mesh),
            "Activation Checkpointing": spec["remat"],
            "Loss chunk": spec["loss_chunk"] or "none",
            "NumParams": count_params(model),
            "Status": result["status"],
        }
    )
    if mesh is not None:  # llm-foundry's MicroBatchSize is per device (per batch shard here)
        row["MicroBatchSize"] = spec["microbatch"] / (mesh[0] * mesh[1])
        if float(row["MicroBatchSize"]).is_integer():
            row["MicroBatchSize"] = int(row["MicroBatchSize"])
    if "peak_bytes" in result:
        row["Peak memory (GiB/device)"] = _gib(result["peak_bytes"])
    elif result.get("estimated_bytes") is not None:
        row["Peak memory (GiB/device)"] = f"{_gib(result['estimated_bytes'])} (est.)"
    if result["status"] != "ok":
        return row
    step_time = statistics.median(result["step_times"])
    rates = _rates(spec, model, kind, result["n_devices"], step_time, peak_tflops)
    row.update(
        {
            "MFU": None if "mfu" not in rates else 100 * rates["mfu"],
            "HFU": None if "hfu" not in rates else 100 * rates["hfu"],
            "TFLOP/s/device": rates["tflops_per_device"],
            "Throughput (S/s)": rates["seqs_per_s"],
            "Throughput (T/s)": rates["tokens_per_s"],
            "Throughput (T/s/device)": rates["tokens_per_s_per_device"],
            "Step time (s)": rates["step_time_s"],
        }
    )
    return row


def aot_table_row(
    spec: dict[str, Any], result: dict[str, Any], peak_tflops: float | None
) -> dict[str, Any]:
    """An --aot row by AOT_COLUMNS: XLA's memory estimate, the program's work, the prediction."""
    model = ModelConfig.from_dict(spec["model"])
    row: dict[str, Any] = dict.fromkeys(AOT_COLUMNS)
    row.update(
        {
            "Model": spec["label"],
            "SeqLen (T)": spec["seq"],
            "Device": result.get("device_kind"),
            "GlobalBatchSize": spec["global_batch"],
            "Precision": spec["precision"],
            "MP Mode": spec["mixed_precision"],
            "Layers": "scanned" if model.scan_layers else "unrolled",
            "Activation Checkpointing": spec["remat"],
            "Loss chunk": spec["loss_chunk"] or "none",
            "NumParams": count_params(model),
            "Status": result["status"],
        }
    )
    if result.get("estimated_bytes") is not None:
        row["XLA memory (GiB/device)"] = _gib(result["estimated_bytes"])
    work = result.get("aot")
    if work is None:
        return row
    step_time = work["seconds"]["total"]
    rates = _rates(spec, model, result["device_kind"], 1, step_time, peak_tflops)
    row.update(
        {
            "Matmul TFLOP": work["matmul_flops"] / 1e12,
            "Attention TFLOP": work["attention_flops"] / 1e12,
            "Copies GB": work["copies_bytes"] / 1e9,
            "Elementwise GB": work["elementwise_bytes"] / 1e9,
            "Predicted step (s)": step_time,
            "Predicted T/s": rates["tokens_per_s"],
            "Predicted MFU": None if "mfu" not in rates else 100 * rates["mfu"],
        }
    )
    return row


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _md_cell(column: str, value: Any) -> str:
    if value is None:
        return "-"
    if not isinstance(value, float):
        return str(value)
    if column in ("MFU", "HFU", "Predicted MFU"):
        return f"{value:.2f}"
    if column.startswith("Throughput") or column == "Predicted T/s":
        return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"
    return f"{value:.3g}"


def to_markdown(rows: list[dict[str, Any]], columns: tuple[str, ...] = COLUMNS) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_md_cell(c, row[c]) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict[str, Any]], columns: tuple[str, ...] = COLUMNS) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_csv_cell(row[c]) for c in columns])
    return out.getvalue()


def _output_dir(path: str, argument: str = "--out") -> Path:
    """--out or --profile, created before any row runs (a bad path fails at once)."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ArgError(argument, f"{path}: cannot create the folder ({e.strerror})") from e
    return out


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.judge is not None:
        try:
            print("\n".join(judge(Path(args.judge))))
        except ArgError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    if args._row is not None:  # the row subprocess
        result = run_row(json.loads(args._row))
        print(_RESULT_MARKER + json.dumps(result), flush=True)
        return 0
    try:
        specs = plan_rows(args)
        out = None if args.out is None else _output_dir(args.out)
        if args.profile is not None:
            _output_dir(args.profile, "--profile")
    except ArgError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.aot and args.in_process:  # before jax opens a backend: the plugin, no GPU
        aot.use_plugin(args.aot_plugin)
    make_row, columns = (aot_table_row, AOT_COLUMNS) if args.aot else (table_row, COLUMNS)
    rows, results = [], []
    for i, spec in enumerate(specs, 1):
        start = time.perf_counter()
        if spec["global_batch"] % spec["microbatch"]:
            reason = f"microbatch {spec['microbatch']} does not divide global batch"
            result = {"status": f"skipped: {reason} {spec['global_batch']}"}
        elif args.in_process:
            result = run_row(spec)
        else:
            result = run_isolated(spec, args.row_timeout)
        rows.append(make_row(spec, result, args.peak_tflops))
        results.append(result)
        mesh = _mesh_text(_requested_mesh(spec))
        print(
            f"[{i}/{len(specs)}] {spec['label']} seq {spec['seq']} batch {spec['global_batch']}"
            f" micro {spec['microbatch']} mesh {mesh} {spec['precision']}"
            f" {spec['mixed_precision']} remat {spec['remat']}"
            f" loss chunk {spec['loss_chunk'] or 'none'}:"
            f" {result['status']} ({time.perf_counter() - start:.1f} s)",
            file=sys.stderr,
            flush=True,
        )
    known = next((r for r in rows if r["Device"] is not None), None)
    for row in rows:  # rows skipped before any device was seen: the machine is the same
        if known is not None and row["Device"] is None:
            row["Device"], row["# Devices"] = known["Device"], known["# Devices"]
    markdown = to_markdown(rows, columns)
    if out is not None:
        command = shlex.join(
            ["python", "tools/bench_train.py", *(sys.argv[1:] if argv is None else argv)]
        )
        caption = (
            f"`{command}`: jax {importlib.metadata.version('jax')}, Python "
            f"{sys.version.split()[0]}, {time.strftime('%Y-%m-%d')}\n\n"
        )
        write_atomic(out / "bench_train.md", caption + markdown)
        write_atomic(out / "bench_train.csv", to_csv(rows, columns))
        for spec, result in zip(specs, results, strict=True):
            if "aot" in result:
                report = f"# {row_label(spec)}: compiled for {result['device_kind']}\n\n"
                write_atomic(out / f"{row_label(spec)}.aot.md", report + result["aot"]["report"])
    print(markdown, end="")
    for spec, result in zip(specs, results, strict=True):
        if spec["profile_dir"] and result["status"] == "ok":
            print(f"\n## Profile: {Path(spec['profile_dir']).name}\n")
            summary = _profile_summary(spec, result.get("profile_error"))
            print(summary, end="")
    return 0


def _profile_summary(spec: dict[str, Any], error: str | None) -> str:
    """The row's summary (also written to its profile_dir/summary.md), or one line why not."""
    trace_dir = spec["profile_dir"]
    if error is not None:
        return f"no profile: {error}\n"
    try:
        summary = profiling.summarize_trace(trace_dir, steps=spec["profile_steps"])
        text = profiling.format_summary(summary)
    except (OSError, ValueError) as e:
        return f"no profile: {' '.join(str(e).split())}\n"
    write_atomic(Path(trace_dir) / "summary.md", text)
    return text


if __name__ == "__main__":
    sys.exit(main())
