"""Training FLOPs, MFU/HFU and throughput as llm-foundry counts them; JSONL/TensorBoard/W&B logs.

FLOPs follow llm-foundry's `ComposerMPTCausalLM.flops_per_batch` and the benchmark README, so
MFU numbers here are comparable with llm-foundry's published tables: 6 FLOPs per parameter per
token (forward + backward) plus 12 * n_layers * d_model * S^2 per sequence for attention, which
is NOT halved for causal masking. Peaks are composer's `GPU_AVAILABLE_FLOPS` (dense, per device).

jax is imported lazily (only by `local_device_kind`/`device_peak_flops`) so that tools which only
read or write logs do not pay for it.
"""

from __future__ import annotations

import collections
import json
import math
import operator
import re
import secrets
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mpt_jax import run_log
from mpt_jax.atomic_write import write_atomic
from mpt_jax.config import ModelConfig, count_params

# ---------------------------------------------------------------------------------------------
# FLOPs


def flops_per_sequence(cfg: ModelConfig, seq_len: int) -> int:
    """Model FLOPs for one training sequence (forward + backward), as llm-foundry counts them."""
    if seq_len <= 0:
        raise ValueError(f"seq_len must be > 0, got {seq_len}")
    n_params = count_params(cfg)
    # An embedding lookup costs no FLOPs; when tied, wte doubles as the output projection and
    # stays counted. wpe stays counted either way, as in llm-foundry.
    if not cfg.tie_word_embeddings:
        n_params -= cfg.vocab_size * cfg.d_model
    dense = 2 * n_params * seq_len
    attention = cfg.n_layers * 2 * 2 * cfg.d_model * seq_len**2  # QK^T and AV, full S^2
    return 3 * (dense + attention)


_REMAT = ("none", "dots_saveable", "full")


def hardware_flops_per_sequence(cfg: ModelConfig, seq_len: int, remat: str) -> int:
    """FLOPs actually executed: 4/3 of the model FLOPs under full remat (one extra forward)."""
    if remat not in _REMAT:
        raise ValueError(f"remat must be one of {', '.join(_REMAT)}, got {remat!r}")
    flops = flops_per_sequence(cfg, seq_len)
    # dots_saveable keeps every matmul output, so only cheap elementwise ops are recomputed.
    return flops * 4 // 3 if remat == "full" else flops


# ---------------------------------------------------------------------------------------------
# Peak FLOP/s per device

# Dense (no sparsity) peak FLOP/s per device by family and matmul dtype; composer's
# GPU_AVAILABLE_FLOPS for GPUs, Google's per-chip bf16 peaks for TPUs. fp32 follows composer
# (plain FP32, not TF32) and is only given where composer gives it (H200: same chip as H100 SXM).
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "a100": {"bf16": 312e12, "fp32": 19.5e12},
    "h100-sxm": {"bf16": 1.979e15 / 2, "fp32": 67e12},
    "h100-pcie": {"bf16": 1.513e15 / 2, "fp32": 51e12},
    "h200": {"bf16": 1.979e15 / 2, "fp32": 67e12},
    "tpu-v4": {"bf16": 275e12},
    "tpu-v5e": {"bf16": 197e12},
    "tpu-v5p": {"bf16": 459e12},
    "tpu-v6e": {"bf16": 918e12},
}

_PRECISION_DTYPE = {"amp_bf16": "bf16", "pure_bf16": "bf16", "bf16": "bf16", "fp32": "fp32"}

# jax reports v5e as 'TPU v5 lite' and v5p as 'TPU v5'; 'e'/'p' suffixes are accepted too.
_TPU_FAMILY = {
    ("v4", ""): "tpu-v4",
    ("v5", "lite"): "tpu-v5e",
    ("v5", "e"): "tpu-v5e",
    ("v5", ""): "tpu-v5p",
    ("v5", "p"): "tpu-v5p",
    ("v6", "lite"): "tpu-v6e",
    ("v6", "e"): "tpu-v6e",
}
_TPU_KIND = re.compile(r"tpu\s*(v\d+)\s*(lite|e|p)?\b")


