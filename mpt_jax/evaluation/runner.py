"""`mpt-jax eval`: perplexity, ICL tasks and the gauntlet; a console table and a JSON file."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mpt_jax import checkpoint
from mpt_jax.atomic_write import unwritable_reason, write_atomic
from mpt_jax.config import ConfigError, MeshConfig, from_dict
from mpt_jax.data import DatasetMeta, open_dataset, resolve_dataset
from mpt_jax.data.prepare import META_FILE
from mpt_jax.data.sources import BUILTIN_PREFIX
from mpt_jax.evaluation.errors import EvalError
from mpt_jax.evaluation.gauntlet import GauntletConfig, parse_gauntlet
from mpt_jax.evaluation.icl import gauntlet_scores, run_tasks
from mpt_jax.evaluation.perplexity import evaluate_perplexity
from mpt_jax.evaluation.scoring import Scorer
from mpt_jax.evaluation.tasks import TaskConfig, load_task_list
from mpt_jax.evaluation.tokens import IclTokenizer


def evaluate(
    model,
    tokenizer,
    *,
    tasks: Sequence[TaskConfig] = (),
    gauntlet: GauntletConfig | None = None,
    data: str | Path | None = None,
    split: str = "val",
    seq_lens: Sequence[int] | None = None,
    max_tokens: int | None = None,
    batch_size: int = 16,
    mesh_config: MeshConfig | None = None,
    progress: bool = False,
    details: bool = False,
) -> dict[str, Any]:
    """Everything asked for, as one JSON-ready dict (the Python form of `mpt-jax eval`)."""
    from mpt_jax import sharding

    if gauntlet is not None and not tasks:
        raise EvalError("a gauntlet needs ICL tasks (--tasks)")
    mesh = sharding.make_mesh(mesh_config or MeshConfig())
    scorer = Scorer(model, mesh, batch_size=batch_size)
    out: dict[str, Any] = {"mesh": dict(mesh.shape), "batch_size": scorer.batch_size}
    start = time.perf_counter()
    if data is not None:
        if str(data).startswith(BUILTIN_PREFIX):
            data = _builtin_dataset(str(data), tokenizer, model.config.max_seq_len, progress).folder
        out["perplexity"] = evaluate_perplexity(
            scorer,
            data,
            split=split,
            seq_lens=seq_lens,
            max_tokens=max_tokens,
            progress=progress,
            tokenizer=tokenizer,
        )
    if tasks:
        icl = run_tasks(
            scorer,
            IclTokenizer(tokenizer),
            tasks,
            progress=progress,
            details=details,
            generate=kv_cache_generate(model, scorer.batch_size),
        )
        out["icl"] = icl
        if gauntlet is not None:
            out["gauntlet"] = gauntlet_scores(gauntlet, icl)
    out["seconds"] = time.perf_counter() - start
    out["compiled_shapes"] = sorted(scorer.shapes)
    return out


def kv_cache_generate(model, batch_size: int):
    """Greedy generation with mpt_jax.generate's KV cache in length-sorted chunks, if present.

    Without that module generation tasks fall back to Scorer.greedy (full forward passes).
    """
    try:
        from mpt_jax.generate import generate
    except ImportError:
        return None

    def run(prompts, *, max_new_tokens: int, eos_id: int, stop=None, on_batch=None):
        # `stop` only saves work: the metric cuts at the stop sequences itself
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        outputs: list[list[int]] = [[] for _ in prompts]
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            new = generate(
                model,
                [prompts[i] for i in idx],
                max_new_tokens=max_new_tokens,
                temperature=0.0,
                eos_id=eos_id,
            )
            for i, tokens in zip(idx, new, strict=True):
                outputs[i] = [int(t) for t in tokens]
            if on_batch is not None:
                on_batch(len(idx))
        return outputs

    return run


# ---------------------------------------------------------------------------------------------
# Console and JSON


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in header]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e5 else f"{value:.4e}"
    return "-" if value is None else str(value)


def format_results(results: dict[str, Any]) -> str:
    """The console report: perplexity, ICL accuracies, gauntlet categories and averages."""
    parts = []
    for r in results.get("perplexity", []):
        parts.append(
            f"perplexity: {r['dataset']} split {r['split']}, seq_len {r['seq_len']}"
            + (" (beyond max_seq_len)" if r["extrapolated"] else "")
        )
        parts.append(
            _table(
                ["tokens", "loss", "perplexity", "bits/byte", "token acc"],
                [[r["tokens"], r["loss"], r["perplexity"], r["bits_per_byte"], r["accuracy"]]],
            )
        )
        parts.append(
            _table(
                ["positions", "loss"],
                [[f"{b['start']}-{b['end'] - 1}", b["loss"]] for b in r["position_buckets"]],
            )
        )
    if "icl" in results:
        rows = []
        for r in results["icl"]:
            rows.append(
                [r["label"], r["num_fewshot"], r["icl_task_type"], r["accuracy"], r["samples"]]
            )
        parts.append(_table(["task", "shots", "type", "accuracy", "samples"], rows))
    if "gauntlet" in results:
        g = results["gauntlet"]
        rows = [[name, score] for name, score in g["categories"].items()]
        rows += [[name, score] for name, score in g["averages"].items()]
        parts.append(_table(["gauntlet", "score"], rows))
        for cat, keys in g["missing"].items():
            parts.append(f"gauntlet: category {cat} dropped, no result for {', '.join(keys)}")
    return "\n\n".join(parts)


def _builtin_dataset(spec: str, tokenizer, seq_len: int, progress: bool) -> DatasetMeta:
    """The cached dataset of a built-in corpus in the model's tokens (prepared once, as by train).

    With the model's max_seq_len and the tokenizer a run trained with, this is the folder that
    run's training prepares today; `mpt-jax eval` of a run folder checks that it holds the
    rows the run trained on (_as_the_run_trained).
    """
    if tokenizer.kind == "byte":
        return resolve_dataset(spec, seq_len=seq_len, progress=progress)
    return resolve_dataset(
        spec,
        seq_len=seq_len,
        tokenizer=str(tokenizer.path),
        eos_token=tokenizer.eos_token,
        progress=progress,
    )


def _as_the_run_trained(spec: str, built: DatasetMeta, run_dir: Path, step: int) -> Path:
    """The folder of `spec` a run trained on: `built` when it holds the same rows, else the
    folder the run's checkpoint names; refused when neither does, since another split of the
    corpus can put the run's training documents into validation."""
    meta = checkpoint.read_meta(checkpoint.find_step_dir(run_dir, step))
    data_cfg = meta.get("config", {}).get("data", {})
    sources = [data_cfg.get("path")] + [s.get("path") for s in data_cfg.get("mixture") or ()]
    sources = [s for s in sources if s is not None]
    if spec not in sources:
        return built.folder  # the run trained on other data: nothing was held out for it
    i = sources.index(spec)
    state = meta.get("data", {})
    contents, folders = state.get("contents"), state.get("datasets") or []
    if contents is not None and built.content_id == contents[i]:
        return built.folder
    recorded = Path(folders[i]) if i < len(folders) else None
    if (
        recorded is not None
        and (recorded / META_FILE).is_file()
        and (contents is None or open_dataset(recorded).content_id == contents[i])
    ):
        return recorded
    raise EvalError(
        f"--data {spec}: the run trained on {recorded}, which is not here or holds other rows, "
        f"and the corpus prepared now ({built.folder}) holds other rows (another split, tokenizer "
        "or Python's sources), so its validation documents may be the run's training documents; "
        "give the run's dataset folder"
    )


