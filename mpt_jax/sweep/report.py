"""A sweep's results: final and best metrics per member from the run folders, as `results.csv`,
a Markdown table (with means over seeds) and PNG plots."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mpt_jax.atomic_write import write_atomic
from mpt_jax.sweep.runner import eval_path, is_finished
from mpt_jax.sweep.spec import SEED_KEY, Member, Sweep

# the metric columns every member has, in table order: (column, what it is)
BASE_METRICS = (
    ("steps", "optimizer steps logged"),
    ("train_loss", "last logged training loss"),
    ("best_train_loss", "lowest logged training loss"),
    ("val_loss", "validation loss at the end"),
    ("best_val_loss", "lowest validation loss of the run"),
    ("tokens_per_s", "median training throughput (the first step of each start left out)"),
    ("mfu", "median model FLOPs utilization (llm-foundry's formula; none on CPU)"),
    ("loss_diff_max", "largest |train loss - the reference member's| at a common step"),
    ("loss_diff_last", "the same at the last common step"),
)
PLOTTED = ("val_loss", "train_loss", "tokens_per_s", "mfu")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill; the trainer rewrites it on resume
    return rows


def _finite(values: Sequence[Any]) -> list[float]:
    return [float(v) for v in values if isinstance(v, int | float) and math.isfinite(v)]


def read_log(member: Member) -> list[dict[str, Any]]:
    """The member's metrics.jsonl rows ([] before its run has logged)."""
    return _read_jsonl(member.run_dir / "metrics.jsonl")