def device_family(device_kind: str) -> str | None:
    """The PEAK_FLOPS key for a `jax.Device.device_kind` string; None if not in the table."""
    kind = device_kind.lower()
    if "nvl" in kind:
        # H100/H200 NVL run at a lower power limit than SXM; their peak is not in the table.
        return None
    if "h200" in kind:  # also GH200, whose Hopper die has the H100 SXM / H200 peak
        return "h200"
    if "h100" in kind:
        return "h100-pcie" if "pcie" in kind else "h100-sxm"
    if "a100" in kind:  # SXM4 and PCIe A100s share the 312 TFLOP/s bf16 peak
        return "a100"
    match = _TPU_KIND.search(kind)
    if match:
        return _TPU_FAMILY.get((match.group(1), match.group(2) or ""))
    return None


def peak_flops(device_kind: str, precision: str) -> float | None:
    """Peak FLOP/s of one device for a run precision ('amp_bf16', 'pure_bf16', 'fp32')."""
    if precision not in _PRECISION_DTYPE:
        raise ValueError(
            f"precision must be one of {', '.join(_PRECISION_DTYPE)}, got {precision!r}"
        )
    family = device_family(device_kind)
    if family is None:
        return None
    return PEAK_FLOPS[family].get(_PRECISION_DTYPE[precision])


def local_device_kind() -> str:
    """`device_kind` of jax's first device (imports jax)."""
    import jax

    return jax.devices()[0].device_kind


def device_peak_flops(precision: str, device_kind: str | None = None) -> float | None:
    """Peak FLOP/s per device of this machine's accelerator; None on CPU or unknown chips."""
    return peak_flops(local_device_kind() if device_kind is None else device_kind, precision)


def mfu(
    seqs_per_second: float, flops_per_seq: float, n_devices: int, peak: float | None
) -> float | None:
    """Model FLOPs utilization as a fraction (0.464, not 46.4); None when the peak is unknown."""
    if n_devices <= 0:
        raise ValueError(f"n_devices must be > 0, got {n_devices}")
    if peak is None or peak <= 0:
        return None
    return seqs_per_second * flops_per_seq / (n_devices * peak)


# ---------------------------------------------------------------------------------------------
# Throughput over a sliding window of steps


class Throughput:
    """Tokens/s, sequences/s, TFLOP/s per device, MFU and HFU over the last `window_size` steps."""

    def __init__(
        self,
        *,
        flops_per_seq: float,
        n_devices: int = 1,
        peak: float | None = None,
        hardware_flops_per_seq: float | None = None,
        window_size: int = 10,  # llm-foundry's speed_monitor default
    ) -> None:
        if n_devices <= 0 or window_size <= 0:
            raise ValueError("n_devices and window_size must be > 0")
        self.flops_per_seq = flops_per_seq
        self.hardware_flops_per_seq = hardware_flops_per_seq
        self.n_devices = n_devices
        self.peak = peak
        self.window_size = window_size
        self._steps: collections.deque[tuple[float, int, int]] = collections.deque(
            maxlen=window_size
        )

    @classmethod
    def from_config(
        cls,
        cfg: ModelConfig,
        seq_len: int,
        *,
        n_devices: int,
        peak: float | None,
        remat: str = "none",
        window_size: int = 10,
    ) -> Throughput:
        """A Throughput with llm-foundry's FLOP counts for `cfg` at `seq_len`."""
        return cls(
            flops_per_seq=flops_per_sequence(cfg, seq_len),
            hardware_flops_per_seq=hardware_flops_per_sequence(cfg, seq_len, remat),
            n_devices=n_devices,
            peak=peak,
            window_size=window_size,
        )

    def update(self, step_time_s: float, seqs: int, tokens: int) -> None:
        """Record one optimizer step: its wall time and the global sequences/tokens it consumed."""
        if not step_time_s > 0:
            raise ValueError(f"step_time_s must be > 0, got {step_time_s}")
        self._steps.append((float(step_time_s), int(seqs), int(tokens)))

    def reset(self) -> None:
        """Forget the window (e.g. after an eval or checkpoint pause)."""
        self._steps.clear()

    def compute(self) -> dict[str, float]:
        """Window rates; empty before the first step, no mfu/hfu when the peak is unknown."""
        if not self._steps:
            return {}
        seconds = sum(s[0] for s in self._steps)
        seqs_per_s = sum(s[1] for s in self._steps) / seconds
        tokens_per_s = sum(s[2] for s in self._steps) / seconds
        out = {
            "step_time_s": seconds / len(self._steps),
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_device": tokens_per_s / self.n_devices,
            "seqs_per_s": seqs_per_s,
            "tflops_per_device": seqs_per_s * self.flops_per_seq / self.n_devices / 1e12,
        }
        model_util = mfu(seqs_per_s, self.flops_per_seq, self.n_devices, self.peak)
        if model_util is not None:
            out["mfu"] = model_util
            hw = self.hardware_flops_per_seq
            if hw is not None:
                out["hfu"] = mfu(seqs_per_s, hw, self.n_devices, self.peak)
        return out