def _check_writable(path: Path, option: str) -> None:
    """Refuse an output path that names a folder or lies under a file."""
    if path.is_dir():
        raise EvalError(f"{option}: {path} is a folder; name a file")
    if reason := unwritable_reason(path.parent):
        raise EvalError(f"{option}: {reason}")


def _check_out_is_no_input(out: Path, files: list[str | Path], folders: list[str | Path]) -> None:
    """Refuse an --out that would replace what the command reads: an input file, or a file in
    the model's or dataset's folder other than an earlier result (a JSON object with `model`)."""
    target = out.resolve()
    for f in files:
        if target == Path(f).resolve():
            raise EvalError(f"--out: {out} is an input of this evaluation; name another file")
    for folder in folders:
        root = Path(folder).resolve()
        inside = target == root or root in target.parents
        if not inside or not target.exists():
            continue
        try:
            earlier = json.loads(target.read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            earlier = None
        if not (isinstance(earlier, dict) and "model" in earlier):
            raise EvalError(
                f"--out: {out} is a file of {folder}, not an earlier result; name another file"
            )


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (a temporary sibling renamed into place)."""
    write_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


# ---------------------------------------------------------------------------------------------
# Command line


def parse_mesh(text: str | None) -> MeshConfig:
    """`data=1,fsdp=-1,tensor=1` (any subset) -> MeshConfig."""
    if not text:
        return MeshConfig()
    raw = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise EvalError(f"--mesh: expected key=value items, got {item!r}")
        try:
            raw[key.strip()] = int(value)
        except ValueError:
            raise EvalError(f"--mesh: {key}: expected an integer, got {value!r}") from None
    try:
        return from_dict(MeshConfig, raw, where="--mesh")
    except ConfigError as e:
        raise EvalError(str(e)) from None


def parse_ints(text: str | None, option: str) -> list[int] | None:
    if not text:
        return None
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise EvalError(f"{option}: expected comma-separated integers, got {text!r}") from None
    if not values:
        raise EvalError(f"{option}: no values given")
    return values


def run_cli(args) -> dict[str, Any]:
    """Load, evaluate, print the tables and write --out; errors are EvalError/ConfigError."""
    from mpt_jax.evaluation.gauntlet import load_gauntlet
    from mpt_jax.evaluation.loading import load_for_eval

    if not args.tasks and not args.data:
        raise EvalError("nothing to evaluate: give --tasks TASKS.yaml and/or --data PREPARED_DIR")
    if args.batch_size < 1:
        raise EvalError(f"--batch-size: must be >= 1, got {args.batch_size}")
    if args.out:
        _check_writable(Path(args.out), "--out")  # before the evaluation, not after it
    seq_lens = parse_ints(args.seq_lens, "--seq-lens")
    if seq_lens and not args.data:
        raise EvalError("--seq-lens: applies to perplexity, which needs --data")
    mesh = parse_mesh(args.mesh)
    tasks, gauntlet = [], None
    if args.tasks:
        tasks, inline = load_task_list(args.tasks)
        if inline is not None and not args.gauntlet:
            gauntlet = parse_gauntlet(inline, where=f"{args.tasks} eval_gauntlet")
    if args.gauntlet:
        if not args.tasks:
            raise EvalError("--gauntlet: needs --tasks")
        gauntlet = load_gauntlet(args.gauntlet)
    if args.out:
        files = [args.tasks, args.gauntlet, args.tokenizer, *(t.dataset_uri for t in tasks)]
        folders = [args.model, args.data]
        _check_out_is_no_input(
            Path(args.out),
            [f for f in files if f and Path(f).exists()],
            [f for f in folders if f and not str(f).startswith(BUILTIN_PREFIX)],
        )
    model, tokenizer, info = load_for_eval(
        args.model, step=args.step, tokenizer=args.tokenizer, dtype=args.dtype
    )
    data = args.data
    if data and str(data).startswith(BUILTIN_PREFIX) and "step" in info:
        # a run folder: its own copy of the corpus, whose val split it held out
        built = _builtin_dataset(str(data), tokenizer, model.config.max_seq_len, args.progress)
        data = _as_the_run_trained(str(data), built, Path(args.model), info["step"])
    results = evaluate(
        model,
        tokenizer,
        tasks=tasks,
        gauntlet=gauntlet,
        data=data,
        split=args.split,
        seq_lens=seq_lens,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        mesh_config=mesh,
        progress=args.progress,
    )
    results = {"model": info, **results}
    print(format_results(results))
    if args.out:
        write_json(args.out, results)
        print(f"\nresults: {args.out}")
    return results