def curves(log: Sequence[Mapping[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """(step, value) series of train loss and val loss from a member's log rows."""
    out: dict[str, dict[int, float]] = {"loss": {}, "val_loss": {}}
    for row in log:
        for key, series in out.items():
            value = row.get(key)
            if value is None and key in row.get("nonfinite", {}):
                value = float(row["nonfinite"][key])  # the logger writes NaN as null + a name
            if isinstance(value, int | float) and "step" in row:
                series[int(row["step"])] = float(value)
    return {key: sorted(series.items()) for key, series in out.items()}


def member_metrics(
    sweep: Sweep, member: Member, rows: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """Final and best metrics of one member from its log rows (and its eval results)."""
    train = [r for r in rows if "loss" in r]
    losses = _finite([r["loss"] for r in train])
    logged = curves(rows)["loss"]
    val = _finite([r["val_loss"] for r in rows if "val_loss" in r])
    # the first step of each start (compilation) has null rates: left out with the NaNs
    rates = _finite([r.get("tokens_per_s") for r in train])
    mfus = _finite([r.get("mfu") for r in train])
    out: dict[str, Any] = {
        "steps": max((int(r["step"]) for r in rows if "step" in r), default=0),
        # the last one logged, NaN or infinite included: a member that diverged says so
        "train_loss": logged[-1][1] if logged else None,
        "best_train_loss": min(losses) if losses else None,
        "val_loss": val[-1] if val else None,
        "best_val_loss": min(val) if val else None,
        "tokens_per_s": statistics.median(rates) if rates else None,
        "mfu": statistics.median(mfus) if mfus else None,
    }
    if sweep.eval is not None and eval_path(member).is_file():
        out.update(eval_metrics(json.loads(eval_path(member).read_text())))
    return out


def eval_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """Flat columns from `mpt-jax eval` JSON: ICL accuracies, gauntlet scores, perplexity."""
    out: dict[str, float] = {}
    for task in results.get("icl", []):
        out[f"icl/{task['key']}"] = task["accuracy"]
    gauntlet = results.get("gauntlet") or {}
    for name, score in {**gauntlet.get("categories", {}), **gauntlet.get("averages", {})}.items():
        out[f"gauntlet/{name}"] = score
    for r in results.get("perplexity", []):
        out[f"eval_loss@{r['seq_len']}"] = r["loss"]
    return out


def collect(
    sweep: Sweep,
    logs: Mapping[str, Sequence[Mapping[str, Any]]],
    status: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """One row per member: name, swept values, status and metrics; logs by member name."""
    rows = []
    for member in sweep.members:
        state = (status or {}).get(member.name)
        if state is None:
            if is_finished(sweep, member):
                state = "finished"
            elif (member.run_dir / "metrics.jsonl").exists():
                state = "unfinished"
            else:
                state = "not started"
        row = {"member": member.name}
        row.update({key: member.params.get(key) for key in sweep.axes})
        row["status"] = state
        row.update(member_metrics(sweep, member, logs[member.name]))
        rows.append(row)
    if sweep.reference is not None:
        reference_loss = curves(logs[sweep.reference])["loss"]
        for member, row in zip(sweep.members, rows, strict=True):
            row.update(loss_deviation(curves(logs[member.name])["loss"], reference_loss))
    return rows


def loss_deviation(
    series: Sequence[tuple[int, float]], reference: Sequence[tuple[int, float]]
) -> dict[str, float | None]:
    """Largest and last |train loss - reference train loss| over the steps both logged."""
    ref = dict(reference)
    diffs = [abs(loss - ref[step]) for step, loss in series if step in ref]
    if not diffs:
        return {"loss_diff_max": None, "loss_diff_last": None}
    # a NaN on either side is the largest deviation there is
    worst = max(d if math.isfinite(d) else math.inf for d in diffs)
    return {"loss_diff_max": worst, "loss_diff_last": diffs[-1]}


def columns(sweep: Sweep, rows: Sequence[Mapping[str, Any]]) -> list[str]:
    extra = sorted({k for r in rows for k in r} - {"member", "status", *sweep.axes} - _BASE)
    return ["member", *sweep.axes, "status", *(k for k, _ in BASE_METRICS), *extra]


_BASE = {k for k, _ in BASE_METRICS}


def write_csv(path: Path, cols: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(cols), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(row.get(k)) for k in cols})
    write_atomic(path, buf.getvalue())


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, list | dict | bool):
        return json.dumps(value)
    return value


def _fmt(value: Any, column: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return json.dumps(value) if isinstance(value, list | dict | bool) else str(value)
    if isinstance(value, int):
        return f"{value:,}" if column in ("steps", "tokens_per_s") else str(value)
    if column == "tokens_per_s":
        return f"{value:,.0f}"
    if column == "mfu":
        return f"{100 * value:.1f}%"
    return f"{value:.4g}"


def markdown(sweep: Sweep, cols: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    """The members table (best validation loss in bold) and, with several seeds, their means."""
    cols = [c for c in cols if c == "member" or any(r.get(c) is not None for r in rows)]
    best = min((r["val_loss"] for r in rows if r.get("val_loss") is not None), default=None)
    lines = [f"| {' | '.join(cols)} |", f"|{'---|' * len(cols)}"]
    for row in rows:
        cells = []
        for c in cols:
            text = _fmt(row.get(c), c)
            if c == "val_loss" and best is not None and row.get(c) == best:
                text = f"**{text}**"
            cells.append(text)
        lines.append(f"| {' | '.join(cells)} |")
    out = [f"## Sweep {sweep.name}: {len(rows)} members\n", "\n".join(lines)]
    seeds = {r.get(SEED_KEY) for r in rows} - {None}
    if len(seeds) > 1:
        out += [
            f"\n### Mean ± standard deviation over {len(seeds)} seeds\n",
            _seed_table(sweep, rows),
        ]
    return "\n".join(out) + "\n"


def _seed_table(sweep: Sweep, rows: Sequence[Mapping[str, Any]]) -> str:
    keys = [a for a in sweep.axes if a != SEED_KEY]
    metrics = [m for m in ("val_loss", "train_loss", "tokens_per_s", "mfu") if _any(rows, m)]
    metrics += sorted({k for r in rows for k in r if k.startswith(("icl/", "gauntlet/"))})
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(json.dumps([row.get(k) for k in keys]), []).append(row)
    lines = [
        f"| {' | '.join([*keys, 'n', *metrics])} |",
        f"|{'---|' * (len(keys) + 1 + len(metrics))}",
    ]
    for members in groups.values():
        cells = [_fmt(members[0].get(k)) for k in keys] + [str(len(members))]
        for m in metrics:
            values = _finite([r.get(m) for r in members])
            if not values:
                cells.append("-")
                continue
            cell = _fmt(statistics.mean(values), m)
            if len(values) > 1:  # one value has no spread
                cell += f" ± {_fmt(statistics.stdev(values), m)}"
            if len(values) < len(members):  # seeds without this metric (unfinished, failed)
                cell += f" (n={len(values)})"
            cells.append(cell)
        lines.append(f"| {' | '.join(cells)} |")
    return "\n".join(lines)


def _any(rows: Sequence[Mapping[str, Any]], column: str) -> bool:
    return any(r.get(column) is not None for r in rows)


# ---------------------------------------------------------------------------------------------
# Plots


def plot(
    sweep: Sweep,
    rows: Sequence[Mapping[str, Any]],
    logs: Mapping[str, Sequence[Mapping[str, Any]]],
    out_dir: Path,
) -> list[Path]:
    """loss_curves.png (every member's curves overlaid) and metrics_vs_<key>.png per swept key."""
    try:
        import matplotlib
    except ImportError as e:
        raise RuntimeError(
            "plots need matplotlib: pip install 'mpt-jax[sweep]' (results.csv and "
            "results.md were written)"
        ) from e
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    paths = [_loss_curves(plt, sweep, logs, out_dir / "loss_curves.png")]
    metrics = [m for m in PLOTTED if _any(rows, m)]
    metrics += sorted({k for r in rows for k in r if k.startswith(("icl/", "gauntlet/"))})
    plotted: set[tuple[int, ...]] = set()
    for key in sweep.axes:
        # a key zipped with an earlier one splits the members the same way: one plot is enough
        labels = [json.dumps(r.get(key)) for r in rows]
        split = tuple(labels.index(label) for label in labels)
        if key == SEED_KEY or len(set(labels)) < 2 or not metrics or split in plotted:
            continue
        plotted.add(split)
        name = key.replace(".", "_")
        paths.append(
            _metrics_vs(plt, sweep, rows, key, metrics, out_dir / f"metrics_vs_{name}.png")
        )
    return paths


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)
    return path


def _loss_curves(
    plt, sweep: Sweep, logs: Mapping[str, Sequence[Mapping[str, Any]]], path: Path
) -> Path:
    """Colour per setting of the swept keys, line style per seed."""
    fig, ax = plt.subplots(figsize=(8, 5))
    settings: dict[str, int] = {}
    seeds: dict[Any, int] = {}
    tail: list[float] = []
    for member in sweep.members:
        setting = json.dumps({k: v for k, v in member.params.items() if k != SEED_KEY})
        color = plt.cm.tab10(settings.setdefault(setting, len(settings)) % 10)
        style = ("-", "--", ":", "-.")[
            seeds.setdefault(member.params.get(SEED_KEY), len(seeds)) % 4
        ]
        series = curves(logs[member.name])
        if series["loss"]:
            steps, losses = zip(*series["loss"], strict=True)
            ax.plot(steps, losses, style, color=color, lw=1.2, label=member.name)
            tail += [x for x in losses[len(losses) // 10 :] if math.isfinite(x)]
        if series["val_loss"]:
            steps, losses = zip(*series["val_loss"], strict=True)
            ax.plot(steps, losses, "o", color=color, ms=5, mfc="none")
    if tail:  # leave the first steps' high loss off the scale
        low, high = min(tail), max(tail)
        pad = 0.05 * (high - low or 1.0)
        ax.set_ylim(low - pad, high + pad)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (lines: train; circles: validation)")
    ax.set_title(f"sweep {sweep.name}")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2 if len(sweep.members) > 8 else 1)
    path = _save(fig, path)
    plt.close(fig)
    return path


def _metrics_vs(
    plt, sweep: Sweep, rows: Sequence[Mapping[str, Any]], key: str, metrics: list[str], path: Path
) -> Path:
    """One panel per metric against `key`; a line per setting of the other swept keys, one
    point per seed, the line through the seed means."""
    others = [a for a in sweep.axes if a not in (key, SEED_KEY)]
    values = [r.get(key) for r in rows]
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    positive = numeric and all(v > 0 for v in values)
    log_x = positive and max(values) / min(values) >= 10
    categories = list(dict.fromkeys(json.dumps(v) for v in values))

    def x_of(v: Any) -> float:
        return float(v) if numeric else float(categories.index(json.dumps(v)))

    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        label = ", ".join(f"{o.split('.')[-1]}={_fmt(row.get(o))}" for o in others)
        groups.setdefault(label, []).append(row)
    n = len(metrics)
    cols = min(n, 3)
    fig, axes = plt.subplots(
        -(-n // cols), cols, figsize=(4.2 * cols, 3.4 * -(-n // cols)), squeeze=False
    )
    for ax, metric in zip(axes.flat, metrics, strict=False):
        for i, (label, members) in enumerate(groups.items()):
            color = plt.cm.tab10(i % 10)
            points = [(x_of(r.get(key)), r.get(metric)) for r in members]
            points = [(x, y) for x, y in points if isinstance(y, int | float) and math.isfinite(y)]
            if not points:
                continue
            ax.plot(*zip(*points, strict=True), "o", color=color, alpha=0.5, ms=4)
            means: dict[float, list[float]] = {}
            for x, y in points:
                means.setdefault(x, []).append(y)
            xs = sorted(means)
            ax.plot(
                xs, [statistics.mean(means[x]) for x in xs], "-", color=color, label=label or None
            )
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel(key)
        if log_x:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(categories)), [c.strip('"') for c in categories])
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if any(groups) and others:
        axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"sweep {sweep.name}: metrics against {key}", fontsize=10)
    fig.tight_layout()
    path = _save(fig, path)
    plt.close(fig)
    return path


def write_report(
    sweep: Sweep,
    status: Mapping[str, str] | None = None,
    *,
    plots: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[list[dict[str, Any]], str]:
    """Write OUT/results.csv, OUT/results.md and the plots; returns the rows and the Markdown."""
    logs = {member.name: read_log(member) for member in sweep.members}  # each file read once
    rows = collect(sweep, logs, status)
    cols = columns(sweep, rows)
    out = sweep.out_dir
    write_csv(out / "results.csv", cols, rows)
    table = markdown(sweep, cols, rows)
    images: list[Path] = []
    if plots:
        try:
            images = plot(sweep, rows, logs, out)
        except RuntimeError as e:
            log(f"warning: {e}")
    figures = "".join(f"\n![{p.stem}]({p.name})\n" for p in images)
    write_atomic(out / "results.md", table + figures)
    return rows, table