# ---------------------------------------------------------------------------------------------
# Logging


def _as_number(key: str, value: Any) -> int | float:
    """A float, or an int for integer values (counts: tokens, skipped steps, a checkpoint's
    step), which metrics.jsonl then writes as `256`, not `256.0`."""
    # Strings are refused even when numeric: a str metric is a caller bug, not a number.
    if isinstance(value, str | bytes):
        raise TypeError(f"metric {key!r}: expected a number, got {value!r}")
    try:
        return operator.index(value)  # ints, also numpy/jax integer scalars
    except TypeError:
        pass
    try:
        return float(value)  # also numpy/jax scalars and size-1 arrays
    except (TypeError, ValueError) as e:
        raise TypeError(f"metric {key!r}: expected a number, got {value!r}") from e


def _nonfinite_name(x: float) -> str:
    if math.isnan(x):
        return "nan"
    return "inf" if x > 0 else "-inf"


def _wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of a run folder, made on first use and kept in RUN_DIR/wandb_run_id."""
    path = run_dir / "wandb_run_id"
    if path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)
    write_atomic(path, run_id + "\n")
    return run_id


class MetricsLogger:
    """Per-step scalars to RUN_DIR/metrics.jsonl, TensorBoard (tensorboardX) and optionally W&B.

    Each `log` call appends one JSON object `{"step": N, "<key>": <float>, ...}` and flushes it.
    JSON has no NaN/Infinity, so a non-finite value is written as `null` and named in a
    `"nonfinite"` object mapping its key to "nan", "inf" or "-inf", e.g.
    `{"step": 7, "loss": null, "lr": 0.001, "nonfinite": {"loss": "nan"}}`. TensorBoard and W&B
    receive the raw non-finite floats, which both display. A `None` value (unknown, e.g. MFU on
    CPU) is left out of every sink. A readable line (`format_metrics`) goes to stdout with
    `console=True`, else to the run log only (`run_log.note`). With `enabled=False` (non-zero
    processes) nothing is created or written. `resumed_at`: the step a run starts from (0 for a
    fresh start), whose later steps an earlier attempt may have logged to TensorBoard.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        wandb_project: str | None = None,
        wandb_mode: str = "offline",
        config: dict[str, Any] | None = None,
        console: bool = False,
        resumed_at: int | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.console = console
        self.path = self.run_dir / "metrics.jsonl"
        self.enabled = enabled
        self._file = None
        self._tb = None
        self._wandb_run = None
        self._closed = False
        self.lines = 0  # in metrics.jsonl: a checkpoint records it (resumes cut back to it)
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self.lines = self.path.read_bytes().count(b"\n")
        # Append, so a resumed run continues the same file.
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if tensorboard:
            try:
                SummaryWriter = _summary_writer_class()
            except ImportError:
                warnings.warn(
                    "tensorboardX is not installed; skipping TensorBoard logging", stacklevel=2
                )
            else:
                # a run resumed at step N logs steps N+1.. again: TensorBoard hides the earlier
                # attempts' events from there on (its SessionLog START purge), as
                # metrics.jsonl is cut back; a fresh start (N = 0) hides every earlier one
                self._tb = SummaryWriter(
                    logdir=str(self.run_dir / "tensorboard"),
                    purge_step=None if resumed_at is None else resumed_at + (resumed_at > 0),
                    # the file is named by the second it was made in: another attempt started
                    # within that second would truncate it; nanoseconds keep attempts apart,
                    # and in order (TensorBoard reads a folder's event files by name)
                    filename_suffix=f".{time.time_ns()}",
                )
        if wandb_project:
            try:
                import wandb
            except ImportError:
                warnings.warn(
                    "wandb is not installed; skipping Weights & Biases logging", stacklevel=2
                )
            else:
                # one W&B run per run folder: a resumed run continues it instead of starting
                # another (steps it logs again below W&B's last step are dropped by W&B)
                self._wandb_run = wandb.init(
                    project=wandb_project,
                    mode=wandb_mode,
                    dir=str(self.run_dir),
                    config=config,
                    id=_wandb_run_id(self.run_dir),
                    resume="allow",
                )

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Write one step's scalars to every enabled sink."""
        if not self.enabled:
            return
        if self._closed:
            raise RuntimeError(f"MetricsLogger for {self.run_dir} is closed")
        step = operator.index(step)
        values: dict[str, int | float] = {}
        record: dict[str, Any] = {"step": step}
        for key, value in metrics.items():
            if key in ("step", "nonfinite"):
                raise ValueError(f"metric name {key!r} is reserved")
            if value is None:  # unknown (e.g. mfu on CPU): null in the JSON line, nothing elsewhere
                record[key] = None
            else:
                values[key] = _as_number(key, value)
        nonfinite: dict[str, str] = {}
        for key, x in values.items():
            if math.isfinite(x):
                record[key] = x
            else:
                record[key] = None
                nonfinite[key] = _nonfinite_name(x)
        if nonfinite:
            record["nonfinite"] = nonfinite
        # One write per line, then flush: a crash loses at most the line being written.
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        self.lines += 1
        if self._tb is not None:
            for key, x in values.items():
                self._tb.add_scalar(key, x, global_step=step)
            self._tb.flush()
        if self._wandb_run is not None:
            self._wandb_run.log(values, step=step)
        line = format_metrics({"step": step, **values})
        if self.console:
            print(line, flush=True)
        else:
            run_log.note(line)

    def close(self) -> None:
        """Flush and close every sink; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# per-step details that metrics.jsonl keeps and a console line leaves out
_QUIET = {
    "tokens",
    "tflops_per_device",
    "step_time",
    "data_wait",
    "skipped_steps",
    "hfu",
    "memory_gib",
}


def format_metrics(metrics: Mapping[str, Any], step: int | None = None) -> str:
    """One console line: step, losses, lr, grad norm, tokens/s, MFU, checkpoint saves and
    rollbacks, each only when present, then any other value as `key value`."""
    step = metrics.get("step", step)
    parts = [] if step is None else [f"step {int(step)}"]
    formats = {
        "loss": "loss {:.4f}",
        "val_loss": "val_loss {:.4f}",
        "val_perplexity": "val_ppl {:.2f}",
        "lr": "lr {:.3e}",
        "grad_norm": "grad_norm {:.3f}",
        "tokens_per_s": "{:,.0f} tok/s",
        "mfu": "mfu {:.1%}",
        "peak_memory_gib": "peak {:.1f} GiB",
        "remaining_s": "{} left",
        "checkpoint_step": "checkpoint {:.0f} saved",
        "checkpoint_blocked_s": "blocked {:.2f} s",
        "checkpoint_save_s": "written in {:.2f} s",
        "rollback_to_step": "rolled back to step {:.0f}",
        "rollback_skipped_batches": "{:.0f} batches skipped",
    }
    for key, fmt in formats.items():
        value = metrics.get(key)
        if value is not None:
            shown = _duration(value) if key == "remaining_s" else float(value)
            parts.append(fmt.format(shown))
    for key, value in metrics.items():
        if key not in formats and key not in _QUIET and key != "step" and value is not None:
            if key.startswith(("val_loss/", "val_perplexity/")):  # data.eval's sets, as above
                name, label = key.split("/", 1)
                shown, number = formats[name].split(" ", 1)
                parts.append(f"{shown}/{label} {number.format(value)}")
                continue
            parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return " | ".join(parts)


def _duration(seconds: float) -> str:
    """2h05m, 12m04s, 45s."""
    if not math.isfinite(seconds):
        return "?"
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without torch unless torch is already loaded."""
    # tensorboardX imports torch (3-4 s per process start) only to accept torch tensors, which
    # are never logged here; that matters for restarts after preemption
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError, which it handles
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide:
            del sys.modules["torch"]
    return SummaryWriter
