"""Run llm-foundry ICL tasks on a model: prompts, batched scoring or generation, metrics."""

from __future__ import annotations

import dataclasses
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mpt_jax.evaluation import metrics
from mpt_jax.evaluation.errors import EvalError
from mpt_jax.evaluation.gauntlet import GauntletConfig, compute_gauntlet
from mpt_jax.evaluation.prompts import Prompt, PromptBuilder, tokenize, tokenize_generation
from mpt_jax.evaluation.scoring import Scorer
from mpt_jax.evaluation.tasks import (
    GENERATION,
    LM,
    METRICS,
    TaskConfig,
    read_examples,
    split_by_category,
)
from mpt_jax.evaluation.tokens import IclTokenizer


@dataclasses.dataclass
class IclJob:
    """One (sub-)dataset of a task at one few-shot count, tokenized and ready to run."""

    task: TaskConfig
    k: int
    group: str
    prompts: list[Prompt]
    truncated: int
    sequences: list[tuple[np.ndarray, int]] = dataclasses.field(default_factory=list)
    counts: list[int] = dataclasses.field(default_factory=list)  # sequences per prompt
    max_new: int = 0  # generation
    # the (sub-)dataset's examples, subset or not: the gauntlet's weights (llm-foundry's
    # num_samples, the dataset's length; its subset limit is the evaluator's)
    dataset_size: int = 0

    @property
    def desc(self) -> str:
        return f"{self.task.label} {self.k}-shot" + (f" {self.group}" if self.group else "")


def run_tasks(
    scorer: Scorer,
    tokenizer: IclTokenizer,
    tasks: Sequence[TaskConfig],
    *,
    progress: bool = False,
    details: bool = False,
    generate: Callable | None = None,
) -> list[dict[str, Any]]:
    """One result per (task, num_fewshot): accuracy, sample count, per-category accuracies.

    Every task file is read, assembled and tokenized before the first forward pass, so bad
    input fails fast. `generate(prompts, max_new_tokens=, eos_id=, stop=, on_batch=)` replaces
    the scorer's greedy decoding for generation tasks when given.
    """
    jobs = prepare_tasks(tasks, tokenizer, scorer.config.max_seq_len)
    return run_prepared(
        jobs, scorer, tokenizer, progress=progress, details=details, generate=generate
    )


def prepare_tasks(
    tasks: Sequence[TaskConfig],
    tokenizer: IclTokenizer,
    max_seq_len: int,
    *,
    subset_num_batches: int | None = None,
    batch_size: int = 1,
    row_multiple: int = 1,
) -> list[IclJob]:
    """Read, assemble and tokenize every task at each few-shot count (and category).

    With `subset_num_batches` K (llm-foundry's icl_subset_num_batches) each task keeps the
    prompts of its first K batches: a batch is the task's batch_size (else `batch_size`)
    scored rows, rounded up to a multiple of `row_multiple` (the data-parallel devices), and
    holds as many prompts as fit whole, one per choice for multiple_choice and schema (as
    llm-foundry's batch_size // num_choices). The few-shot examples are still drawn from the
    whole file.
    """
    jobs = []
    for task in tasks:
        examples = read_examples(task.path, task.task_type, need_category=task.has_categories)
        groups = split_by_category(examples) if task.has_categories else {"": examples}
        limit = task.max_seq_len or max_seq_len
        if limit > max_seq_len:
            raise EvalError(
                f"icl_tasks label {task.label!r} ({task.dataset_uri}): max_seq_len {limit} "
                f"exceeds the model's {max_seq_len}"
            )
        subset = None
        if subset_num_batches is not None:
            rows = -(-(task.batch_size or batch_size) // row_multiple) * row_multiple
            subset = (subset_num_batches, rows)
        for k in task.num_fewshot:
            for name, group in groups.items():
                builder = PromptBuilder(task, group, prefix_space=tokenizer.needs_prefix_space)
                jobs.append(_prepare(builder, tokenizer, k, name, limit, subset))
    return jobs


def run_prepared(
    jobs: Sequence[IclJob],
    scorer: Scorer,
    tokenizer: IclTokenizer,
    *,
    progress: bool = False,
    details: bool = False,
    generate: Callable | None = None,
    on_batch: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """run_tasks over prepare_tasks' jobs; `on_batch()` is called after every batch."""
    done: dict[tuple[str, int], list] = {}
    for job in jobs:
        start = time.perf_counter()
        if job.task.task_type == GENERATION:
            rows = _generate(job, scorer, tokenizer, progress, generate, on_batch)
        else:
            rows = _score(job, scorer, progress, on_batch)
        done.setdefault((job.task.label, job.k), []).append(
            (job, rows, time.perf_counter() - start)
        )
    return [_summarize(parts, details) for parts in done.values()]


def _prepare(
    builder: PromptBuilder,
    tokenizer: IclTokenizer,
    k: int,
    group: str,
    limit: int,
    subset: tuple[int, int] | None = None,
) -> IclJob:
    """The job of one few-shot count; `subset` (batches, rows each) keeps its first prompts."""
    task = builder.task
    prompts = builder.build(k)
    dataset_size = len(prompts)
    if subset is not None:
        batches, rows = subset
        # scored sequences per prompt: one per choice (generation: one per prompt)
        per_prompt = max((len(p.contexts) * len(p.continuations) for p in prompts), default=1)
        per_prompt = max(per_prompt, 1)
        prompts = prompts[: batches * max(1, rows // per_prompt)]
    if task.task_type != GENERATION:
        job = IclJob(task, k, group, prompts, 0, dataset_size=dataset_size)
        for prompt in prompts:
            seqs = tokenize(prompt, tokenizer, limit, task.path)
            job.sequences += [(s.tokens, s.start) for s in seqs]
            job.counts.append(len(seqs))
            job.truncated += sum(s.truncated for s in seqs)
        return job
    max_new = max(builder.max_answer_tokens(tokenizer), 1)
    if limit - max_new < 1:
        raise EvalError(
            f"{task.path}: answers need up to {max_new} new tokens, which leaves no room for "
            f"the prompt in the model's {limit}-token context"
        )
    encoded = [tokenize_generation(p, tokenizer, limit - max_new, task.path) for p in prompts]
    truncated = sum(cut for _, cut in encoded)
    job = IclJob(task, k, group, prompts, truncated, max_new=max_new, dataset_size=dataset_size)
    job.sequences = [(tokens, len(tokens)) for tokens, _ in encoded]
    return job


def _score(job: IclJob, scorer: Scorer, progress: bool, on_batch=None) -> list[dict[str, Any]]:
    with _bar(len(job.sequences), job.desc, progress, on_batch) as bar:
        scores = scorer.score(job.sequences, batch_size=job.task.batch_size, on_batch=bar.update)
    offsets = np.cumsum([0, *job.counts])
    rows = []
    for prompt, a, b in zip(job.prompts, offsets[:-1], offsets[1:], strict=True):
        if job.task.task_type == LM:
            rows.append(
                {
                    "line": prompt.line,
                    "correct": bool(scores.all_correct[a]),
                    "ce_sum": float(scores.ce_sum[a]),
                    "tokens": int(scores.n_tokens[a]),
                }
            )
            continue
        mean_ce = [float(x) for x in scores.mean_ce[a:b]]
        pick = metrics.multiple_choice_pick(mean_ce)
        rows.append(
            {
                "line": prompt.line,
                "correct": pick == prompt.gold,
                "pick": pick,
                "gold": prompt.gold,
                "mean_ce": mean_ce,
            }
        )
    return rows


def _generate(job: IclJob, scorer, tokenizer, progress, generate, on_batch=None) -> list[dict]:
    task = job.task
    criteria = task.early_stopping_criteria
    stop_re = re.compile("|".join(criteria)) if criteria else None

    def stop(ids: list[int]) -> bool:
        # only saves work: the metric itself cuts at the first stop sequence
        return stop_re is not None and stop_re.search(tokenizer.decode(ids)) is not None

    prompts = [tokens for tokens, _ in job.sequences]
    kwargs = dict(max_new_tokens=job.max_new, eos_id=tokenizer.eos_id, stop=stop)
    with _bar(len(prompts), job.desc, progress, on_batch) as bar:
        if generate is not None:
            outputs = generate(prompts, on_batch=bar.update, **kwargs)
        else:
            outputs = scorer.greedy(
                prompts, batch_size=task.batch_size, on_batch=bar.update, **kwargs
            )
    rows = []
    for prompt, out in zip(job.prompts, outputs, strict=True):
        text = tokenizer.decode(out)
        correct = metrics.exact_match(
            text,
            prompt.answers,
            stopping_criteria=criteria,
            cot_delimiter=task.cot_delimiter,
            do_normalization=task.do_normalization,
        )
        rows.append({"line": prompt.line, "correct": correct, "output": text})
    return rows


def _summarize(parts: list[tuple[IclJob, list[dict], float]], details: bool) -> dict[str, Any]:
    task, k = parts[0][0].task, parts[0][0].k
    key = f"{task.label}/{k}-shot"
    accs = {job.group: metrics.accuracy([r["correct"] for r in rows]) for job, rows, _ in parts}
    out: dict[str, Any] = {
        "key": key,
        "label": task.label,
        "num_fewshot": k,
        "icl_task_type": task.task_type,
        "metric": METRICS[task.task_type],
        # with categories llm-foundry's gauntlet averages the per-category accuracies
        "accuracy": float(np.mean(list(accs.values()))),
        "samples": sum(len(rows) for _, rows, _ in parts),
        "dataset_size": sum(job.dataset_size for job, _, _ in parts),
        "truncated": sum(job.truncated for job, _, _ in parts),
        "seconds": sum(seconds for _, _, seconds in parts),
    }
    if task.has_categories:
        out["categories"] = {
            job.group: {
                "accuracy": accs[job.group],
                "samples": len(rows),
                "dataset_size": job.dataset_size,
            }
            for job, rows, _ in parts
        }
    if details:
        out["details"] = {job.group: rows for job, rows, _ in parts}
    if out["truncated"]:
        print(
            f"warning: {key}: {out['truncated']} contexts were cut from the left to fit",
            file=sys.stderr,
        )
    return out


def benchmark_sizes(results: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Example counts per evaluated (sub-)dataset label, as the gauntlet's weights want them:
    the whole dataset's, also where icl_subset_num_batches scored fewer (as llm-foundry's)."""
    sizes = {}
    for r in results:
        if "categories" in r:
            for name, c in r["categories"].items():
                sizes[f"{r['key']}/{name}"] = c.get("dataset_size", c["samples"])
        else:
            sizes[r["key"]] = r.get("dataset_size", r["samples"])
    return sizes


def gauntlet_scores(gauntlet: GauntletConfig, results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """compute_gauntlet over run_tasks' results: their accuracies, weighted by their sizes."""
    accuracies = {r["key"]: r["accuracy"] for r in results}
    return compute_gauntlet(gauntlet, accuracies, benchmark_sizes(results))


class _bar:
    """A tqdm bar over sequences, or nothing; `on_batch()` also hears of every update."""

    def __init__(self, total: int, desc: str, show: bool, on_batch=None):
        from tqdm import tqdm

        self.tqdm = tqdm(total=total, desc=desc, unit="seq", disable=not show, leave=False)
        self.on_batch = on_batch

    def __enter__(self):
        return self

    def update(self, n: int) -> None:
        self.tqdm.update(n)
        if self.on_batch is not None:
            self.on_batch()

    def __exit__(self, *exc):
        self.tqdm.close()
